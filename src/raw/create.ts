// Creating raw images as qemu-img 7.2 does (block/file-posix.c raw_co_create): the file is
// truncated to 0, then grown to the size rounded up to 512 bytes with the preallocation mode.

import type { Storage } from '../io/storage.js';
import { zeroBuffer } from '../io/zero.js';
import { UsageError } from '../errors.js';

export type RawPreallocation = 'off' | 'falloc' | 'full';

export interface RawCreateResult {
  /** The file length (the size rounded up to a multiple of 512). */
  size: number;
  /** How falloc was done: reserved by the storage, or emulated by writing zeros. */
  fallocMethod?: 'allocate' | 'zeros';
}

const SECTOR = 512;
/** file-posix's MAX_BLOCKSIZE: allocate_first_block writes this much (or one sector for tiny files). */
const MAX_BLOCKSIZE = 4096;

/** Checks a raw preallocation mode with file-posix's messages. */
export function validateRawPreallocation(mode: string | undefined): RawPreallocation {
  const m = mode ?? 'off';
  if (m === 'off' || m === 'falloc' || m === 'full') return m;
  if (m === 'metadata') throw new UsageError('Unsupported preallocation mode: metadata');
  throw new UsageError(`invalid parameter value: ${m}`);
}

async function writeZeros(storage: Storage, offset: number, length: number): Promise<void> {
  const chunk = 1 << 20;
  for (let pos = 0; pos < length; pos += chunk) {
    const n = Math.min(chunk, length - pos);
    await storage.write(zeroBuffer(n), offset + pos);
  }
}

/**
 * Makes `storage` a raw image of `size` bytes (rounded up to 512). Like QEMU, the first block of a
 * newly grown empty file is written (allocate_first_block: 4 KiB, or 512 bytes below 4 KiB), so the
 * allocated size equals qemu-img's.
 */
export async function createRaw(storage: Storage, size: number, preallocation?: string): Promise<RawCreateResult> {
  const mode = validateRawPreallocation(preallocation);
  if (!Number.isSafeInteger(size) || size < 0) throw new UsageError(`Parameter 'size' expects size`);
  const total = Math.ceil(size / SECTOR) * SECTOR;
  await storage.truncate(0);
  const result: RawCreateResult = { size: total };
  if (total === 0) return result;
  const firstBlock = total < MAX_BLOCKSIZE ? SECTOR : MAX_BLOCKSIZE;
  switch (mode) {
    case 'off':
      await storage.truncate(total);
      await storage.write(zeroBuffer(firstBlock), 0);
      break;
    case 'falloc': {
      if (storage.allocate) {
        await storage.allocate(0, total);
        result.fallocMethod = 'allocate';
      } else {
        // posix_fallocate's own fallback where fallocate is missing: write zeros.
        await writeZeros(storage, 0, total);
        result.fallocMethod = 'zeros';
      }
      await storage.write(zeroBuffer(firstBlock), 0);
      break;
    }
    case 'full':
      await storage.truncate(total);
      await writeZeros(storage, 0, total);
      break;
  }
  return result;
}
