// Helpers for the write-engine tests (model-based property test, crash test): the guest-disk
// model with QEMU 7.2's write / zero / discard semantics, deterministic data patterns, and
// `qemu-img check` parsing. Pure functions at the top (the crash writer bundles them into a child
// process, so nothing here may import vitest or the qemu helpers at module level).

import type { Image } from '../../src/image.js';
import type { Storage, StorageGate } from '../../src/io/storage.js';
import * as openModule from '../../src/open.js';

/** The write engine's public surface, as the tests use it (declared here so the tests compile before it lands). */
export interface WritableImage {
  readonly virtualSize: number;
  read(offset: number, length: number): Promise<Uint8Array>;
  write(offset: number, data: Uint8Array): Promise<void>;
  writeZeroes(offset: number, length: number, options?: { mayUnmap?: boolean }): Promise<void>;
  discard(offset: number, length: number): Promise<void>;
  writeCompressed(offset: number, data: Uint8Array): Promise<void>;
  flush(): Promise<void>;
  close(): Promise<void>;
}

/** Thrown when src/ does not yet provide what a test needs (the message says what is missing). */
export class EngineMissing extends Error {}

/** Opens an image writable through the library; fails with EngineMissing while Image lacks the write API. */
export async function openWritable(
  target: string | Storage,
  options: { format?: 'qcow2' | 'raw'; gate?: StorageGate } = {},
): Promise<WritableImage> {
  const open = (openModule as Record<string, unknown>).openImage as typeof openModule.openImage;
  const { image } = await open(target, { ...options, readOnly: false });
  const missing = ['write', 'writeZeroes', 'discard', 'flush'].filter(
    (m) => typeof (image as unknown as Record<string, unknown>)[m] !== 'function',
  );
  if (missing.length > 0) {
    await image.close().catch(() => undefined);
    throw new EngineMissing(`write engine not landed: Image has no ${missing.join(', ')} (src/image.ts)`);
  }
  return image as unknown as WritableImage & Image;
}

/** mulberry32: a small seeded PRNG (test/helpers/qemu.ts re-exports it; here because the crash child bundles this file without vitest). */
export function prng(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

/** Integer in [lo, hi] from a prng. */
export function randInt(rand: () => number, lo: number, hi: number): number {
  return lo + Math.floor(rand() * (hi - lo + 1));
}

/**
 * Data of a write, a pure function of (fill, len): fill 0 = zeros, 1..255 = that byte, > 255 =
 * pseudo-random bytes seeded by fill (xorshift32, 4 bytes per step; no byte-period shorter than the buffer).
 */
export function patternBytes(fill: number, len: number): Uint8Array {
  const buf = new Uint8Array(len);
  if (fill === 0) return buf;
  if (fill <= 255) return buf.fill(fill);
  let x = (fill ^ 0x9e3779b9) >>> 0 || 1;
  const words = len >>> 2;
  const view = new DataView(buf.buffer);
  for (let i = 0; i < words; i++) {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    x >>>= 0;
    view.setUint32(i * 4, x, true);
  }
  for (let i = words * 4; i < len; i++) {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    x >>>= 0;
    buf[i] = x & 0xff;
  }
  return buf;
}

/** An operation on the guest disk (the shapes both tests use; `len` bytes at `off`). */
export type DiskOp =
  | { k: 'write'; off: number; len: number; fill: number }
  | { k: 'zero'; off: number; len: number; unmap: boolean }
  | { k: 'discard'; off: number; len: number }
  | { k: 'compressed'; off: number; len: number; fill: number }
  | { k: 'flush' }
  | { k: 'reopen' };

export function describeOp(op: DiskOp): string {
  switch (op.k) {
    case 'write':
      return `write(${op.off}, ${op.len}, fill=${op.fill})`;
    case 'zero':
      return `writeZeroes(${op.off}, ${op.len}${op.unmap ? ', mayUnmap' : ''})`;
    case 'discard':
      return `discard(${op.off}, ${op.len})`;
    case 'compressed':
      return `writeCompressed(${op.off}, ${op.len}, fill=${op.fill})`;
    case 'flush':
      return 'flush()';
    case 'reopen':
      return 'close()+reopen';
  }
}

export interface DiskShape {
  virtualSize: number;
  clusterSize: number;
  /** qcow2 version: 2 = compat 0.10 (no zero flag). */
  version: 2 | 3;
  hasBacking: boolean;
}

/**
 * The guest bytes QEMU 7.2 discards for discard(off, len): whole clusters inside the range, plus
 * the partial last cluster when the range starts it and runs to the end of the disk (block layer
 * splitting at pdiscard_alignment = cluster size; qcow2_co_pdiscard refuses the rest). On v2 with
 * a backing file qcow2_co_pdiscard refuses everything (no zero flag: it would expose backing data).
 * A discarded range then reads as zeros: v3 sets the zero flag (or, without backing, frees
 * unallocated/allocated clusters to unallocated), v2 without backing leaves them unallocated.
 */
export function discardedRange(s: DiskShape, off: number, len: number): [number, number] | null {
  if (s.version < 3 && s.hasBacking) return null;
  const cs = s.clusterSize;
  const start = Math.ceil(off / cs) * cs;
  let end = Math.floor((off + len) / cs) * cs;
  if (off + len === s.virtualSize) end = s.virtualSize;
  return start < end ? [start, end] : null;
}

/** Applies a data-changing op to the model bytes (flush/reopen change nothing). */
export function applyOp(model: Uint8Array, s: DiskShape, op: DiskOp): void {
  switch (op.k) {
    case 'write':
    case 'compressed':
      model.set(patternBytes(op.fill, op.len), op.off);
      break;
    case 'zero':
      model.fill(0, op.off, op.off + op.len);
      break;
    case 'discard': {
      const r = discardedRange(s, op.off, op.len);
      if (r) model.fill(0, r[0], r[1]);
      break;
    }
    default:
      break;
  }
}

/** Runs one op against the engine. */
export async function runOp(image: WritableImage, op: DiskOp): Promise<void> {
  switch (op.k) {
    case 'write':
      await image.write(op.off, patternBytes(op.fill, op.len));
      break;
    case 'compressed':
      await image.writeCompressed(op.off, patternBytes(op.fill, op.len));
      break;
    case 'zero':
      await image.writeZeroes(op.off, op.len, { mayUnmap: op.unmap });
      break;
    case 'discard':
      await image.discard(op.off, op.len);
      break;
    case 'flush':
      await image.flush();
      break;
    case 'reopen':
      break; // the caller closes and reopens
  }
}

/** What `qemu-img check` said, parsed. */
export interface CheckResult {
  code: number;
  output: string;
  /** Lines starting with ERROR (or "N errors were found"). */
  errorLines: string[];
  leaked: number;
  clean: boolean;
}

export function parseCheck(code: number, stdout: string, stderr: string): CheckResult {
  const output = `${stdout}${stderr}`;
  const errorLines = output.split('\n').filter((l) => /^ERROR|errors were found|corrupt/i.test(l) && !/^No errors/.test(l));
  const m = /(\d+) leaked clusters? were found/.exec(output);
  const leaked = m ? Number(m[1]) : 0;
  const clean = code === 0 && /No errors were found on the image\./.test(output) && !/leaked cluster/.test(output);
  return { code, output, errorLines, leaked, clean };
}

/**
 * Refcount-only damage, which a crash of an image with lazy refcounts may leave behind (QEMU
 * rebuilds refcounts when it next opens the dirty image writable): refcount ≠ references, the
 * OFLAG_COPIED bit disagreeing with a refcount, leaks.
 */
export function isRefcountOnlyError(line: string): boolean {
  return (
    /^ERROR cluster \d+ refcount=\d+ reference=\d+$/.test(line) ||
    /^ERROR OFLAG_COPIED (data|L2) cluster: .*refcount=\d+$/.test(line) ||
    /^\d+ errors were found on the image\.$/.test(line) ||
    /^Data may be corrupted, or further writes to the image may corrupt it\.$/.test(line)
  );
}

/** First differing byte of two equal-length buffers, or -1. */
export function firstDiff(a: Uint8Array, b: Uint8Array): number {
  if (a.length !== b.length) return Math.min(a.length, b.length);
  if (Buffer.from(a.buffer, a.byteOffset, a.length).equals(Buffer.from(b.buffer, b.byteOffset, b.length))) return -1;
  let i = 0;
  while (a[i] === b[i]) i++;
  return i;
}

/** "at 0x…: expected … got …" for a mismatch at i. */
export function describeDiff(label: string, got: Uint8Array, expected: Uint8Array, i: number): string {
  let j = i;
  while (j < got.length && j < expected.length && got[j] !== expected[j]) j++;
  const hex = (b: Uint8Array): string => Array.from(b.subarray(i, Math.min(i + 8, b.length)), (x) => x.toString(16).padStart(2, '0')).join(' ');
  return `${label}: first mismatch at guest offset ${i} (0x${i.toString(16)}): expected ${hex(expected)} got ${hex(got)} (${j - i} bytes differ in a row; lengths ${expected.length}/${got.length})`;
}

// ---- resize (the write-model property; kept apart from DiskOp, whose users switch over it exhaustively)

export type Preallocation = 'off' | 'metadata' | 'falloc' | 'full';

/** A resize to `size` bytes (a multiple of 512; smaller = shrink, always with prealloc 'off'). */
export interface ResizeOp {
  k: 'resize';
  size: number;
  prealloc: Preallocation;
}

/** The disk as a resize sees it: the backing file's virtual size too (0 without one). */
export interface ResizeShape extends DiskShape {
  backingSize: number;
}

/** An image that can also be resized (src/image.ts Image). */
export interface ResizableImage extends WritableImage {
  resize(size: number, options: { shrink?: boolean; preallocation?: Preallocation }): Promise<void>;
}

export function describeResize(op: ResizeOp): string {
  return `resize(${op.size}${op.prealloc !== 'off' ? `, ${op.prealloc}` : ''})`;
}

/** QEMU 7.2's words when it refuses a resize the model can predict (see resizeRefusal). */
export const ZERO_FILL_REFUSED = 'Failed to zero out new clusters: Operation not supported';

/**
 * Why QEMU 7.2 refuses the resize (null: it does it). Growing over a backing file that reaches
 * past the old end, QEMU zero-fills the new range; v2 has no zero flag, so with prealloc off or
 * metadata (falloc/full allocate zeroed data clusters instead) it fails once the range passes the
 * old last cluster, and the size stays. (Extended L2 also refuses to split a compressed cluster
 * holding the old end into zero subclusters: the model does not track compressed clusters, so a
 * caller drawing resizes must avoid that case.)
 */
export function resizeRefusal(s: ResizeShape, op: ResizeOp): string | null {
  const old = s.virtualSize;
  if (op.size <= old || s.version >= 3 || s.backingSize <= old) return null;
  if (op.prealloc !== 'off' && op.prealloc !== 'metadata') return null;
  return op.size > Math.ceil(old / s.clusterSize) * s.clusterSize ? ZERO_FILL_REFUSED : null;
}

/**
 * The guest disk after a resize QEMU does: cut at the new size, or grown with zeros, whatever
 * the backing file holds there (QEMU zero-fills where it reaches; qimg also zeroes bytes a shrink
 * left in the old last cluster, which QEMU 7.2 would show again). Returns a new array.
 */
export function applyResize(model: Uint8Array, op: ResizeOp): Uint8Array {
  const next = new Uint8Array(op.size);
  next.set(model.subarray(0, Math.min(model.length, op.size)));
  return next;
}

/** Runs a resize against the engine (shrinking allowed). */
export async function runResize(image: ResizableImage, op: ResizeOp): Promise<void> {
  await image.resize(op.size, { shrink: op.size < image.virtualSize, preallocation: op.prealloc });
}
