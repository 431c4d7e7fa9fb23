// An in-memory Storage: growable and sparse (fixed-size chunks in a Map; absent chunks are holes).

import type { Storage, StorageExtent } from './storage.js';
import { extentCollector } from './storage.js';
import { checkOpen, checkRange, checkWritable } from './check.js';
import { isZero } from './zero.js';

export interface MemoryStorageOptions {
  /** Shown to users where a file name would be; also what relative names resolve against. */
  name?: string;
  readOnly?: boolean;
  /** Allocation granularity, a power of two >= 512 (default 64 KiB). */
  chunkSize?: number;
}

const DEFAULT_CHUNK_SIZE = 64 * 1024;

/**
 * Bytes in memory, stored as chunks keyed by chunk index so that a huge, mostly empty address space
 * (a 16 TiB image's metadata) costs only the chunks written. Absent chunks read as zeros and are
 * reported as holes; `allocatedSize` is chunks present × chunk size.
 *
 * `close` only marks the storage closed; the bytes stay reachable through `toUint8Array`.
 */
export class MemoryStorage implements Storage {
  readonly name: string;
  readonly readOnly: boolean;
  readonly chunkSize: number;
  private readonly chunks = new Map<number, Uint8Array>();
  /** Sorted chunk indices, rebuilt lazily after allocation or deallocation. */
  private sortedIndices: number[] | null = [];
  private byteSize = 0;
  private closed = false;

  constructor(initial?: Uint8Array, options: MemoryStorageOptions | string = {}) {
    const opts = typeof options === 'string' ? { name: options } : options;
    this.name = opts.name ?? 'memory';
    this.readOnly = opts.readOnly ?? false;
    const chunkSize = opts.chunkSize ?? DEFAULT_CHUNK_SIZE;
    if (!Number.isInteger(chunkSize) || chunkSize < 512 || (chunkSize & (chunkSize - 1)) !== 0) {
      throw new RangeError(`chunkSize must be a power of two >= 512, got ${chunkSize}`);
    }
    this.chunkSize = chunkSize;
    if (initial && initial.length > 0) {
      this.byteSize = initial.length;
      for (let pos = 0; pos < initial.length; pos += chunkSize) {
        const part = initial.subarray(pos, Math.min(pos + chunkSize, initial.length));
        if (isZero(part)) continue;
        const chunk = new Uint8Array(chunkSize);
        chunk.set(part);
        this.chunks.set(pos / chunkSize, chunk);
      }
      this.sortedIndices = null;
    }
  }

  async read(buf: Uint8Array, offset: number): Promise<number> {
    checkOpen(this.name, this.closed);
    checkRange(this.name, offset, buf.length);
    const end = Math.min(this.byteSize, offset + buf.length);
    if (end <= offset) return 0;
    for (let pos = offset; pos < end; ) {
      const index = Math.floor(pos / this.chunkSize);
      const inChunk = pos - index * this.chunkSize;
      const n = Math.min(this.chunkSize - inChunk, end - pos);
      const chunk = this.chunks.get(index);
      const dst = pos - offset;
      if (chunk) buf.set(chunk.subarray(inChunk, inChunk + n), dst);
      else buf.fill(0, dst, dst + n);
      pos += n;
    }
    return end - offset;
  }

  async write(buf: Uint8Array, offset: number): Promise<void> {
    checkOpen(this.name, this.closed);
    checkWritable(this.name, this.readOnly);
    checkRange(this.name, offset, buf.length);
    // Like pwrite: an empty write changes nothing, not even the size.
    if (buf.length === 0) return;
    const end = offset + buf.length;
    for (let pos = offset; pos < end; ) {
      const index = Math.floor(pos / this.chunkSize);
      const inChunk = pos - index * this.chunkSize;
      const n = Math.min(this.chunkSize - inChunk, end - pos);
      this.ensureChunk(index).set(buf.subarray(pos - offset, pos - offset + n), inChunk);
      pos += n;
    }
    if (end > this.byteSize) this.byteSize = end;
  }

  async size(): Promise<number> {
    checkOpen(this.name, this.closed);
    return this.byteSize;
  }

  async truncate(size: number): Promise<void> {
    checkOpen(this.name, this.closed);
    checkWritable(this.name, this.readOnly);
    checkRange(this.name, size, 0);
    if (size < this.byteSize) {
      // Bytes past the new end must read as zeros if the storage grows again.
      this.zeroRange(size, this.byteSize);
    }
    this.byteSize = size;
  }

  async flush(): Promise<void> {
    checkOpen(this.name, this.closed);
  }

  async close(): Promise<void> {
    this.closed = true;
  }

  async extents(offset: number, length: number): Promise<StorageExtent[]> {
    checkOpen(this.name, this.closed);
    checkRange(this.name, offset, length);
    const end = Math.min(this.byteSize, offset + length);
    if (end <= offset) return [];
    const { out, push } = extentCollector(offset, end);
    const first = Math.floor(offset / this.chunkSize);
    const lastIndex = Math.floor((end - 1) / this.chunkSize);
    let pos = offset;
    for (const index of this.indicesBetween(first, lastIndex)) {
      const start = index * this.chunkSize;
      push(pos, start, true);
      push(start, start + this.chunkSize, false);
      pos = Math.max(pos, start + this.chunkSize);
    }
    push(pos, end, true);
    return out;
  }

  async discard(offset: number, length: number): Promise<void> {
    checkOpen(this.name, this.closed);
    checkWritable(this.name, this.readOnly);
    checkRange(this.name, offset, length);
    // Like a punch hole: never changes the size.
    this.zeroRange(offset, Math.min(offset + length, this.byteSize));
  }

  async writeZeroes(offset: number, length: number): Promise<void> {
    checkOpen(this.name, this.closed);
    checkWritable(this.name, this.readOnly);
    checkRange(this.name, offset, length);
    if (length === 0) return;
    this.zeroRange(offset, Math.min(offset + length, this.byteSize));
    if (offset + length > this.byteSize) this.byteSize = offset + length;
  }

  async allocatedSize(): Promise<number> {
    checkOpen(this.name, this.closed);
    return this.chunks.size * this.chunkSize;
  }

  /** A copy of the whole content as one buffer (for tests and small images). */
  toUint8Array(): Uint8Array {
    const out = new Uint8Array(this.byteSize);
    for (const [index, chunk] of this.chunks) {
      const start = index * this.chunkSize;
      if (start >= this.byteSize) continue;
      out.set(chunk.subarray(0, Math.min(this.chunkSize, this.byteSize - start)), start);
    }
    return out;
  }

  private ensureChunk(index: number): Uint8Array {
    let chunk = this.chunks.get(index);
    if (!chunk) {
      chunk = new Uint8Array(this.chunkSize);
      this.chunks.set(index, chunk);
      this.sortedIndices = null;
    }
    return chunk;
  }

  /** Drops whole chunks inside [start, end) and zeroes the partial ones (dropping those left all zero). */
  private zeroRange(start: number, end: number): void {
    if (end <= start) return;
    const first = Math.floor(start / this.chunkSize);
    const last = Math.floor((end - 1) / this.chunkSize);
    for (const index of this.indicesBetween(first, last)) {
      const chunk = this.chunks.get(index);
      if (!chunk) continue;
      const chunkStart = index * this.chunkSize;
      const s = Math.max(start, chunkStart) - chunkStart;
      const e = Math.min(end, chunkStart + this.chunkSize) - chunkStart;
      if (s === 0 && e === this.chunkSize) {
        this.chunks.delete(index);
        this.sortedIndices = null;
      } else {
        chunk.fill(0, s, e);
        if (isZero(chunk)) {
          this.chunks.delete(index);
          this.sortedIndices = null;
        }
      }
    }
  }

  /** Present chunk indices in [first, last], ascending, without walking absent indices. */
  private indicesBetween(first: number, last: number): number[] {
    if (last - first + 1 <= this.chunks.size * 4) {
      const out: number[] = [];
      for (let i = first; i <= last; i++) if (this.chunks.has(i)) out.push(i);
      return out;
    }
    if (!this.sortedIndices) this.sortedIndices = [...this.chunks.keys()].sort((a, b) => a - b);
    const sorted = this.sortedIndices;
    let lo = 0;
    let hi = sorted.length;
    while (lo < hi) {
      const mid = (lo + hi) >>> 1;
      if (sorted[mid]! < first) lo = mid + 1;
      else hi = mid;
    }
    const out: number[] = [];
    for (let i = lo; i < sorted.length && sorted[i]! <= last; i++) out.push(sorted[i]!);
    return out;
  }
}
