// qimg convert's refusals against qemu-img 7.2's: the same stderr (with "qemu-img:" as "qimg:"),
// the same exit code, and the same target file left behind (or not). Each tool runs in its own
// directory holding identical files, so that neither sees what the other created.

import { existsSync, mkdtempSync, mkdirSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { asQimg, qemuImg, qemuImgOk, qemuIoOk, qimg } from '../cli/harness.js';

const root = mkdtempSync(join(tmpdir(), 'qimg-convert-err-'));
afterAll(() => rmSync(root, { recursive: true, force: true }));
const dirs = { qemu: join(root, 'qemu'), ours: join(root, 'qimg') };

beforeAll(async () => {
  await Promise.all(
    Object.values(dirs).map(async (d) => {
      mkdirSync(d);
      await qemuImgOk(['create', '-q', '-f', 'qcow2', 's.qcow2', '8M'], d);
      await qemuIoOk('s.qcow2', 'qcow2', ['write -P 0x11 0 64k', 'write -P 0x22 4M 64k'], d);
      await qemuImgOk(['snapshot', '-c', 's1', 's.qcow2'], d);
      await qemuImgOk(['create', '-q', '-f', 'raw', 's.raw', '8M'], d);
      await qemuImgOk(['create', '-q', '-f', 'qcow2', 'small.qcow2', '1M'], d);
      await qemuImgOk(['create', '-q', '-f', 'raw', 'small.raw', '1M'], d);
    }),
  );
});

/**
 * [name, convert arguments, target file whose existence afterwards is compared]. Targets named
 * o.* are renamed per case (o3.qcow2, ...) so that no case sees a file an earlier one left.
 */
const cases: [string, string[], string][] = [
  ['-c with -O raw', ['-c', '-O', 'raw', 's.qcow2', 'o.raw'], 'o.raw'],
  ['-B with -O raw', ['-O', 'raw', '-B', 's.qcow2', 's.qcow2', 'o.raw'], 'o.raw'],
  ['-n with -o', ['-n', '-o', 'cluster_size=4k', '-O', 'qcow2', 's.qcow2', 'small.qcow2'], 'small.qcow2'],
  ['missing source', ['-O', 'qcow2', 'nope.qcow2', 'o.qcow2'], 'o.qcow2'],
  ['-n onto a smaller qcow2 target', ['-n', '-O', 'qcow2', 's.qcow2', 'small.qcow2'], 'small.qcow2'],
  ['-n onto a smaller raw target', ['-n', '-O', 'raw', 's.qcow2', 'small.raw'], 'small.raw'],
  ['-n -O qcow2 onto a smaller qcow2 target from raw', ['-n', '-f', 'raw', '-O', 'qcow2', 's.raw', 'small.qcow2'], 'small.qcow2'],
  ['unknown -O format', ['-O', 'vmdk9', 's.qcow2', 'o.img'], 'o.img'],
  ['-S not a multiple of 512', ['-S', '1000', '-O', 'qcow2', 's.qcow2', 'o.qcow2'], 'o.qcow2'],
  ['-S too large', ['-S', '32M', '-O', 'qcow2', 's.qcow2', 'o.qcow2'], 'o.qcow2'],
  ['-S with a bad suffix', ['-S', '64x', '-O', 'qcow2', 's.qcow2', 'o.qcow2'], 'o.qcow2'],
  ['-m 0', ['-m', '0', '-O', 'qcow2', 's.qcow2', 'o.qcow2'], 'o.qcow2'],
  ['-m 17', ['-m', '17', '-O', 'qcow2', 's.qcow2', 'o.qcow2'], 'o.qcow2'],
  ['-m abc', ['-m', 'abc', '-O', 'qcow2', 's.qcow2', 'o.qcow2'], 'o.qcow2'],
  ['-o cluster_size=3000', ['-O', 'qcow2', '-o', 'cluster_size=3000', 's.qcow2', 'o.qcow2'], 'o.qcow2'],
  ['-o compat=0.10,compression_type=zstd', ['-O', 'qcow2', '-o', 'compat=0.10,compression_type=zstd', 's.qcow2', 'o.qcow2'], 'o.qcow2'],
  ['-o extended_l2=on with 512-byte clusters', ['-O', 'qcow2', '-o', 'cluster_size=512,extended_l2=on', 's.qcow2', 'o.qcow2'], 'o.qcow2'],
  ['-o unknown option', ['-O', 'qcow2', '-o', 'bogus=1', 's.qcow2', 'o.qcow2'], 'o.qcow2'],
  ['-c -o compression_type=lz4', ['-O', 'qcow2', '-c', '-o', 'compression_type=lz4', 's.qcow2', 'o.qcow2'], 'o.qcow2'],
  ['-B onto a missing backing file', ['-O', 'qcow2', '-B', 'nope.qcow2', '-F', 'qcow2', 's.qcow2', 'o.qcow2'], 'o.qcow2'],
  ['-l with an unknown snapshot', ['-O', 'qcow2', '-l', 'snapshot.name=zz', 's.qcow2', 'o.qcow2'], 'o.qcow2'],
  ['target is the source', ['-O', 'qcow2', 's.qcow2', 's.qcow2'], 's.qcow2'],
];

describe('qimg convert errors match qemu-img', () => {
  it.each(cases.map(([n, a, t], i) => {
    const rename = (f: string): string => (f.startsWith('o.') ? `o${i}.${f.slice(2)}` : f);
    return [n, a.map(rename), rename(t)] as [string, string[], string];
  }))('%s', async (_name, args, target) => {
    // Each in its own directory: independent, so run together.
    const [q, o] = await Promise.all([qemuImg(['convert', ...args], dirs.qemu), qimg(['convert', ...args], dirs.ours)]);
    expect(q.code, `qemu-img itself: ${q.stderr}`).not.toBe(0);
    expect({ code: o.code, stderr: o.stderr, stdout: o.stdout }).toEqual({ code: q.code, stderr: asQimg(q.stderr), stdout: q.stdout });
    expect(existsSync(join(dirs.ours, target)), `${target} left behind`).toBe(existsSync(join(dirs.qemu, target)));
  });
});
