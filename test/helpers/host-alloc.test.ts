// The host-allocation comparison the interop tests rely on (test/helpers/host-alloc.ts): it tells
// apart files with the same bytes laid out differently, reads the same through koffi and python3,
// and lets st_blocks differ by extent bookkeeping only.

import { execFile } from 'node:child_process';
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { afterEach, describe, expect, it } from 'vitest';
import { tmpDir } from './qemu.js';
import { expectSameHostAllocation, hostAllocation, type HostAllocation } from './host-alloc.js';

const execFileAsync = promisify(execFile);
const dir = tmpDir('qimg-host-alloc-');
const KiB = 1024;

afterEach(() => {
  delete process.env.QIMG_TEST_HOST_ALLOC;
});

/** A 1 MiB file: 64 KiB of 0x5a at 0, the rest made by `rest` (zeros written, a hole, fallocate). */
async function file(name: string, rest: 'zeros' | 'hole' | 'falloc'): Promise<string> {
  const path = join(dir, name);
  const head = Buffer.alloc(64 * KiB, 0x5a);
  writeFileSync(path, rest === 'zeros' ? Buffer.concat([head, Buffer.alloc(960 * KiB)]) : head);
  if (rest === 'hole') await execFileAsync('truncate', ['-s', '1M', path]);
  if (rest === 'falloc') await execFileAsync('fallocate', ['-o', '64KiB', '-l', '960KiB', path]);
  return path;
}

describe('host allocation', () => {
  it('same bytes, written zeros against a hole: the data ranges differ', async () => {
    const [zeros, hole, hole2] = await Promise.all([file('z', 'zeros'), file('h', 'hole'), file('h2', 'hole')]);
    const [a, b, c] = await Promise.all([hostAllocation(zeros), hostAllocation(hole), hostAllocation(hole2)]);
    expect(() => expectSameHostAllocation(a, b, 'zeros/hole')).toThrow(/data ranges/);
    expectSameHostAllocation(b, c, 'hole/hole');
  });

  it('fallocate against written zeros: differ unless qimg had to emulate fallocate', async () => {
    const [zeros, falloc, falloc2] = await Promise.all([file('z2', 'zeros'), file('f', 'falloc'), file('f2', 'falloc')]);
    const [a, b, c] = await Promise.all([hostAllocation(zeros), hostAllocation(falloc), hostAllocation(falloc2)]);
    expectSameHostAllocation(b, c, 'falloc/falloc');
    // Where FIEMAP is missing (tmpfs) the unwritten range is not visible: nothing to tell apart.
    if (b.extents) {
      expect(b.extents.some((e) => e.flags & 0x800)).toBe(true);
      expect(() => expectSameHostAllocation(a, b, 'zeros/falloc')).toThrow(/data ranges|FIEMAP/);
      expectSameHostAllocation(a, b, 'zeros/falloc', { fallocEmulated: true });
    }
  });

  it('koffi and python3 read the same allocation; without either, length and blocks remain', async () => {
    const path = await file('p', 'falloc');
    const viaDefault = await hostAllocation(path); // koffi, or python3 where koffi does not load
    process.env.QIMG_TEST_HOST_ALLOC = 'python3';
    const viaPython = await hostAllocation(path);
    process.env.QIMG_TEST_HOST_ALLOC = 'none';
    const viaNone = await hostAllocation(path);
    expect(viaPython.via).toBe('python3');
    expect({ ...viaPython, via: viaDefault.via }).toEqual(viaDefault);
    expect(viaNone).toMatchObject({ via: 'none', length: viaDefault.length, blocks: viaDefault.blocks, data: undefined, extents: undefined });
    expectSameHostAllocation(viaNone, viaDefault, 'none/default');
  });

  it('st_blocks may differ by extent-tree blocks, not more', () => {
    // ext4, 4 KiB blocks: 2800 blocks of data in 1, 4 or 700 extents, plus `tree` blocks of its own.
    const L = 2800 * 4096;
    const ext4 = (tree: number, extents: number): HostAllocation => ({
      path: `${extents} extents`, length: L, blocks: L / 512 + tree * 8, blockSize: 4096, fsType: 0xef53, data: [{ start: 0, length: L }], via: 'koffi',
      extents: Array.from({ length: extents }, (_, i) => ({ logical: (i * L) / extents, physical: i * 2 ** 30, length: L / extents, flags: 0 })),
    });
    // qemu-img's file of the 64 GiB case: 4 extents and one leaf block kept from when it had more.
    expectSameHostAllocation(ext4(0, 1), ext4(1, 4), 'one tree block');
    expect(() => expectSameHostAllocation(ext4(0, 1), ext4(2, 4), 'two tree blocks for 4 extents')).toThrow(/bound 4096/);
    expect(() => expectSameHostAllocation(ext4(-1, 1), ext4(0, 4), 'fewer blocks than extents')).toThrow(/beyond its extents: -4096/);
    // 700 extents: leaves of 340, at least half full after splits: 5, so an index block too.
    expectSameHostAllocation(ext4(0, 1), ext4(6, 700), '700 extents');
    expect(() => expectSameHostAllocation(ext4(0, 1), ext4(7, 700), '700 extents, 7 blocks')).toThrow(/bound 24576/);
    // tmpfs: no extents, no tree: exact.
    const tmpfs = (blocks: number): HostAllocation => ({ path: 'tmpfs', length: 1 << 20, blocks, blockSize: 4096, fsType: 0x01021994, data: [], via: 'koffi' });
    expectSameHostAllocation(tmpfs(2048), tmpfs(2048), 'tmpfs');
    expect(() => expectSameHostAllocation(tmpfs(2048), tmpfs(2056), 'tmpfs')).toThrow(/tmpfs/);
  });
});
