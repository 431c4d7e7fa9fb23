// The raw format: the storage is the disk.

import type { FormatDriver, ShallowMapping } from '../image.js';
import type { ImageInfo } from '../info.js';
import type { Storage } from '../io/storage.js';
import { UsageError } from '../errors.js';

/** QEMU counts a raw disk in 512-byte sectors, rounding a file's size up: the tail reads as zeros. */
export const RAW_SECTOR = 512;

export class RawDriver implements FormatDriver {
  readonly format = 'raw' as const;
  readonly storage: Storage;
  readonly virtualSize: number;

  private constructor(storage: Storage, virtualSize: number) {
    this.storage = storage;
    this.virtualSize = virtualSize;
  }

  static async open(storage: Storage): Promise<RawDriver> {
    const size = await storage.size();
    return new RawDriver(storage, Math.ceil(size / RAW_SECTOR) * RAW_SECTOR);
  }

  async getMapping(guestOffset: number, maxLength: number): Promise<ShallowMapping> {
    return { kind: 'data', length: maxLength, storage: this.storage, hostOffset: guestOffset, hostProbe: 'raw' };
  }

  async readCompressed(): Promise<void> {
    throw new UsageError('raw images have no compressed clusters');
  }

  async info(): Promise<ImageInfo> {
    const actualSize = this.storage.allocatedSize ? await this.storage.allocatedSize() : undefined;
    return {
      filename: this.storage.name,
      format: 'raw',
      virtualSize: this.virtualSize,
      ...(actualSize !== undefined ? { actualSize } : {}),
      snapshots: [],
    };
  }

  async close(): Promise<void> {
    await this.storage.close();
  }
}
