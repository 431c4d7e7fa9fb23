// Committing an overlay into a backing file, as qemu-img 7.2's img_commit (an active commit job):
// every range the overlay, or a layer between it and the base, allocates is written into the base
// (data as data, ranges reading as zeros as zero writes); a base smaller than the overlay is grown
// first; then, unless asked to drop it, the overlay is emptied so that it reads through to the base.
// The overlay chain's view never changes: the base only receives what the layers above it already
// show, and the overlay is emptied only after the base is flushed.

import type { Image } from './image.js';
import { UsageError } from './errors.js';
import { WriteThrottle } from './convert/throttle.js';

/** Bytes read from the overlay and written to the base per step. */
const CHUNK_BYTES = 4 * 1024 * 1024;
/** Steps whose writes may be in flight at once. */
const CHUNKS_IN_FLIGHT = 4;

export interface CommitOptions {
  /**
   * The image to commit into: a layer of the overlay's backing chain, opened writable
   * (openImage's writableDepth). Default: the overlay's immediate backing file.
   */
  base?: Image;
  /** Leave the overlay as it is instead of emptying it (qemu-img commit -d; implied by -b). */
  drop?: boolean;
  /** Bytes of data written into the base per second at most (qemu-img commit -r); 0 or absent: no limit. */
  rateLimit?: number;
  /** Bytes handled so far out of the total to commit (data and zeros), after each step. */
  onProgress?: (done: number, total: number) => void;
}

/**
 * Commits `top` into `options.base` (or its backing file). `top` must be opened writable unless
 * `drop` is set; the base must be opened writable.
 */
export async function commitImage(top: Image, options: CommitOptions = {}): Promise<void> {
  const base = options.base ?? top.backing;
  if (!base) throw new UsageError('Image does not have a backing file');
  let found = false;
  for (let l = top.backing; l; l = l.backing) if (l === base) found = true;
  if (!found) throw new UsageError('The base is not in the backing chain of the image');
  if (base.readOnly) throw new UsageError(`${base.storage.name}: cannot commit: the base is open read-only`);
  if (!options.drop && top.readOnly) throw new UsageError(`${top.storage.name}: cannot empty: the image is open read-only`);

  const size = top.virtualSize;
  // As the commit job: a smaller base is grown to the overlay's size before anything is copied.
  if (base.virtualSize < size) await base.resize(size);

  // As the commit job's dirty bitmap: what the layers above the base allocate, widened to whole
  // chunks of the job's granularity (the base's cluster size within 4 KiB..64 KiB; 64 KiB for raw).
  // Each chunk is then copied as the whole chain reads it: data as data, zeros as zero writes.
  const granularity = Math.min(65536, Math.max(4096, (await base.info()).clusterSize ?? 65536));
  let baseDepth = 0;
  for (let l: Image | null = top; l !== base; l = l!.backing) baseDepth++;
  let total = 0;
  await forDirtyRanges(top, base, size, granularity, async (start, end) => {
    total += end - start;
  });
  options.onProgress?.(0, total);

  const throttle = options.rateLimit ? new WriteThrottle(options.rateLimit) : null;
  // Chunks in flight: each has its own buffer; a chunk is read while earlier ones are still being
  // written (the base's writer keeps their order). Memory: CHUNKS_IN_FLIGHT × CHUNK_BYTES.
  const free: Uint8Array[] = [];
  for (let k = 0; k < CHUNKS_IN_FLIGHT; k++) free.push(new Uint8Array(Math.min(CHUNK_BYTES, size)));
  const inflight: Promise<void>[] = [];
  // The chunk being gathered: runs to copy into one buffer (starts and lengths, flat).
  const runStarts: number[] = [];
  const runLengths: number[] = [];
  let filled = 0;
  let done = 0;

  const flushChunk = async (): Promise<void> => {
    if (filled === 0) return;
    while (free.length === 0) await inflight.shift();
    const buf = free.pop()!;
    const starts = runStarts.splice(0);
    const lengths = runLengths.splice(0);
    const bytes = filled;
    filled = 0;
    const reads: Promise<void>[] = [];
    for (let i = 0, at = 0; i < starts.length; at += lengths[i]!, i++) {
      reads.push(top.readInto(buf.subarray(at, at + lengths[i]!), starts[i]!));
    }
    await Promise.all(reads);
    if (throttle) await throttle.admit(bytes);
    const writes: Promise<void>[] = [];
    for (let i = 0, at = 0; i < starts.length; at += lengths[i]!, i++) {
      writes.push(base.write(starts[i]!, buf.subarray(at, at + lengths[i]!)));
    }
    const written = Promise.all(writes).then(() => {
      done += bytes;
      options.onProgress?.(done, total);
      free.push(buf);
    });
    written.catch(() => undefined);
    inflight.push(written);
  };
  /** Waits for every chunk in flight (and reports the first failure). */
  const drain = async (): Promise<void> => {
    while (inflight.length > 0) await inflight.shift();
  };

  await forDirtyRanges(top, base, size, granularity, async (start, end) => {
    for (let pos = start; pos < end; ) {
      const st = await top.blockStatusAt(pos, Math.min(end - pos, CHUNK_BYTES - filled));
      if (st.depth === baseDepth && !st.zero) {
        // The base's own data: copying it onto itself changes nothing (and would read clusters
        // of the base while its earlier writes may still be in flight).
        done += st.length;
      } else if (st.zero) {
        await flushChunk();
        await drain();
        await base.writeZeroes(pos, st.length, { mayUnmap: true });
        done += st.length;
        options.onProgress?.(done, total);
      } else {
        const last = runStarts.length - 1;
        if (last >= 0 && runStarts[last]! + runLengths[last]! === pos) runLengths[last]! += st.length;
        else {
          runStarts.push(pos);
          runLengths.push(st.length);
        }
        filled += st.length;
        if (filled === CHUNK_BYTES) await flushChunk();
      }
      pos += st.length;
    }
  });
  await flushChunk();
  await drain();
  await base.flush();
  // Only once the base holds everything may the overlay stop holding it.
  if (!options.drop) await top.makeEmpty();
}

/**
 * Calls fn(start, end) for each maximal range of granularity-aligned chunks holding a byte that
 * the layers above the base allocate (in order). Past the end of a layer between the overlay and
 * the base, that layer counts as allocating zeros (QEMU's block status beyond a short backing file).
 */
async function forDirtyRanges(top: Image, base: Image, size: number, granularity: number,
  fn: (start: number, end: number) => Promise<void>): Promise<void> {
  let dirtyStart = -1;
  let dirtyEnd = -1;
  for (let pos = 0; pos < size; ) {
    const run = await allocatedAbove(top, base, pos, size - pos);
    if (run.allocated) {
      const a = Math.floor(pos / granularity) * granularity;
      const b = Math.min(size, Math.ceil((pos + run.length) / granularity) * granularity);
      if (dirtyEnd >= a) {
        dirtyEnd = Math.max(dirtyEnd, b);
      } else {
        if (dirtyEnd > dirtyStart) await fn(dirtyStart, dirtyEnd);
        dirtyStart = a;
        dirtyEnd = b;
      }
    }
    pos += run.length;
  }
  if (dirtyEnd > dirtyStart) await fn(dirtyStart, dirtyEnd);
}

/** Whether the layers above the base allocate the run at offset (data, zeros, compressed), and how far that holds. */
async function allocatedAbove(top: Image, base: Image, offset: number, maxLength: number): Promise<{ allocated: boolean; length: number }> {
  let length = maxLength;
  let layer: Image = top;
  for (;;) {
    const m = await layer.driver.getMapping(offset, length);
    length = Math.min(length, m.length);
    if (m.kind !== 'unallocated') return { allocated: true, length };
    const next = layer.backing;
    if (!next || next === base) return { allocated: false, length };
    if (offset >= next.virtualSize) return { allocated: true, length };
    length = Math.min(length, next.virtualSize - offset);
    layer = next;
  }
}
