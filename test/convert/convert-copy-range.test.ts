// qimg convert -C (copy offloading) against qemu-img 7.2 -C: data requests are copied verbatim (no
// sparse detection), compressed source clusters make both give up offloading from that request on.
// Each target must be `qemu-img compare` identical to qemu-img's and, where the source's block
// status does not depend on the file system probe, laid out the same (`qemu-img map`). Run with
// the native copy_file_range and with QIMG_NO_NATIVE=1 (read + write fallback); which of the two
// ran is seen with strace where it can trace.

import { LOCKING_UNAVAILABLE_NOTICE } from '../../src/cli/common.js';
import { readFileSync, writeFileSync, truncateSync } from 'node:fs';
import { join } from 'node:path';
import { beforeAll, describe, expect, it } from 'vitest';
import { asQimg, qemuImg, qemuImgOk, qemuIoOk, qimg } from '../cli/harness.js';
import { bundles } from '../helpers/bundle.js';
import { loadNative } from '../../src/io/native.js';
import { canStrace, prng, run, tmpDir } from '../helpers/qemu.js';

const dir = tmpDir('qimg-cpr-');

beforeAll(async () => {
  // 2 MiB of 4 KiB random blocks with every fourth block written as zeros, 2 MiB of written zeros,
  // then a 2 MiB hole.
  const buf = Buffer.alloc(4 << 20);
  const rnd = prng(3);
  for (let i = 0; i < 2 << 20; i += 4096) {
    if ((i / 4096) % 4 === 1) continue;
    for (let k = 0; k < 4096; k++) buf[i + k] = (rnd() * 256) | 0;
  }
  writeFileSync(join(dir, 'src.raw'), buf);
  truncateSync(join(dir, 'src.raw'), 6 << 20);
  await qemuImgOk(['convert', '-O', 'qcow2', '-S', '0', '-o', 'cluster_size=4k', 'src.raw', 'data.qcow2'], dir);
  await qemuImgOk(['convert', '-c', '-O', 'qcow2', 'src.raw', 'comp.qcow2'], dir);
  // Plain data first, then a compressed cluster further on: offloading stops there.
  await qemuImgOk(['create', '-f', 'qcow2', 'mixed.qcow2', '6M'], dir);
  await qemuIoOk('mixed.qcow2', 'qcow2', ['write -P 5 0 3M', 'write -z 64k 64k', 'write -c -P 6 4M 64k', 'write -P 7 5M 128k'], dir);
  // A top over a backing file: unallocated ranges are copied from the backing file.
  await qemuImgOk(['create', '-f', 'qcow2', 'top.qcow2', '-b', 'data.qcow2', '-F', 'qcow2'], dir);
  await qemuIoOk('top.qcow2', 'qcow2', ['write -P 8 1M 256k', 'write -z 3M 64k'], dir);
});

const SOURCES = ['src.raw', 'data.qcow2', 'comp.qcow2', 'mixed.qcow2', 'top.qcow2'];
const fmtOf = (f: string): string => (f.endsWith('.raw') ? 'raw' : 'qcow2');

async function map(file: string, fmt: string): Promise<string> {
  return (await qemuImgOk(['map', '--output=json', '-f', fmt, file], dir)).stdout;
}

describe('qimg convert -C matches qemu-img -C', () => {
  const cases = SOURCES.flatMap((src) => (['raw', 'qcow2'] as const).flatMap((out) => [[src, out, false], [src, out, true]] as const));
  it.each(cases.map(([s, o, nn], i) => [`${s} -> ${o}${nn ? ' (QIMG_NO_NATIVE=1)' : ''}`, s, o, nn, i] as const))(
    '%s',
    async (_n, src, out, noNative, i) => {
      const theirs = `theirs-${i}.${out}`;
      const ours = `ours-${i}.${out}`;
      // Independent files: both tools at once, then QEMU's looks at the results at once.
      const [q, r] = await Promise.all([
        qemuImg(['convert', '-C', '-O', out, src, theirs], dir),
        qimg(['convert', '-C', '-O', out, src, ours], dir, noNative ? { QIMG_NO_NATIVE: '1' } : {}),
      ]);
      expect(q.code, q.stderr).toBe(0);
      expect({ code: r.code, stdout: r.stdout, stderr: r.stderr }).toEqual({ code: 0, stdout: q.stdout, stderr: noNative ? LOCKING_UNAVAILABLE_NOTICE : '' });
      const [cmp, mo, mt, chk] = await Promise.all([
        qemuImg(['compare', '-f', out, '-F', out, ours, theirs], dir), map(ours, out), map(theirs, out),
        out === 'qcow2' ? qemuImg(['check', ours], dir) : null,
      ]);
      expect(cmp.stdout).toBe('Images are identical.\n');
      // Without SEEK_DATA a raw source's block status comes from a zero scan (zero blocks read as
      // holes), so which ranges are data requests differs there by design; qcow2 sources do not.
      if (!(noNative && fmtOf(src) === 'raw')) expect(mo).toBe(mt);
      if (chk) expect(chk.code, chk.stdout).toBe(0);
    },
  );

  it('-C differs from a plain convert where qemu-img -C does (no sparse detection)', async () => {
    await qemuImgOk(['convert', '-O', 'raw', 'src.raw', 'plain.raw'], dir);
    const r = await qimg(['convert', '-C', '-O', 'raw', 'src.raw', 'offl.raw'], dir);
    expect(r.code).toBe(0);
    expect(await map('offl.raw', 'raw')).not.toBe(await map('plain.raw', 'raw'));
  });

  it.each([
    ['-c', ['-C', '-c', '-O', 'qcow2', 'src.raw', 'e1.qcow2']],
    ['-S', ['-C', '-S', '0', '-O', 'raw', 'src.raw', 'e2.raw']],
    ['--salvage', ['-C', '--salvage', '-O', 'raw', 'src.raw', 'e3.raw']],
  ])('-C with %s is refused as qemu-img refuses it', async (_n, args) => {
    const q = await qemuImg(['convert', ...args], dir);
    const r = await qimg(['convert', ...args], dir);
    expect({ code: r.code, stdout: r.stdout, stderr: r.stderr }).toEqual({ code: q.code, stdout: q.stdout, stderr: asQimg(q.stderr) });
    expect(q.code).toBe(1);
  });
});


describe.runIf(canStrace('copy_file_range') && loadNative() !== null)('-C copies in the kernel (strace)', () => {
  /** copy_file_range calls the command makes. */
  async function copies(cmd: string, args: string[], log: string, env: Record<string, string> = {}): Promise<number> {
    const envArgs = Object.entries(env).flatMap(([k, v]) => ['-E', `${k}=${v}`]);
    const r = await run('strace', ['-f', '-qq', ...envArgs, '-e', 'trace=copy_file_range', '-o', join(dir, log), cmd, ...args], { cwd: dir });
    expect(r.code, r.stderr).toBe(0);
    return readFileSync(join(dir, log), 'utf8').split('\n').filter((l) => /copy_file_range\(/.test(l)).length;
  }
  it('natively with copy_file_range as qemu-img, and without it under QIMG_NO_NATIVE=1', async () => {
    const cli = bundles().cli;
    const [q, native, fallback] = await Promise.all([
      copies('qemu-img', ['convert', '-C', '-O', 'raw', 'data.qcow2', 'st-q.raw'], 'st-q.log'),
      copies(process.execPath, [cli, 'convert', '-C', '-O', 'raw', 'data.qcow2', 'st-n.raw'], 'st-n.log'),
      copies(process.execPath, [cli, 'convert', '-C', '-O', 'raw', 'data.qcow2', 'st-f.raw'], 'st-f.log', { QIMG_NO_NATIVE: '1' }),
    ]);
    expect({ qemu: q > 0, native: native > 0, fallback }).toEqual({ qemu: true, native: true, fallback: 0 });
    for (const f of ['st-n.raw', 'st-f.raw']) {
      expect((await qemuImg(['compare', '-f', 'raw', '-F', 'raw', f, 'st-q.raw'], dir)).stdout).toBe('Images are identical.\n');
    }
  });
});
