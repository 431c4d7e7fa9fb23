// The convert library in-process: a raw copy that equals the source, leaves zero runs of at
// least minSparse bytes unwritten, reports progress in source order, and honours `existing`.

import { describe, expect, it } from 'vitest';
import fc from 'fast-check';
import { MemoryStorage } from '../../src/io/memory.js';
import type { Storage } from '../../src/io/storage.js';
import { openImage } from '../../src/open.js';
import { convert, type ConvertProgress } from '../../src/convert/convert.js';
import { checkProperty } from '../helpers/property.js';

/** Wraps a storage and records the ranges written to it. */
function recording(target: Storage): { storage: Storage; writes: [number, number][] } {
  const writes: [number, number][] = [];
  const storage: Storage = {
    name: target.name,
    readOnly: target.readOnly,
    read: (buf, offset) => target.read(buf, offset),
    write: async (buf, offset) => {
      writes.push([offset, buf.length]);
      await target.write(buf, offset);
    },
    size: () => target.size(),
    truncate: (n) => target.truncate(n),
    flush: () => target.flush(),
    close: () => target.close(),
  };
  return { storage, writes };
}

/** Source bytes: data with zero runs of chosen lengths. */
const sourceArb = fc
  .array(
    fc.record({ zero: fc.boolean(), length: fc.integer({ min: 1, max: 20000 }), fill: fc.integer({ min: 1, max: 255 }) }),
    { minLength: 1, maxLength: 30 },
  )
  .map((runs) => {
    const total = runs.reduce((n, r) => n + r.length, 0);
    const buf = new Uint8Array(total);
    let pos = 0;
    for (const r of runs) {
      if (!r.zero) buf.fill(r.fill, pos, pos + r.length);
      pos += r.length;
    }
    return buf;
  });

async function toRaw(bytes: Uint8Array, options: Parameters<typeof convert>[2] = {}) {
  const { image } = await openImage(new MemoryStorage(bytes, 'src.raw'), { format: 'raw' });
  const target = new MemoryStorage(undefined, 'dst.raw');
  const rec = recording(target);
  const progress: ConvertProgress[] = [];
  await convert(image, rec.storage, { ...options, onProgress: (p) => progress.push({ ...p }) });
  const size = await target.size();
  const out = new Uint8Array(size);
  await target.read(out, 0);
  await image.close();
  return { out, writes: rec.writes, progress, size };
}

describe('convert to raw', () => {
  it('copies every byte, sized in whole sectors', async () => {
    const arb = fc.tuple(sourceArb, fc.constantFrom(0, 512, 4096, 65536), fc.constantFrom(512, 4096, 65536));
    await checkProperty({ name: 'convert to raw copies every byte', runs: 60 }, arb, async ([bytes, minSparse, bufferSize]) => {
      const { out, size, progress } = await toRaw(bytes, { minSparse, bufferSize, parallel: 3 });
      expect(size).toBe(Math.ceil(bytes.length / 512) * 512);
      expect(Buffer.from(out.subarray(0, bytes.length)).equals(Buffer.from(bytes))).toBe(true);
      expect(out.subarray(bytes.length).every((b) => b === 0)).toBe(true);
      // Progress counts data ranges (and zero ones with minSparse 0), as qemu-img's does: a source
      // of zeros alone reports none.
      const last = progress[progress.length - 1];
      if (minSparse === 0 || bytes.some((b) => b !== 0)) expect(last, 'progress reported').toBeDefined();
      if (last) expect(last.done).toBe(last.total);
      for (let i = 1; i < progress.length; i++) expect(progress[i]!.done).toBeGreaterThan(progress[i - 1]!.done);
    });
  });

  it('leaves aligned zero runs of at least minSparse unwritten', async () => {
    const bytes = new Uint8Array(64 * 1024).fill(7);
    bytes.fill(0, 8192, 8192 + 16384); // 16 KiB aligned zero run: a hole
    bytes.fill(0, 40000, 41000); // short run: written with the data
    const { writes } = await toRaw(bytes);
    const written = new Uint8Array(bytes.length);
    for (const [o, n] of writes) written.fill(1, o, o + n);
    expect(written.subarray(8192, 8192 + 16384).every((b) => b === 0)).toBe(true);
    expect(written.subarray(40000, 41000).every((b) => b === 1)).toBe(true);
  });

  it('with minSparse 0 writes everything', async () => {
    const bytes = new Uint8Array(100_000);
    const { writes } = await toRaw(bytes, { minSparse: 0 });
    expect(writes.reduce((n, [, len]) => n + len, 0)).toBe(Math.ceil(bytes.length / 512) * 512);
  });

  it('existing: keeps the target size and zeroes the zero ranges', async () => {
    const bytes = new Uint8Array(8192).fill(3);
    bytes.fill(0, 0, 4096);
    const { image } = await openImage(new MemoryStorage(bytes, 'src.raw'), { format: 'raw' });
    const target = new MemoryStorage(new Uint8Array(16384).fill(0xee), 'dst.raw');
    await convert(image, target, { existing: true });
    const out = new Uint8Array(16384);
    await target.read(out, 0);
    expect(out.subarray(0, 4096).every((b) => b === 0)).toBe(true);
    expect(out.subarray(4096, 8192).every((b) => b === 3)).toBe(true);
    expect(out.subarray(8192).every((b) => b === 0xee)).toBe(true);
    await expect(convert(image, new MemoryStorage(new Uint8Array(512)), { existing: true })).rejects.toThrow(
      'output file is smaller than input file',
    );
    await image.close();
  });

  it('concatenates several sources', async () => {
    const a = new Uint8Array(1000).fill(1);
    const b = new Uint8Array(2048).fill(2);
    const ia = (await openImage(new MemoryStorage(a, 'a'), { format: 'raw' })).image;
    const ib = (await openImage(new MemoryStorage(b, 'b'), { format: 'raw' })).image;
    const target = new MemoryStorage(undefined, 'dst');
    await convert([ia, ib], target);
    const out = new Uint8Array(await target.size());
    await target.read(out, 0);
    expect(out.length).toBe(1024 + 2048);
    expect(out.subarray(0, 1000).every((x) => x === 1)).toBe(true);
    expect(out.subarray(1000, 1024).every((x) => x === 0)).toBe(true);
    expect(out.subarray(1024).every((x) => x === 2)).toBe(true);
  });

  it('surfaces a read error and stops', async () => {
    const src = new MemoryStorage(new Uint8Array(1 << 20).fill(9), 'src');
    const { image } = await openImage(src, { format: 'raw' });
    let reads = 0;
    image.driver.storage.read = async (buf, off) => {
      if (++reads === 3) throw new Error('boom'); // only this one: the other loop could go on
      return MemoryStorage.prototype.read.call(src, buf, off);
    };
    const target = recording(new MemoryStorage());
    await expect(convert(image, target.storage, { bufferSize: 65536, parallel: 2 })).rejects.toThrow('boom');
    // Stopped: of sixteen 64 KiB requests, none started after the failure (the other loop finishes
    // the one it has), and nothing more is read or written once it settled.
    const settled = { reads, writes: target.writes.length };
    await new Promise((resolve) => setTimeout(resolve, 20));
    expect({ reads, writes: target.writes.length }).toEqual(settled);
    expect(reads).toBeLessThanOrEqual(4);
    expect(target.writes.every(([off, len]) => off + len <= 4 * 65536)).toBe(true);
  });
});
