// Comparing the guest contents of two images, as qemu-img 7.2's compare does: both images' block
// status is walked side by side; ranges that read as zeros on both sides are never read, ranges
// allocated on one side only are checked for zeros, the rest is read from both and compared. The
// answer (first differing offset, strict-mode verdicts, progress steps) is qemu-img's: the walk
// takes QEMU's steps, while the reads behind it are batched into large requests.

import type { BlockStatus, Image } from './image.js';
import { QimgError, type QimgErrorCode } from './errors.js';

/** qemu-img's IO_BUF_SIZE: the most one step reads, and so the granularity of its progress. */
const STEP_BYTES = 2 * 1024 * 1024;
/** qemu-img reports a difference at the start of the first differing 512-byte sector of a step. */
const SECTOR = 512;
/** qcow2's block status answers at most INT_MAX bytes per call (qcow2_co_block_status). */
const QCOW2_STATUS_LIMIT = 2 ** 31 - 1;
/**
 * Bytes read from each image per batch: steps are gathered until their reads reach this, so a
 * fragmented image costs one batch (and one request per image per run of adjacent clusters) per
 * 2 MiB, not one await per cluster. Two batches are in flight (one read while the other is
 * compared), each with a buffer per image of this plus one step. Small enough for the bytes to
 * still be in the CPU cache when compared: with 8 MiB batches (32 MiB of buffers), comparing the
 * 2 GiB bench pair took 0.25 s of memcmp instead of 0.07 s, and ~15% more CPU in all.
 */
const BATCH_BYTES = 2 * 1024 * 1024;
/** Steps per batch: bounds the step arrays of a batch over a fragmented image. */
const MAX_STEPS = 4096;
/**
 * The first block status query over a raw file looks this far: probing a raw file lists its
 * data/hole extents over the whole range asked, so an unbounded query at every step would list
 * the rest of the file each time. Longer runs are found by widening the query (see rawStatus).
 */
const RAW_PROBE_BYTES = 4 * 1024 * 1024;

// QEMU's block status bits (include/block/block-common.h), which strict mode compares whole.
const STATUS_DATA = 0x01;
const STATUS_ZERO = 0x02;
const STATUS_OFFSET_VALID = 0x04;
const STATUS_ALLOCATED = 0x10;
const STATUS_EOF = 0x20;

export interface CompareOptions {
  /**
   * qemu-img compare -s: images of different sizes differ, and so do ranges whose block status
   * differs (allocated vs unallocated, zero clusters vs data, ...) even when their bytes are equal.
   */
  strict?: boolean;
  /**
   * Called after each step of the walk, in order (qemu-img's progress steps: at most 2 MiB where
   * bytes are read, a whole run where both sides read as zeros). Steps cover [0, max size).
   */
  onProgress?: (offset: number, length: number) => void;
  /**
   * Called when the common part compared equal and the longer image's tail is about to be checked
   * (qemu-img prints "Warning: Image size mismatch!" at this point).
   */
  onSizeMismatch?: () => void;
}

/**
 * The verdict. `content`: the bytes differ; `offset` is qemu-img's: the start of the first
 * differing 512-byte sector, counted from the start of the step it lies in. `size` and `status`
 * come from strict mode only (`status` at the start of the first step whose block status differs).
 */
export type CompareResult =
  | { kind: 'identical' }
  | { kind: 'content'; offset: number }
  | { kind: 'size' }
  | { kind: 'status'; offset: number };

/**
 * A failure while comparing: `stage` 'block-status' (qemu-img exit status 3) or 'read' (exit
 * status 4), `image` 0 for the first image and 1 for the second, `offset` where the query or
 * the read started. `cause` is the underlying error.
 */
export class CompareError extends QimgError {
  readonly stage: 'block-status' | 'read';
  readonly image: 0 | 1;
  readonly offset: number;
  constructor(stage: 'block-status' | 'read', image: 0 | 1, offset: number, cause: unknown) {
    const why = cause instanceof Error ? cause.message : String(cause);
    const what = stage === 'read' ? `reading offset ${offset}` : `block status at offset ${offset}`;
    const code: QimgErrorCode = cause instanceof QimgError ? cause.code : 'IO';
    const errno = cause instanceof QimgError ? cause.data.errno : (cause as { code?: unknown } | null)?.code;
    super(code, `Error while ${what} of image ${image + 1}: ${why}`, {
      stage, image, offset, ...(typeof errno === 'string' ? { errno } : {}),
    }, { cause });
    this.name = 'CompareError';
    this.stage = stage;
    this.image = image;
    this.offset = offset;
  }
}

// What a step does. SKIP: both sides read as zeros (nothing read). BOTH: read and compare both.
// ONLY_A / ONLY_B: read that side and check it for zeros (the other side reads as zeros: it is
// unallocated through its whole chain, or past its end). TAIL: no bytes; the tail starts here.
const SKIP = 0;
const BOTH = 1;
const ONLY_A = 2;
const ONLY_B = 3;
const TAIL = 4;

/** A run of QEMU's block status: its flags (as compared by strict mode) and length. */
interface Status {
  flags: number;
  length: number;
}

type Terminal =
  | { kind: 'end' }
  | { kind: 'status'; offset: number }
  | { kind: 'error'; error: CompareError };

/** Steps planned together and read with few large requests; arrays reused from batch to batch. */
class Batch {
  count = 0;
  /** Buffer bytes taken by the read steps. */
  used = 0;
  readonly offsets = new Float64Array(MAX_STEPS);
  readonly lengths = new Float64Array(MAX_STEPS);
  readonly kinds = new Uint8Array(MAX_STEPS);
  /** Where a read step's bytes are in bufA/bufB. */
  readonly bufPos = new Float64Array(MAX_STEPS);
  bufA: Buffer | null = null;
  bufB: Buffer | null = null;
  reads: Promise<void>[] = [];
  terminal: Terminal | null = null;

  reset(): void {
    this.count = 0;
    this.used = 0;
    this.reads = [];
    this.terminal = null;
  }

  push(kind: number, offset: number, length: number): void {
    const i = this.count++;
    this.kinds[i] = kind;
    this.offsets[i] = offset;
    this.lengths[i] = length;
    this.bufPos[i] = this.used;
    if (kind === BOTH || kind === ONLY_A || kind === ONLY_B) this.used += length;
  }
}

/**
 * Compares the guest contents of two open images as qemu-img compare does (see CompareResult).
 * Reads and block status queries that fail reject with a CompareError. Memory stays bounded
 * (four 4 MiB buffers at most) whatever the images' sizes.
 */
export async function compareImages(a: Image, b: Image, options: CompareOptions = {}): Promise<CompareResult> {
  const sizeA = a.virtualSize;
  const sizeB = b.virtualSize;
  if (options.strict && sizeA !== sizeB) return { kind: 'size' };
  const walk = new Walk(a, b, options.strict ?? false);
  const windowBytes = Math.min(BATCH_BYTES + STEP_BYTES, Math.ceil(Math.max(sizeA, sizeB, 1) / SECTOR) * SECTOR);
  let current = new Batch();
  let next: Batch | null = null;
  let spare = new Batch();
  try {
    await walk.plan(current);
    startReads(a, b, current, windowBytes);
    for (;;) {
      // The next batch is planned and its reads started while this one's reads complete.
      if (!current.terminal) {
        next = spare;
        await walk.plan(next);
        startReads(a, b, next, windowBytes);
      }
      const found = await verify(a, b, current, options);
      if (found) return found;
      const t = current.terminal;
      if (t) {
        if (t.kind === 'end') return { kind: 'identical' };
        if (t.kind === 'status') return { kind: 'status', offset: t.offset };
        throw t.error;
      }
      spare = current;
      current = next!;
      next = null;
    }
  } finally {
    // Reads still in flight (a batch planned ahead of a difference) end before the caller may
    // close the images.
    await Promise.allSettled(current.reads);
    if (next) await Promise.allSettled(next.reads);
  }
}

/** QEMU's walk over both images: which step comes next and what it does. */
class Walk {
  private offset = 0;
  private inTail = false;
  private readonly minSize: number;
  private readonly maxSize: number;
  private readonly cacheA: RunCache = { start: 0, end: 0, flags: 0 };
  private readonly cacheB: RunCache = { start: 0, end: 0, flags: 0 };

  constructor(private readonly a: Image, private readonly b: Image, private readonly strict: boolean) {
    this.minSize = Math.min(a.virtualSize, b.virtualSize);
    this.maxSize = Math.max(a.virtualSize, b.virtualSize);
  }

  /** Fills batch with steps until its reads reach BATCH_BYTES, MAX_STEPS, or the walk ends. */
  async plan(batch: Batch): Promise<void> {
    batch.reset();
    // Room for one more step (it may be the tail marker); the buffers have room for one more read.
    while (batch.count < MAX_STEPS - 1 && batch.used < BATCH_BYTES) {
      const offset = this.offset;
      if (!this.inTail) {
        if (offset >= this.minSize) {
          if (this.minSize === this.maxSize) {
            batch.terminal = { kind: 'end' };
            return;
          }
          this.inTail = true;
          batch.push(TAIL, offset, 0);
          continue;
        }
        let s1: Status;
        let s2: Status;
        try {
          s1 = await statusAbove(this.a, offset, this.cacheA);
        } catch (e) {
          batch.terminal = { kind: 'error', error: new CompareError('block-status', 0, offset, e) };
          return;
        }
        try {
          s2 = await statusAbove(this.b, offset, this.cacheB);
        } catch (e) {
          batch.terminal = { kind: 'error', error: new CompareError('block-status', 1, offset, e) };
          return;
        }
        if (this.strict && s1.flags !== s2.flags) {
          batch.terminal = { kind: 'status', offset };
          return;
        }
        let chunk = Math.min(s1.length, s2.length);
        const allocated1 = (s1.flags & STATUS_ALLOCATED) !== 0;
        const allocated2 = (s2.flags & STATUS_ALLOCATED) !== 0;
        let kind = SKIP;
        if ((s1.flags & s2.flags & STATUS_ZERO) !== 0) kind = SKIP;
        else if (allocated1 === allocated2) kind = allocated1 ? BOTH : SKIP;
        else kind = allocated1 ? ONLY_A : ONLY_B;
        if (kind !== SKIP) chunk = Math.min(chunk, STEP_BYTES);
        batch.push(kind, offset, chunk);
        this.offset = offset + chunk;
      } else {
        if (offset >= this.maxSize) {
          batch.terminal = { kind: 'end' };
          return;
        }
        // Past the shorter image, the longer one must read as zeros.
        const overIsA = this.a.virtualSize > this.b.virtualSize;
        let s: Status;
        try {
          s = overIsA ? await statusAbove(this.a, offset, this.cacheA) : await statusAbove(this.b, offset, this.cacheB);
        } catch (e) {
          batch.terminal = { kind: 'error', error: new CompareError('block-status', overIsA ? 0 : 1, offset, e) };
          return;
        }
        let chunk = s.length;
        let kind = SKIP;
        if ((s.flags & STATUS_ALLOCATED) !== 0 && (s.flags & STATUS_ZERO) === 0) {
          kind = overIsA ? ONLY_A : ONLY_B;
          chunk = Math.min(chunk, STEP_BYTES);
        }
        batch.push(kind, offset, chunk);
        this.offset = offset + chunk;
      }
    }
  }
}

/**
 * The last run block status found for an image. Asked again from inside it, QEMU's answer is the
 * rest of the same run (runs end where the mapping changes, at an L2 table's end, or at a raw
 * file's extent's end), so that is answered without asking the image: a qcow2 run is otherwise
 * walked entry by entry from each step to its end, over and over.
 */
interface RunCache {
  start: number;
  end: number;
  flags: number;
}

/**
 * QEMU's bdrv_block_status_above(image, NULL, offset, size - offset): the run at offset through
 * the whole chain, with the flags strict mode compares.
 */
async function statusAbove(image: Image, offset: number, cache: RunCache): Promise<Status> {
  if (offset >= cache.start && offset < cache.end) return { flags: cache.flags, length: cache.end - offset };
  const size = image.virtualSize;
  let st: BlockStatus;
  let length: number;
  let asked = size - offset;
  if (image.format === 'raw') {
    ({ st, length } = await rawStatus(image, offset));
  } else {
    if (image.format === 'qcow2') asked = Math.min(asked, QCOW2_STATUS_LIMIT);
    st = await image.blockStatusAt(offset, asked);
    length = st.length;
  }
  const flags = statusFlags(image, st, offset + length);
  // Only a run that ended for a reason of its own (not the length asked) ends there again.
  if (length < asked || offset + length === size) {
    cache.start = offset;
    cache.end = offset + length;
    cache.flags = flags;
  }
  return { flags, length };
}

/** The flags of QEMU's answer for a run of block status ending at `end`. */
function statusFlags(image: Image, st: BlockStatus, end: number): number {
  let flags = (st.data ? STATUS_DATA : 0) | (st.zero ? STATUS_ZERO : 0) | (st.hostOffset !== undefined ? STATUS_OFFSET_VALID : 0);
  if (st.present) {
    flags |= STATUS_ALLOCATED;
  } else {
    let layer: Image = image;
    for (let d = 0; d < st.depth; d++) layer = layer.backing!;
    if (layer.backing) {
      // Past the end of a shorter backing file: QEMU's chain walk finds that file's end and calls
      // the range zeros allocated there (nothing else of the status survives).
      flags = STATUS_ZERO | STATUS_ALLOCATED;
    } else if (end === layer.virtualSize) {
      // Unallocated down to the last layer: that layer's own status is the answer, end of file included.
      flags |= STATUS_EOF;
    }
  }
  if (end === image.virtualSize) flags |= STATUS_EOF;
  return flags;
}

/**
 * Block status of a raw image at offset, as long as QEMU's (a whole data or hole extent of the
 * file) but found with bounded queries: a first short one, then wider ones while the run goes on.
 */
async function rawStatus(image: Image, offset: number): Promise<{ st: BlockStatus; length: number }> {
  const size = image.virtualSize;
  let asked = Math.min(size - offset, RAW_PROBE_BYTES);
  const st = await image.blockStatusAt(offset, asked);
  let length = st.length;
  while (length === asked && offset + length < size) {
    const at = offset + length;
    const more = Math.min(size - at, length);
    const next = await image.blockStatusAt(at, more);
    if (next.data !== st.data || next.zero !== st.zero) break;
    length += next.length;
    if (next.length < more) break;
    asked = length;
  }
  return { st, length };
}

/** Starts the reads of a batch's steps: one request per image per run of adjacent steps that read it. */
function startReads(a: Image, b: Image, batch: Batch, windowBytes: number): void {
  if (batch.used === 0) return;
  batch.bufA ??= Buffer.allocUnsafe(windowBytes);
  batch.bufB ??= Buffer.allocUnsafe(windowBytes);
  readSide(a, batch, batch.bufA, ONLY_A);
  readSide(b, batch, batch.bufB, ONLY_B);
}

function readSide(image: Image, batch: Batch, buf: Buffer, only: number): void {
  let runStart = -1;
  let runPos = 0;
  let runLen = 0;
  const flush = (): void => {
    if (runLen > 0) batch.reads.push(image.readInto(buf.subarray(runPos, runPos + runLen), runStart));
    runLen = 0;
  };
  for (let i = 0; i < batch.count; i++) {
    const kind = batch.kinds[i]!;
    if (kind === SKIP || kind === TAIL) continue;
    const offset = batch.offsets[i]!;
    const length = batch.lengths[i]!;
    const pos = batch.bufPos[i]!;
    if (kind === BOTH || kind === only) {
      if (runLen > 0 && runStart + runLen === offset && runPos + runLen === pos) {
        runLen += length;
      } else {
        flush();
        runStart = offset;
        runPos = pos;
        runLen = length;
      }
    } else {
      // The other side's step: this side reads as zeros there.
      flush();
      buf.fill(0, pos, pos + length);
    }
  }
  flush();
}

/**
 * Waits for a batch's reads and checks its steps in order: progress for each step that matches,
 * the verdict at the first that does not. A failed read sends the batch through the slow path.
 */
async function verify(a: Image, b: Image, batch: Batch, options: CompareOptions): Promise<CompareResult | null> {
  if (batch.reads.length > 0) {
    const settled = await Promise.allSettled(batch.reads);
    if (settled.some((r) => r.status === 'rejected')) {
      // Requests still running may write into these buffers later: the next batch gets new ones.
      batch.bufA = null;
      batch.bufB = null;
      return verifySlowly(a, b, batch, options);
    }
  }
  const bufA = batch.bufA;
  const bufB = batch.bufB;
  const allEqual = batch.used === 0 || bufA!.compare(bufB!, 0, batch.used, 0, batch.used) === 0;
  const { onProgress, onSizeMismatch } = options;
  if (allEqual && !onProgress && !onSizeMismatch) return null;
  for (let i = 0; i < batch.count; i++) {
    const kind = batch.kinds[i]!;
    const offset = batch.offsets[i]!;
    const length = batch.lengths[i]!;
    if (kind === TAIL) {
      onSizeMismatch?.();
      continue;
    }
    if (!allEqual && kind !== SKIP) {
      const pos = batch.bufPos[i]!;
      const at = firstDifferentSector(bufA!, bufB!, pos, length);
      if (at >= 0) return { kind: 'content', offset: offset + at };
    }
    onProgress?.(offset, length);
  }
  return null;
}

/**
 * The steps of a batch one by one, each read on its own (the first image before the second, as
 * qemu-img), so that a failure names the step qemu-img would name and a difference before it wins.
 */
async function verifySlowly(a: Image, b: Image, batch: Batch, options: CompareOptions): Promise<CompareResult | null> {
  const size = Math.min(STEP_BYTES, Math.max(...batch.lengths.subarray(0, batch.count), 0));
  const bufA = Buffer.alloc(size);
  const bufB = Buffer.alloc(size);
  for (let i = 0; i < batch.count; i++) {
    const kind = batch.kinds[i]!;
    const offset = batch.offsets[i]!;
    const length = batch.lengths[i]!;
    if (kind === TAIL) {
      options.onSizeMismatch?.();
      continue;
    }
    if (kind !== SKIP) {
      const sideA = bufA.subarray(0, length);
      const sideB = bufB.subarray(0, length);
      if (kind === ONLY_B) sideA.fill(0);
      else await a.readInto(sideA, offset).catch((e: unknown) => Promise.reject(new CompareError('read', 0, offset, e)));
      if (kind === ONLY_A) sideB.fill(0);
      else await b.readInto(sideB, offset).catch((e: unknown) => Promise.reject(new CompareError('read', 1, offset, e)));
      const at = firstDifferentSector(sideA, sideB, 0, length);
      if (at >= 0) return { kind: 'content', offset: offset + at };
    }
    options.onProgress?.(offset, length);
  }
  return null;
}

/**
 * Where in [pos, pos+length) the first 512-byte sector (counted from pos; the last may be short)
 * that differs starts, relative to pos; -1 when none does. memcmp over the whole range first.
 */
function firstDifferentSector(bufA: Buffer, bufB: Buffer, pos: number, length: number): number {
  const end = pos + length;
  if (bufA.compare(bufB, pos, end, pos, end) === 0) return -1;
  // Narrow down in halves (each a memcmp), then sector by sector within the last 64 KiB.
  let lo = pos;
  let hi = end;
  while (hi - lo > 64 * 1024) {
    const mid = lo + Math.floor((hi - lo) / 2 / SECTOR) * SECTOR;
    if (bufA.compare(bufB, lo, mid, lo, mid) !== 0) hi = mid;
    else lo = mid;
  }
  for (let s = lo; s < hi; s += SECTOR) {
    const e = Math.min(s + SECTOR, end);
    if (bufA.compare(bufB, s, e, s, e) !== 0) return s - pos;
  }
  return -1;
}
