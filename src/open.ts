// Opening images: format probing, the backing chain through the gate, snapshots.

import type { Storage, StorageGate } from './io/storage.js';
import { readFullZeroFill } from './io/storage.js';
import { Image, type ImageFormat } from './image.js';
import { FileStorage } from './io/file.js';
import { fileGate } from './io/gate.js';
import { Qcow2Driver } from './qcow2/qcow2.js';
import { QCOW2_MAGIC } from './qcow2/layout.js';
import { RawDriver } from './raw/raw.js';
import { FormatError, QimgError, UnsupportedError, UsageError } from './errors.js';
import {
  backingPerms, dataFilePerms, forceShared, imageFilePerms, PERM_WRITE, userPerms, type LockPerms,
} from './io/lock.js';

export interface OpenImageOptions {
  /** The format; probed (qcow2 by magic, else raw) when absent. */
  format?: ImageFormat;
  readOnly?: boolean;
  /** Opens the files an image names (backing, data file). Default: the permissive file gate. */
  gate?: StorageGate;
  /** Do not open the backing chain (reads of unallocated ranges return zeros). */
  noBacking?: boolean;
  /** Open an internal snapshot (read-only) instead of the active image. */
  snapshot?: { id?: string; name?: string };
  /**
   * Only the metadata will be looked at (qemu-img info; QEMU's BDRV_O_NO_IO): the external data
   * file is not opened, so an image can be described without touching the files it names.
   */
  metadataOnly?: boolean;
  /**
   * With `readOnly: false`: the images of the chain at depth <= writableDepth are opened writable
   * (0, the default, = only the top; commit writes into a backing file while the overlay is open).
   */
  writableDepth?: number;
  /**
   * Take QEMU's image locks (OFD byte-range locks) on every file opened: default true. False opts
   * out (e.g. for files no other process can see).
   */
  lock?: boolean;
  /** qemu-img -U: share every permission with other processes, so an image in use can be read. */
  forceShare?: boolean;
  /**
   * The virtual size will change (qemu-img resize): the resize permission is held too, which
   * shows on a raw image's locks (a writable qcow2 file always holds it).
   */
  resize?: boolean;
  /**
   * Others may only read while the image is open, not write it (qemu-img convert's sources): the
   * locks refuse writers of the image, its data file and its backing files.
   */
  shareOnlyReads?: boolean;
}

export interface OpenedImage {
  image: Image;
  /** True when the format was probed rather than given: qemu-img warns when that probe said raw. */
  probed: boolean;
}

/** Backing chains deeper than this are taken for loops QEMU would also fail to open. */
const MAX_CHAIN_DEPTH = 1000;

const FORMATS: readonly ImageFormat[] = ['qcow2', 'raw'];

/** Probes like qemu-img: qcow2 by its magic, anything else is raw. */
export async function probeFormat(storage: Storage): Promise<ImageFormat> {
  const head = new Uint8Array(4);
  await readFullZeroFill(storage, head, 0);
  const magic = new DataView(head.buffer).getUint32(0);
  return magic === QCOW2_MAGIC ? 'qcow2' : 'raw';
}

/**
 * Opens an image and its backing chain. `target` is a path (opened as a file) or a Storage
 * (which the image then owns and closes).
 */
export async function openImage(target: Storage | string, options: OpenImageOptions = {}): Promise<OpenedImage> {
  const readOnly = options.readOnly ?? true;
  if (options.forceShare && !readOnly) {
    throw new UsageError('force-share=on can only be used with read-only images');
  }
  const storage = typeof target === 'string' ? await FileStorage.open(target, { readOnly }) : target;
  if (!readOnly && storage.readOnly) {
    throw new UsageError(`${storage.name}: cannot open a read-only storage for writing`);
  }
  try {
    const probed = options.format === undefined;
    const format = options.format ?? (await probeFormat(storage));
    const gate = options.gate ?? fileGate;
    const use = userPerms({
      writable: !readOnly,
      resize: options.resize,
      metadataOnly: options.metadataOnly,
      shareOnlyReads: options.shareOnlyReads,
    });
    const image = await openChain(storage, format, gate, options, new Set([storage.name]), 0, use);
    return { image, probed };
  } catch (e) {
    await storage.close().catch(() => undefined);
    throw e;
  }
}

async function openChain(
  storage: Storage, format: ImageFormat, gate: StorageGate, options: OpenImageOptions, seen: Set<string>, depth: number,
  asked: LockPerms,
): Promise<Image> {
  // Only the top image (and with writableDepth the images down to that depth) is opened writable.
  const writable = options.readOnly === false && depth <= (options.writableDepth ?? 0);
  // What this level is asked for: the caller's use at the top, a backing file's below; a level
  // opened writable is written whatever asked for it (commit writes into a backing file).
  const node = writable ? { perm: asked.perm | PERM_WRITE, shared: asked.shared } : asked;
  // Locked before the driver reads more than the probe did, and before anything is written.
  lockFile(storage, imageFilePerms(format, node, { writable, metadataOnly: options.metadataOnly }), options);
  if (format === 'raw') {
    if (depth === 0 && options.snapshot) {
      throw new UnsupportedError(`Block format 'raw' used by device '' does not support internal snapshots`);
    }
    return new Image(await RawDriver.open(storage), null);
  }
  const driver = await Qcow2Driver.open(storage, {
    // QEMU 7.2 opens a data file name as given, i.e. relative to the working directory, not to the image.
    openDataFile: async (name) => {
      const data = await gate.open(name, { readOnly: !writable, purpose: 'data-file' });
      try {
        lockFile(data, dataFilePerms(node), options);
      } catch (e) {
        await data.close().catch(() => undefined);
        throw e;
      }
      return data;
    },
    ...(writable ? { writable: true } : {}),
    ...(depth === 0 && options.snapshot ? { snapshot: options.snapshot } : {}),
  });
  if (!options.metadataOnly) {
    try {
      await driver.openDataFile();
    } catch (e) {
      await driver.close().catch(() => undefined);
      throw e;
    }
  }
  const backingName = driver.header.backingFile;
  if (backingName === undefined || backingName === '' || options.noBacking) return new Image(driver, null);
  try {
    const resolved = gate.resolveName ? gate.resolveName(backingName, storage) : backingName;
    if (seen.has(resolved) || depth >= MAX_CHAIN_DEPTH) {
      throw new FormatError(`Backing file '${resolved}' creates an infinite loop.`, { name: resolved });
    }
    seen.add(resolved);
    const backingStorage = await gate.open(backingName, { readOnly: !(options.readOnly === false && depth + 1 <= (options.writableDepth ?? 0)), relativeTo: storage, purpose: 'backing' });
    try {
      let backingFormat: ImageFormat;
      const declared = driver.header.backingFormat;
      if (declared !== undefined && declared !== '') {
        if (!FORMATS.includes(declared as ImageFormat)) {
          throw new UnsupportedError(`Unknown driver '${declared}'`);
        }
        backingFormat = declared as ImageFormat;
      } else {
        backingFormat = await probeFormat(backingStorage);
      }
      const backing = await openChain(backingStorage, backingFormat, gate, options, seen, depth + 1, backingPerms(node));
      return new Image(driver, backing);
    } catch (e) {
      await backingStorage.close().catch(() => undefined);
      throw e;
    }
  } catch (e) {
    await driver.close().catch(() => undefined);
    throw withBackingContext(e);
  }
}

/** Takes the image locks of one file unless the caller opted out (`lock: false`); -U shares everything. */
function lockFile(storage: Storage, perms: LockPerms, options: OpenImageOptions): void {
  if (options.lock === false || !storage.lock) return;
  storage.lock(options.forceShare ? forceShared(perms) : perms);
}

/** QEMU reports a failure anywhere down the chain as "Could not open backing file: <why>", once per level. */
function withBackingContext(e: unknown): unknown {
  if (!(e instanceof QimgError)) return e;
  const wrapped = new QimgError(e.code, `Could not open backing file: ${e.message}`, e.data, { cause: e });
  wrapped.name = e.name;
  return wrapped;
}

/** The type of openImage (for helpers that take the opener as a parameter). */
export type OpenImage = typeof openImage;
