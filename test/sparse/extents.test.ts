// Data/hole extents: native SEEK_DATA/SEEK_HOLE and the zero scan agree; isZero; zeroing fallbacks.

import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { execFileSync } from 'node:child_process';
import { join } from 'node:path';
import fc from 'fast-check';
import { FileStorage } from '../../src/io/file.js';
import { MemoryStorage } from '../../src/io/memory.js';
import { loadNative } from '../../src/io/native.js';
import type { Storage } from '../../src/io/storage.js';
import { discardRange, isZero, scanExtents, storageExtents, writeZeroesRange } from '../../src/sparse/extents.js';
import { tempDirFixture } from '../io/backends.js';
import { checkProperty } from '../helpers/property.js';

const tmp = tempDirFixture();
beforeAll(tmp.setup);
afterAll(tmp.teardown);

const KiB = 1024;
const MiB = 1024 * KiB;
const native = loadNative();

function sh(cmd: string, ...args: string[]): void {
  execFileSync(cmd, args, { stdio: 'ignore' });
}

/** dd writes of nonzero bytes (from /dev/urandom is not guaranteed nonzero per block, so use `yes`). */
function ddData(path: string, offsetBlocks: number, countBlocks: number): void {
  execFileSync('sh', [
    '-c',
    `yes qimg | head -c ${countBlocks * 4096} | dd of="${path}" bs=4096 seek=${offsetBlocks} conv=notrunc status=none`,
  ]);
}

describe.runIf(native && process.platform === 'linux')('native SEEK_DATA/SEEK_HOLE and the zero scan agree', () => {
  async function compare(path: string): Promise<number> {
    const s = await FileStorage.open(path, { readOnly: true });
    const size = await s.size();
    const nat = await storageExtents(s, 0, size + 4096);
    const scan = await scanExtents(s, 0, size + 4096);
    expect(nat).toEqual(scan);
    // Sub-ranges, unaligned on both ends.
    for (const [o, l] of [[1, size - 2], [4095, 3 * 4096 + 2], [size >> 1, size]] as const) {
      if (o >= size) continue;
      expect(await storageExtents(s, o, l)).toEqual(await scanExtents(s, o, l));
    }
    await s.close();
    return nat.filter((e) => e.hole).length;
  }

  it('the answers come from SEEK_DATA, not from a scan: written zeros are data to it, a hole to the scan', async () => {
    // Without this, a FileStorage that quietly fell back to the scan would agree with it everywhere below.
    const path = join(tmp.dir(), 'zeros.img');
    sh('truncate', '-s', '1M', path);
    execFileSync('dd', ['if=/dev/zero', `of=${path}`, 'bs=4096', 'seek=16', 'count=4', 'conv=notrunc', 'status=none']);
    const s = await FileStorage.open(path, { readOnly: true });
    try {
      expect(await storageExtents(s, 0, 1 * MiB)).toEqual([
        { offset: 0, length: 64 * KiB, hole: true },
        { offset: 64 * KiB, length: 16 * KiB, hole: false },
        { offset: 80 * KiB, length: 1 * MiB - 80 * KiB, hole: true },
      ]);
      expect(await scanExtents(s, 0, 1 * MiB)).toEqual([{ offset: 0, length: 1 * MiB, hole: true }]);
    } finally {
      await s.close();
    }
  });

  it('a file made with truncate and dd writes', async () => {
    const path = join(tmp.dir(), 'dd.img');
    sh('truncate', '-s', '64M', path);
    ddData(path, 0, 1);
    ddData(path, 256, 16);
    ddData(path, 1000, 1);
    ddData(path, 16383, 1); // last block
    expect(await compare(path)).toBe(3);
  });

  it('a fully written file with holes punched by fallocate, and an unaligned data tail', async () => {
    const path = join(tmp.dir(), 'punched.img');
    ddData(path, 0, 2048);
    sh('fallocate', '-p', '-o', String(4096), '-l', String(64 * KiB), path);
    sh('fallocate', '-p', '-o', String(1 * MiB), '-l', String(3 * MiB), path);
    execFileSync('sh', ['-c', `printf tail >> "${path}"`]);
    expect(await compare(path)).toBe(2);
  });

  it('a file that is all hole, and an empty file', async () => {
    const hole = join(tmp.dir(), 'hole.img');
    sh('truncate', '-s', '5M', hole);
    await compare(hole);
    const empty = join(tmp.dir(), 'empty.img');
    sh('truncate', '-s', '0', empty);
    const s = await FileStorage.open(empty, { readOnly: true });
    expect(await storageExtents(s, 0, 100)).toEqual([]);
    expect(await scanExtents(s, 0, 100)).toEqual([]);
    await s.close();
  });

  it('random block layouts', async () => {
    let n = 0;
    const arb = fc.tuple(
      fc.array(fc.tuple(fc.integer({ min: 0, max: 600 }), fc.integer({ min: 1, max: 40 })), { maxLength: 12 }),
      fc.integer({ min: 0, max: 700 * 4096 }),
    );
    await checkProperty({ name: 'SEEK_DATA extents equal the zero scan', runs: 40 }, arb, async ([writes, size]) => {
      const path = join(tmp.dir(), `rand${n++}.img`);
      const s = await FileStorage.open(path, { readOnly: false, create: true });
      try {
        const block = new Uint8Array(40 * 4096).fill(0x5a);
        await s.truncate(size);
        for (const [start, count] of writes) await s.write(block.subarray(0, count * 4096), start * 4096);
        await s.truncate(size); // may cut a data block in the middle
        expect(await storageExtents(s, 0, size)).toEqual(await scanExtents(s, 0, size));
      } finally {
        await s.close();
      }
    });
  });
});

describe('isZero', () => {
  it('answers for every size and position of a single nonzero byte, at odd byte offsets', () => {
    const big = new Uint8Array(3 * MiB + 17);
    for (const len of [0, 1, 7, 8, 63, 64, 65, 4096, 1 * MiB, 1 * MiB + 1, 3 * MiB + 10]) {
      const view = big.subarray(7, 7 + len);
      expect(isZero(view)).toBe(true);
      for (const pos of new Set([0, len >> 1, len - 1, Math.min(len - 1, 1 * MiB)])) {
        if (pos < 0 || len === 0) continue;
        view[pos] = 1;
        expect(isZero(view)).toBe(false);
        view[pos] = 0;
      }
    }
  });
});

/** A storage with only the required core, so src/sparse must use its fallbacks. */
function coreOnly(inner: MemoryStorage): Storage & { writes: Array<[number, number]> } {
  const writes: Array<[number, number]> = [];
  return {
    name: inner.name,
    readOnly: false,
    writes,
    read: (b, o) => inner.read(b, o),
    write: (b, o) => {
      writes.push([o, b.length]);
      return inner.write(b, o);
    },
    size: () => inner.size(),
    truncate: (n) => inner.truncate(n),
    flush: () => inner.flush(),
    close: () => inner.close(),
  };
}

describe('zeroing fallbacks without native capabilities', () => {
  it('discardRange writes zeros only over chunks that are not already zero, and keeps the size', async () => {
    const inner = new MemoryStorage();
    await inner.truncate(8 * MiB);
    await inner.write(new Uint8Array(10).fill(3), 5 * MiB + 100);
    const s = coreOnly(inner);
    await discardRange(s, 0, 20 * MiB);
    expect(await s.size()).toBe(8 * MiB);
    expect(s.writes).toEqual([[5 * MiB, 1 * MiB]]);
    expect(await scanExtents(s, 0, 8 * MiB)).toEqual([{ offset: 0, length: 8 * MiB, hole: true }]);
  });

  it('writeZeroesRange zeroes inside and extends past the end', async () => {
    const inner = new MemoryStorage(new Uint8Array(10_000).fill(9));
    const s = coreOnly(inner);
    await writeZeroesRange(s, 4_000, 1 * MiB);
    expect(await s.size()).toBe(4_000 + 1 * MiB);
    const all = inner.toUint8Array();
    expect(isZero(all.subarray(4_000))).toBe(true);
    expect(all.subarray(0, 4_000).every((b) => b === 9)).toBe(true);
  });

  it('the scan reports all-zero 4 KiB blocks as holes, aligned in the storage', async () => {
    const data = new Uint8Array(5 * 4096 + 100);
    data[4096 + 5] = 1;
    data[5 * 4096 + 99] = 1;
    const s = coreOnly(new MemoryStorage(data));
    expect(await storageExtents(s, 0, 1e9)).toEqual([
      { offset: 0, length: 4096, hole: true },
      { offset: 4096, length: 4096, hole: false },
      { offset: 8192, length: 3 * 4096, hole: true },
      { offset: 5 * 4096, length: 100, hole: false },
    ]);
    expect(await storageExtents(s, 10, 5000)).toEqual([
      { offset: 10, length: 4086, hole: true },
      { offset: 4096, length: 914, hole: false },
    ]);
  });
});
