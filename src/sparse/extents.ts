// Data/hole extents of a storage (the native capability or a zero scan) and the zeroing fallbacks.

import type { Storage, StorageExtent } from '../io/storage.js';
import { extentCollector } from '../io/storage.js';
import { isZero, writeZeroBytes } from '../io/zero.js';

export { isZero } from '../io/zero.js';

/** The zero scan's granularity: a file system block, aligned in the storage's address space. */
export const SCAN_BLOCK_SIZE = 4096;
/** Bytes read per step of the zero scan (one buffer per call, reused across steps). */
const SCAN_CHUNK_SIZE = 1 << 20;

/**
 * Data/hole runs covering [offset, offset+length) clipped to the storage size, ascending, adjacent
 * runs of the same kind merged; [] when offset >= size.
 *
 * Uses the storage's own `extents` (SEEK_DATA/SEEK_HOLE) when it has one. Otherwise scans: every
 * 4 KiB block (aligned to 4096 in the storage, like a file system block; the first and last may be
 * partial) that reads as all zeros is reported as a hole. So the fallback calls a zero-filled but
 * allocated block a hole where the native answer calls it data; both read the same.
 */
export async function storageExtents(storage: Storage, offset: number, length: number): Promise<StorageExtent[]> {
  if (storage.extents) return storage.extents(offset, length);
  return scanExtents(storage, offset, length);
}

/** The zero-scan fallback of storageExtents, usable on any storage (also to refine native data runs). */
export async function scanExtents(storage: Storage, offset: number, length: number): Promise<StorageExtent[]> {
  const size = await storage.size();
  const end = Math.min(size, offset + length);
  const { out, push } = extentCollector(offset, end);
  if (end <= offset) return out;
  const buf = new Uint8Array(Math.min(SCAN_CHUNK_SIZE, end - offset + SCAN_BLOCK_SIZE));
  let pos = offset;
  while (pos < end) {
    // Each step ends on a block boundary (or at end), so blocks never straddle two reads.
    const stepEnd = Math.min(end, alignDown(pos, SCAN_BLOCK_SIZE) + buf.length);
    const chunk = buf.subarray(0, stepEnd - pos);
    const got = await readFull(storage, chunk, pos);
    // A storage that shrank under us: the missing tail reads as zeros.
    if (got < chunk.length) chunk.fill(0, got);
    if (isZero(chunk)) {
      push(pos, stepEnd, true);
    } else {
      for (let blockStart = pos; blockStart < stepEnd; ) {
        const blockEnd = Math.min(stepEnd, alignDown(blockStart, SCAN_BLOCK_SIZE) + SCAN_BLOCK_SIZE);
        push(blockStart, blockEnd, isZero(chunk.subarray(blockStart - pos, blockEnd - pos)));
        blockStart = blockEnd;
      }
    }
    pos = stepEnd;
  }
  return out;
}

/**
 * Makes [offset, offset+length) read as zeros and, where the backend can, deallocates it; never
 * changes the size (the range is clipped to it). Uses the storage's `discard` (punch hole) when
 * present. Otherwise it writes zeros in bounded chunks, but first reads each chunk and skips those
 * already all zero: without SEEK_HOLE a hole cannot be told from zero data, and this way existing
 * holes are at least not filled in. Nothing is deallocated on that path.
 */
export async function discardRange(storage: Storage, offset: number, length: number): Promise<void> {
  if (storage.discard) return storage.discard(offset, length);
  const end = Math.min(offset + length, await storage.size());
  if (end <= offset) return;
  await writeZeroBytes((b, o) => storage.write(b, o), offset, end - offset, (b, o) => storage.read(b, o));
}

/**
 * Makes [offset, offset+length) read as zeros, extending the storage if the range ends past it
 * (like a write). Uses the storage's `writeZeroes` when present, else writes zeros in bounded
 * chunks, skipping chunks inside the storage that already read as zeros.
 */
export async function writeZeroesRange(storage: Storage, offset: number, length: number): Promise<void> {
  if (storage.writeZeroes) return storage.writeZeroes(offset, length);
  if (length === 0) return;
  const size = await storage.size();
  const inside = Math.max(0, Math.min(offset + length, size) - offset);
  if (inside > 0) {
    await writeZeroBytes((b, o) => storage.write(b, o), offset, inside, (b, o) => storage.read(b, o));
  }
  if (offset + length > size) {
    // Past the end: growing by truncate leaves a hole that reads as zeros.
    await storage.truncate(offset + length);
  }
}

function alignDown(n: number, align: number): number {
  return n - (n % align);
}

async function readFull(storage: Storage, buf: Uint8Array, offset: number): Promise<number> {
  let done = 0;
  while (done < buf.length) {
    const n = await storage.read(done === 0 ? buf : buf.subarray(done), offset + done);
    if (n <= 0) break;
    done += n;
  }
  return done;
}
