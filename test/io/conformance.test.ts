// One conformance suite over every Storage backend: read/write, short reads, truncate, extents,
// discard, allocatedSize. Extents and discard go through src/sparse, so a backend without the
// native capability is checked through the fallback.

import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { Storage, StorageExtent } from '../../src/io/storage.js';
import { IoError } from '../../src/errors.js';
import { discardRange, isZero, storageExtents, writeZeroesRange } from '../../src/sparse/extents.js';
import { backends, tempDirFixture } from './backends.js';

const tmp = tempDirFixture();
beforeAll(tmp.setup);
afterAll(tmp.teardown);

const KiB = 1024;
const MiB = 1024 * KiB;

function pattern(length: number, seed: number): Uint8Array {
  const out = new Uint8Array(length);
  for (let i = 0; i < length; i++) out[i] = ((i * 31 + seed * 7) % 251) + 1; // never zero
  return out;
}

async function readAll(s: Storage, offset: number, length: number): Promise<Uint8Array> {
  const buf = new Uint8Array(length);
  const n = await s.read(buf, offset);
  return buf.subarray(0, n);
}

/** Runs must be ascending, contiguous, non-empty, merged, and cover exactly [offset, end). */
function expectWellFormed(ext: StorageExtent[], offset: number, end: number): void {
  let pos = offset;
  for (let i = 0; i < ext.length; i++) {
    const e = ext[i]!;
    expect(e.offset).toBe(pos);
    expect(e.length).toBeGreaterThan(0);
    if (i > 0) expect(e.hole).not.toBe(ext[i - 1]!.hole);
    pos += e.length;
  }
  expect(pos).toBe(end > offset ? end : offset);
}

function expectBytes(actual: Uint8Array, expected: Uint8Array): void {
  expect(actual.length).toBe(expected.length);
  if (Buffer.compare(actual, expected) !== 0) expect(Array.from(actual)).toEqual(Array.from(expected));
}

function expectZeros(actual: Uint8Array, length: number): void {
  expect(actual.length).toBe(length);
  expect(isZero(actual)).toBe(true);
}

const alignDown = (n: number, a: number): number => n - (n % a);
const alignUp = (n: number, a: number): number => alignDown(n + a - 1, a);

for (const backend of backends(tmp.dir)) {
  describe(`Storage conformance: ${backend.name}`, () => {
    describe('read and write', () => {
      it('reads back what was written, across chunk boundaries', async () => {
        const s = await backend.create();
        const data = pattern(200 * KiB + 13, 1);
        await s.write(data, 65_000);
        expect(await s.size()).toBe(65_000 + data.length);
        expectBytes(await readAll(s, 65_000, data.length), data);
        expectZeros(await readAll(s, 0, 65_000), 65_000);
        await s.write(pattern(10, 2), 65_530); // overwrite across a 64 KiB boundary
        const back = await readAll(s, 65_000, data.length);
        expectBytes(back.subarray(530, 540), pattern(10, 2));
        expectBytes(back.subarray(540), data.subarray(540));
        await s.close();
      });

      it('starts from the initial bytes', async () => {
        const init = pattern(5000, 3);
        const s = await backend.create(init);
        expect(await s.size()).toBe(5000);
        expectBytes(await readAll(s, 0, 5000), init);
        await s.close();
      });

      it('returns a short count at end of storage and 0 past it', async () => {
        const s = await backend.create(pattern(1000, 4));
        const buf = new Uint8Array(100);
        expect(await s.read(buf, 990)).toBe(10);
        expectBytes(buf.subarray(0, 10), pattern(1000, 4).subarray(990));
        expect(await s.read(buf, 1000)).toBe(0);
        expect(await s.read(buf, 5000)).toBe(0);
        expect(await s.read(new Uint8Array(0), 0)).toBe(0);
        await s.close();
      });

      it('a write past the end leaves a gap that reads as zeros', async () => {
        const s = await backend.create(pattern(100, 5));
        await s.write(pattern(50, 6), 3 * MiB);
        expect(await s.size()).toBe(3 * MiB + 50);
        expectZeros(await readAll(s, 100, 3 * MiB - 100), 3 * MiB - 100);
        await s.close();
      });

      it('rejects writes when read-only and any access after close', async () => {
        const s = await backend.create(pattern(100, 7));
        await s.flush();
        const ro = await backend.reopenReadOnly(s);
        expect(ro.readOnly).toBe(true);
        expectBytes(await readAll(ro, 0, 100), pattern(100, 7));
        await expect(ro.write(new Uint8Array(1), 0)).rejects.toBeInstanceOf(IoError);
        await expect(ro.truncate(0)).rejects.toBeInstanceOf(IoError);
        await ro.close();
        await s.close();
        await expect(s.read(new Uint8Array(1), 0)).rejects.toBeInstanceOf(IoError);
        await expect(s.write(new Uint8Array(1), 0)).rejects.toBeInstanceOf(IoError);
        await expect(s.size()).rejects.toBeInstanceOf(IoError);
        await expect(s.truncate(0)).rejects.toBeInstanceOf(IoError);
        await expect(s.flush()).rejects.toBeInstanceOf(IoError);
      });
    });

    describe('truncate', () => {
      it('shrinks, and bytes past the old end read as zeros after growing again', async () => {
        const s = await backend.create(pattern(300 * KiB, 8));
        await s.truncate(100 * KiB + 7);
        expect(await s.size()).toBe(100 * KiB + 7);
        await s.truncate(400 * KiB);
        expect(await s.size()).toBe(400 * KiB);
        const back = await readAll(s, 0, 400 * KiB);
        expectBytes(back.subarray(0, 100 * KiB + 7), pattern(300 * KiB, 8).subarray(0, 100 * KiB + 7));
        expectZeros(back.subarray(100 * KiB + 7), 300 * KiB - 7);
        await s.close();
      });
    });

    describe('extents', () => {
      async function sparse(): Promise<Storage> {
        const s = await backend.create();
        await s.truncate(10 * MiB);
        await s.write(pattern(4 * KiB, 9), 1 * MiB);
        await s.write(pattern(100 * KiB, 10), 5 * MiB);
        return s;
      }

      it('reports written ranges as data and the rest as holes, at the backend granularity', async () => {
        const s = await sparse();
        const ext = await storageExtents(s, 0, 20 * MiB);
        expectWellFormed(ext, 0, 10 * MiB);
        const g = backend.granularity;
        const data = ext.filter((e) => !e.hole).map((e) => [e.offset, e.offset + e.length]);
        expect(data).toEqual([
          [alignDown(1 * MiB, g), alignUp(1 * MiB + 4 * KiB, g)],
          [alignDown(5 * MiB, g), alignUp(5 * MiB + 100 * KiB, g)],
        ]);
        await s.close();
      });

      it('clips to the asked range and to the size; [] at or past the end', async () => {
        const s = await sparse();
        expect(await storageExtents(s, 1 * MiB + 100, 50)).toEqual([{ offset: 1 * MiB + 100, length: 50, hole: false }]);
        expect(await storageExtents(s, 100, 50)).toEqual([{ offset: 100, length: 50, hole: true }]);
        const tail = await storageExtents(s, 10 * MiB - 10, 1000);
        expect(tail).toEqual([{ offset: 10 * MiB - 10, length: 10, hole: true }]);
        expect(await storageExtents(s, 10 * MiB, 100)).toEqual([]);
        expect(await storageExtents(s, 11 * MiB, 100)).toEqual([]);
        const mid = await storageExtents(s, 3 * MiB, 3 * MiB);
        expectWellFormed(mid, 3 * MiB, 6 * MiB);
        await s.close();
      });

      it('an unaligned data tail is data up to the end of storage', async () => {
        const s = await backend.create();
        await s.write(pattern(10, 11), 3 * MiB + 5);
        const ext = await storageExtents(s, 0, 4 * MiB);
        expectWellFormed(ext, 0, 3 * MiB + 15);
        expect(ext[ext.length - 1]).toEqual({
          offset: alignDown(3 * MiB + 5, backend.granularity),
          length: 3 * MiB + 15 - alignDown(3 * MiB + 5, backend.granularity),
          hole: false,
        });
        await s.close();
      });
    });

    describe('discard and write zeroes', () => {
      it('discard makes the range read as zeros, keeps the size, deallocates where it can', async () => {
        const s = await backend.create(pattern(2 * MiB, 12));
        const before = await s.allocatedSize!();
        await discardRange(s, 256 * KiB, 1 * MiB);
        expect(await s.size()).toBe(2 * MiB);
        const back = await readAll(s, 0, 2 * MiB);
        expectZeros(back.subarray(256 * KiB, 1280 * KiB), 1 * MiB);
        expectBytes(back.subarray(0, 256 * KiB), pattern(2 * MiB, 12).subarray(0, 256 * KiB));
        expectBytes(back.subarray(1280 * KiB), pattern(2 * MiB, 12).subarray(1280 * KiB));
        const ext = await storageExtents(s, 0, 2 * MiB);
        expect(ext.filter((e) => e.hole)).toEqual([{ offset: 256 * KiB, length: 1 * MiB, hole: true }]);
        const after = await s.allocatedSize!();
        if (backend.deallocates) expect(after).toBeLessThanOrEqual(before - 1 * MiB);
        else expect(after).toBeLessThanOrEqual(before);
        await s.close();
      });

      it('discard zeroes partial blocks and never extends the storage', async () => {
        const s = await backend.create(pattern(10_000, 13));
        await discardRange(s, 9_000, 5_000);
        expect(await s.size()).toBe(10_000);
        const back = await readAll(s, 0, 10_000);
        expectZeros(back.subarray(9_000), 1_000);
        expectBytes(back.subarray(0, 9_000), pattern(10_000, 13).subarray(0, 9_000));
        await discardRange(s, 20_000, 100);
        expect(await s.size()).toBe(10_000);
        await s.close();
      });

      it('write zeroes extends the storage like a write', async () => {
        const s = await backend.create(pattern(10_000, 14));
        await writeZeroesRange(s, 5_000, 100_000);
        expect(await s.size()).toBe(105_000);
        const back = await readAll(s, 0, 105_000);
        expectZeros(back.subarray(5_000), 100_000);
        expectBytes(back.subarray(0, 5_000), pattern(10_000, 14).subarray(0, 5_000));
        await s.close();
      });
    });

    describe('allocatedSize', () => {
      it('counts written data, not holes', async () => {
        const s = await backend.create();
        await s.truncate(64 * MiB);
        await s.write(pattern(8 * KiB, 15), 32 * MiB);
        await s.flush();
        const small = await s.allocatedSize!();
        expect(small).toBeGreaterThanOrEqual(8 * KiB);
        expect(small).toBeLessThanOrEqual(1 * MiB);
        await s.write(pattern(2 * MiB, 16), 0);
        await s.flush();
        expect(await s.allocatedSize!()).toBeGreaterThanOrEqual(2 * MiB);
        await s.close();
      });
    });
  });
}
