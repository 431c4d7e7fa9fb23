// Rebasing an image onto another backing file, as qemu-img 7.2's img_rebase: in safe mode every
// range the image does not allocate itself, where the old and the new backing chains read
// differently, is first written into the image (the old chain's bytes), so the guest sees the same
// disk before and after; then the header names the new backing file. A crash during the copy
// leaves the old backing file named and the content unchanged; the header switch is one write.

import type { Image } from './image.js';
import { UsageError } from './errors.js';

/** qemu-img's IO_BUF_SIZE: the range compared per step. */
const STEP_BYTES = 2 * 1024 * 1024;
const SECTOR = 512;
/** Equal ranges are compared this many bytes at a time (a multiple of SECTOR). */
const SKIP_BYTES = 64 * 1024;

export interface RebaseOptions {
  /** The name written into the header ('' or undefined: the image stands alone). Written as given, not resolved. */
  backingFile?: string;
  /** The backing format written into the header (undefined: none). */
  backingFormat?: string;
  /**
   * Safe mode (the default): the new backing chain, opened read-only, or null for none. It may be
   * an image of `image`'s own backing chain (rebasing onto an older layer): then only ranges the
   * layers above it allocate are compared. Omit with `unsafe`.
   */
  newBacking?: Image | null;
  /** Only rewrite the header (qemu-img rebase -u); `image` may then be opened without its chain. */
  unsafe?: boolean;
  /**
   * Refuse a backing file without a format (as qemu-img rebase does, after the copy):
   * the error carries errno EINVAL.
   */
  requireFormat?: boolean;
  /** Called after each compared step (not for steps the image allocates itself), in order. */
  onStep?: (offset: number, length: number) => void;
}

/**
 * Rebases `image` (opened writable with its backing chain, unless unsafe) onto
 * `options.backingFile`. Errors from the header change carry QEMU's errno in `data.errno`
 * (EINVAL, ENOSPC); the copy has then already been done, as in qemu-img.
 */
export async function rebaseImage(image: Image, options: RebaseOptions): Promise<void> {
  if (image.readOnly) throw new UsageError(`${image.storage.name}: cannot rebase: the image is open read-only`);
  const name = options.backingFile ? options.backingFile : undefined;
  if (options.backingFormat !== undefined && name === undefined) {
    // bdrv_change_backing_file: a format without a file makes no sense.
    throw new UsageError('Invalid argument', { errno: 'EINVAL' });
  }
  if (!options.unsafe) await copyDifferences(image, options.newBacking ?? null, options.onStep);
  if (options.requireFormat && name !== undefined && options.backingFormat === undefined) {
    throw new UsageError('backing format must be specified', { errno: 'EINVAL' });
  }
  await image.changeBackingFile(name, options.backingFormat);
}

/** Whether `layer` is `image` or one of its backing files. */
function inChain(image: Image, layer: Image): boolean {
  for (let l: Image | null = image; l; l = l.backing) if (l === layer) return true;
  return false;
}

/**
 * Whether the layers from `from` down to (not including) `prefix` allocate the run at offset, and
 * for how long the answer holds (at most maxLength). A layer that ends before offset counts as
 * allocating zeros there (QEMU's block status beyond a short backing file).
 */
async function allocatedAbove(from: Image, prefix: Image, offset: number, maxLength: number): Promise<{ allocated: boolean; length: number }> {
  let length = maxLength;
  for (let layer: Image | null = from; layer && layer !== prefix; layer = layer.backing) {
    if (offset >= layer.virtualSize) return { allocated: true, length };
    length = Math.min(length, layer.virtualSize - offset);
    const m = await layer.driver.getMapping(offset, length);
    length = Math.min(length, m.length);
    if (m.kind !== 'unallocated') return { allocated: true, length };
  }
  return { allocated: false, length };
}

/** A range to compare: the old chain reads zeros there when oldIsZero (past its end). */
interface Step {
  offset: number;
  n: number;
  oldIsZero: boolean;
}

async function copyDifferences(image: Image, newBacking: Image | null, onStep?: (offset: number, length: number) => void): Promise<void> {
  const size = image.virtualSize;
  const oldBacking = image.backing;
  const oldSize = oldBacking ? oldBacking.virtualSize : 0;
  const newSize = newBacking ? newBacking.virtualSize : 0;
  // Rebasing onto a layer of the current chain: ranges no layer above it allocates read the same.
  const prefix = newBacking && oldBacking && inChain(oldBacking, newBacking) ? newBacking : null;

  /** The next range to compare from `from` on, in qemu-img's steps (null at the end). */
  const findStep = async (from: number): Promise<Step | null> => {
    let n = 0;
    for (let offset = from; offset < size; offset += n) {
      n = Math.min(STEP_BYTES, size - offset);
      // Ranges the image allocates itself (data or zeros) do not depend on the backing file.
      const own = await image.driver.getMapping(offset, n);
      n = Math.min(n, own.length);
      if (own.kind !== 'unallocated') continue;
      if (prefix && oldBacking) {
        const above = await allocatedAbove(oldBacking, prefix, offset, n);
        n = above.length;
        if (!above.allocated) continue;
      }
      const oldIsZero = offset >= oldSize;
      if (!oldIsZero) n = Math.min(n, oldSize - offset);
      if (newBacking && offset < newSize) n = Math.min(n, newSize - offset);
      return { offset, n, oldIsZero };
    }
    return null;
  };

  const bufLength = Math.min(STEP_BYTES, size);
  const pairs = [0, 1].map(() => ({ old: Buffer.alloc(bufLength), new: Buffer.alloc(bufLength) }));
  /** Reads the old and the new chain's bytes of a step (zeros past either's end). */
  const read = async (step: Step, pair: { old: Buffer; new: Buffer }): Promise<void> => {
    const { offset, n } = step;
    const reads: Promise<void>[] = [];
    if (step.oldIsZero) pair.old.fill(0, 0, n);
    else reads.push(oldBacking!.readInto(pair.old.subarray(0, n), offset));
    if (newBacking && offset < newSize) reads.push(newBacking.readInto(pair.new.subarray(0, n), offset));
    else pair.new.fill(0, 0, n);
    await Promise.all(reads);
  };

  // One step ahead: the next step's reads run while this one is compared and written.
  let which = 0;
  let step = await findStep(0);
  let reading = step ? read(step, pairs[which]!) : null;
  while (step && reading) {
    const next = await findStep(step.offset + step.n);
    const nextReading = next ? read(next, pairs[which ^ 1]!) : null;
    nextReading?.catch(() => undefined);
    await reading;
    const { old: bufOld, new: bufNew } = pairs[which]!;
    const { offset, n, oldIsZero } = step;
    // Runs of differing 512-byte sectors (as qemu-img's compare_buffers) are written.
    // The writes are queued together (the image keeps their order) and all done before the
    // buffer is read into again.
    if (bufOld.compare(bufNew, 0, n, 0, n) !== 0) {
      const writes: Promise<void>[] = [];
      let pos = firstDifferentSector(bufOld, bufNew, 0, n);
      while (pos < n) {
        let end = Math.min(n, pos + SECTOR);
        while (end < n && sectorDiffers(bufOld, bufNew, end, n)) end = Math.min(n, end + SECTOR);
        writes.push(oldIsZero ? image.writeZeroes(offset + pos, end - pos) : image.write(offset + pos, bufOld.subarray(pos, end)));
        pos = end < n ? firstDifferentSector(bufOld, bufNew, end, n) : n;
      }
      await Promise.all(writes);
    }
    onStep?.(offset, n);
    step = next;
    reading = nextReading;
    which ^= 1;
  }
}

/**
 * The first sector at or after `from` (a sector boundary) where a and b differ, or n. Equal bytes
 * are passed SKIP_BYTES at a time; a block that differs is halved down to its first differing
 * sector (a handful of memcmp calls, where testing sector by sector cost one call per sector).
 */
function firstDifferentSector(a: Buffer, b: Buffer, from: number, n: number): number {
  for (let pos = from; pos < n; pos += SKIP_BYTES) {
    let hi = Math.min(n, pos + SKIP_BYTES);
    if (a.compare(b, pos, hi, pos, hi) === 0) continue;
    let lo = pos;
    // [lo, hi) holds a difference; lo stays on a sector boundary.
    while (hi - lo > SECTOR) {
      const mid = lo + Math.ceil((hi - lo) / (2 * SECTOR)) * SECTOR;
      if (a.compare(b, lo, mid, lo, mid) !== 0) hi = mid;
      else lo = mid;
    }
    return lo;
  }
  return n;
}

function sectorDiffers(a: Buffer, b: Buffer, pos: number, n: number): boolean {
  // Most differing sectors differ in their first bytes: checked without a call into C++.
  if (a[pos] !== b[pos] || a[pos + 1] !== b[pos + 1] || a[pos + 2] !== b[pos + 2] || a[pos + 3] !== b[pos + 3]) return true;
  const end = Math.min(n, pos + SECTOR);
  return a.compare(b, pos, end, pos, end) !== 0;
}
