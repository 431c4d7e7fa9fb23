// Opening images: format probing, the backing chain through the gate, snapshots.

import type { Storage, StorageGate } from './io/storage.js';
import type { Image, ImageFormat } from './image.js';

export interface OpenImageOptions {
  /** The format; probed (qcow2 by magic, else raw) when absent. */
  format?: ImageFormat;
  readOnly?: boolean;
  /** Opens the files an image names (backing, data file). Default: files relative to the image, permissive. */
  gate?: StorageGate;
  /** Do not open the backing chain (reads of unallocated ranges return zeros). */
  noBacking?: boolean;
  /** Open an internal snapshot (read-only) instead of the active image. */
  snapshot?: { id?: string; name?: string };
}

export interface OpenedImage {
  image: Image;
  /** True when the format was probed rather than given: qemu-img warns when that probe said raw. */
  probed: boolean;
}

// Implemented in the read-engine commit: openImage(storage | filename, options).
export type OpenImage = (target: Storage | string, options?: OpenImageOptions) => Promise<OpenedImage>;
