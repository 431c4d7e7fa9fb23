// The raw format: the storage is the disk.

import type { FormatDriver, ResizeOptions, ShallowMapping } from '../image.js';
import { discardRange, writeZeroesRange } from '../sparse/extents.js';
import type { ImageInfo } from '../info.js';
import type { Storage } from '../io/storage.js';
import { UsageError } from '../errors.js';
import { zeroBuffer } from '../io/zero.js';

/** QEMU counts a raw disk in 512-byte sectors, rounding a file's size up: the tail reads as zeros. */
export const RAW_SECTOR = 512;
/** file-posix's MAX_BLOCKSIZE: allocate_first_block writes this much (or one sector for small files). */
const MAX_BLOCKSIZE = 4096;

async function writeZeros(storage: Storage, offset: number, length: number): Promise<void> {
  for (let pos = 0; pos < length; pos += 1 << 20) await storage.write(zeroBuffer(Math.min(1 << 20, length - pos)), offset + pos);
}

export class RawDriver implements FormatDriver {
  readonly format = 'raw' as const;
  readonly storage: Storage;
  virtualSize: number;

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

  get readOnly(): boolean {
    return this.storage.readOnly;
  }

  async write(guestOffset: number, data: Uint8Array): Promise<void> {
    await this.storage.write(data, guestOffset);
  }

  /** Never writes zero bytes into a hole: punches where the storage can, else writes only non-zero chunks' zeros. */
  async writeZeroes(guestOffset: number, length: number, mayUnmap: boolean): Promise<void> {
    const size = await this.storage.size();
    const inside = Math.max(0, Math.min(guestOffset + length, size) - guestOffset);
    if (inside > 0) {
      if (mayUnmap && this.storage.discard) await discardRange(this.storage, guestOffset, inside);
      else await writeZeroesRange(this.storage, guestOffset, inside);
    }
    // Past the file's end the disk already reads as zeros (the sector-rounded tail).
  }

  async discard(guestOffset: number, length: number): Promise<void> {
    const size = await this.storage.size();
    const inside = Math.max(0, Math.min(guestOffset + length, size) - guestOffset);
    if (inside > 0) await discardRange(this.storage, guestOffset, inside);
  }

  async flush(): Promise<void> {
    if (!this.storage.readOnly) await this.storage.flush();
  }

  async resize(newSize: number, options: ResizeOptions): Promise<void> {
    if (newSize < this.virtualSize && !options.shrink) {
      throw new UsageError('Use the --shrink option to perform a shrink operation.');
    }
    const mode = options.preallocation ?? 'off';
    const current = await this.storage.size();
    if (mode !== 'off' && current > newSize) throw new UsageError('Cannot use preallocation for shrinking files');
    switch (mode) {
      case 'off':
        await this.storage.truncate(newSize);
        // file-posix's allocate_first_block when an empty file grows (speeds up QEMU's alignment probing).
        if (current === 0 && newSize > 0) await this.storage.write(zeroBuffer(newSize < MAX_BLOCKSIZE ? RAW_SECTOR : MAX_BLOCKSIZE), 0);
        break;
      case 'falloc': {
        // posix_fallocate from the old end; without the capability, its own fallback (writing zeros).
        if (this.storage.allocate) {
          if (newSize > current) await this.storage.allocate(current, newSize - current);
        } else {
          await writeZeros(this.storage, current, newSize - current);
        }
        if (current === 0 && newSize > 0) await this.storage.write(zeroBuffer(newSize < MAX_BLOCKSIZE ? RAW_SECTOR : MAX_BLOCKSIZE), 0);
        break;
      }
      case 'full':
        await this.storage.truncate(newSize);
        await writeZeros(this.storage, current, newSize - current);
        break;
      default:
        throw new UsageError(`Unsupported preallocation mode: ${mode as string}`);
    }
    this.virtualSize = Math.ceil(newSize / RAW_SECTOR) * RAW_SECTOR;
  }

  async close(): Promise<void> {
    if (!this.storage.readOnly) await this.storage.flush();
    await this.storage.close();
  }
}
