// qimg convert --salvage against qemu-img 7.2 on qcow2 sources with unreadable clusters (a
// compressed cluster whose stream is garbage, one whose data lies past the end of the file, a data
// cluster past the end): the same warning lines (in the same order with -m 1, as a set with
// parallel requests, whose interleaving is timing-dependent in both tools), the same exit status,
// and the same target (qemu-img compare with qemu-img's own, map and check for qcow2 targets).
// Without --salvage both stop with the same error.

import { copyFileSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { beforeAll, describe, expect, it } from 'vitest';
import { asQimg, qemuImg, qemuImgOk, qimg } from '../cli/harness.js';
import { prng, tmpDir } from '../helpers/qemu.js';
import { readAt, writeAt } from '../helpers/craft.js';

const dir = tmpDir('qimg-salv-');
const CLUSTER = 65536;

/** The L2 entries of the first L2 table (the image is small: one table). */
function l2(file: string): { at: number; entries: bigint[] } {
  const l1 = Number(readAt(file, 40, 8).readBigUInt64BE(0));
  const at = Number(readAt(file, l1, 8).readBigUInt64BE(0) & 0x00fffffffffffe00n);
  const b = readAt(file, at, 8 * 64);
  return { at, entries: Array.from({ length: 64 }, (_, i) => b.readBigUInt64BE(i * 8)) };
}

beforeAll(async () => {
  // 4 MiB: short random runs (compressible clusters), every third cluster empty.
  const buf = Buffer.alloc(4 << 20);
  const rnd = prng(7);
  for (let i = 0; i < buf.length; i += 4096) {
    if (Math.floor(i / CLUSTER) % 3 === 2) continue;
    for (let k = 0; k < 100; k++) buf[i + k] = (rnd() * 256) | 0;
  }
  writeFileSync(join(dir, 'src.raw'), buf);
  await qemuImgOk(['convert', '-c', '-O', 'qcow2', 'src.raw', 'bad.qcow2'], dir);
  const file = join(dir, 'bad.qcow2');
  const { at, entries } = l2(file);
  const hostBits = 62n - (16n - 8n);
  const hostMask = (1n << hostBits) - 1n;
  // Cluster 1: garbage instead of a deflate stream.
  writeAt(file, Number(entries[1]! & hostMask), Buffer.alloc(64, 0xff));
  // Cluster 4: the compressed data lies past the end of the file (reads as zeros: no valid stream).
  const size = readFileSync(file).length;
  const e4 = (entries[4]! & ~hostMask) | BigInt(size + (1 << 20));
  const b = Buffer.alloc(8);
  b.writeBigUInt64BE(e4);
  writeAt(file, at + 4 * 8, b);

  // An uncompressed image whose cluster 2 points past the end of the file (QEMU reads zeros there).
  await qemuImgOk(['convert', '-O', 'qcow2', 'src.raw', 'past.qcow2'], dir);
  const past = join(dir, 'past.qcow2');
  const p = l2(past);
  const e = Buffer.alloc(8);
  e.writeBigUInt64BE((1n << 63n) | BigInt(Math.ceil((readFileSync(past).length + (8 << 20)) / CLUSTER) * CLUSTER));
  writeAt(past, p.at + 2 * 8, e);
  copyFileSync(join(dir, 'bad.qcow2'), join(dir, 'bad2.qcow2'));
});

const sorted = (s: string): string[] => s.split('\n').filter(Boolean).sort();

describe('qimg convert --salvage matches qemu-img', () => {
  const cases: { name: string; args: string[]; out: 'raw' | 'qcow2'; ordered: boolean }[] = [
    { name: '-m 1, raw target: warnings in order', args: ['-m', '1', '--salvage', '-O', 'raw', 'bad.qcow2'], out: 'raw', ordered: true },
    { name: 'parallel, qcow2 target', args: ['--salvage', '-O', 'qcow2', 'bad.qcow2'], out: 'qcow2', ordered: false },
    { name: '-W, compressed qcow2 target', args: ['-W', '--salvage', '-c', '-O', 'qcow2', 'bad.qcow2'], out: 'qcow2', ordered: false },
    { name: 'two sources, -m 1', args: ['-m', '1', '--salvage', '-O', 'qcow2', 'bad.qcow2', 'bad2.qcow2'], out: 'qcow2', ordered: true },
    { name: '-q: no warnings', args: ['-q', '--salvage', '-O', 'raw', 'bad.qcow2'], out: 'raw', ordered: true },
    { name: 'data cluster past the end of the file', args: ['--salvage', '-O', 'qcow2', 'past.qcow2'], out: 'qcow2', ordered: true },
  ];
  it.each(cases.map((c, i) => [c.name, c, i] as const))('%s', async (_n, c, i) => {
    const ours = `ours-${i}.${c.out}`;
    const theirs = `theirs-${i}.${c.out}`;
    // Independent targets: both tools run at once.
    const [q, r] = await Promise.all([qemuImg(['convert', ...c.args, theirs], dir), qimg(['convert', ...c.args, ours], dir)]);
    expect(q.code).toBe(0);
    expect(r.code, r.stderr).toBe(0);
    if (c.ordered) expect(r.stderr).toBe(asQimg(q.stderr));
    else expect(sorted(r.stderr)).toEqual(sorted(asQimg(q.stderr)));
    if (!c.args.includes('-q') && c.name !== 'data cluster past the end of the file') expect(q.stderr).toMatch(/warning: error while reading offset/);
    const map = async (f: string): Promise<string> => (await qemuImgOk(['map', '--output=json', f], dir)).stdout;
    const qcow2 = c.out === 'qcow2';
    const [cmp, chk, mo, mt] = await Promise.all([
      qemuImg(['compare', '-f', c.out, '-F', c.out, ours, theirs], dir),
      qcow2 ? qemuImg(['check', ours], dir) : null, qcow2 ? map(ours) : null, qcow2 ? map(theirs) : null,
    ]);
    expect(cmp.stdout).toBe('Images are identical.\n');
    if (chk) expect(chk.code, chk.stdout).toBe(0);
    expect(mo).toBe(mt);
  });

  it('without --salvage both stop at the first unreadable request', async () => {
    for (const args of [['-m', '1', '-O', 'raw', 'bad.qcow2', 'e1.raw'], ['-m', '1', '-O', 'qcow2', 'bad.qcow2', 'e2.qcow2']]) {
      const q = await qemuImg(['convert', ...args], dir);
      const r = await qimg(['convert', ...args], dir);
      expect({ code: r.code, stderr: r.stderr }).toEqual({ code: q.code, stderr: asQimg(q.stderr) });
      expect(q.code).toBe(1);
    }
  });
});
