// qimg convert's cache and image-option arguments against qemu-img 7.2 on the same input: -t (target
// cache mode) and -T (source cache mode) give the same target, exit code and output, and bad
// values the same refusal; a target is synced at the end exactly when qemu-img syncs it (seen with
// strace where it can trace). --object, --image-opts and --target-image-opts, which qimg does not
// implement, are refused with one clear line before anything is written (qemu-img accepts them).

import { execFileSync } from 'node:child_process';
import { copyFileSync, existsSync, readFileSync, rmSync } from 'node:fs';
import { join } from 'node:path';
import { beforeAll, describe, expect, it } from 'vitest';
import { asQimg, qemuImg, qemuImgOk, qemuIoOk, qimg, type RunResult } from '../cli/harness.js';
import { bundles } from '../helpers/bundle.js';
import { canStrace, run, tmpDir } from '../helpers/qemu.js';

const dir = tmpDir('qimg-copt-');

beforeAll(async () => {
  // 4 MiB: data, a zero cluster, a compressed cluster, unallocated space; and its raw copy.
  await qemuImgOk(['create', '-q', '-f', 'qcow2', 'src.qcow2', '4M'], dir);
  await qemuIoOk('src.qcow2', 'qcow2', ['write -P 0x5a 0 1M', 'write -z 1M 64k', 'write -c -P 0x6b 2M 64k', 'write -P 0x7c 3M 4k'], dir);
  await qemuImgOk(['convert', '-O', 'raw', 'src.qcow2', 'src.raw'], dir);
});

/** qemu-img's and qimg's run of the same convert, into theirs-<i> and ours-<i>. */
async function convertBoth(args: string[], source: string, i: number, out: 'raw' | 'qcow2'): Promise<{ q: RunResult; r: RunResult; theirs: string; ours: string }> {
  const theirs = `theirs-${i}.${out}`;
  const ours = `ours-${i}.${out}`;
  const [q, r] = await Promise.all([
    qemuImg(['convert', ...args, '-O', out, source, theirs], dir),
    qimg(['convert', ...args, '-O', out, source, ours], dir),
  ]);
  return { q, r, theirs, ours };
}

/** The file system may refuse O_DIRECT (older tmpfs): qemu-img then fails to open with EINVAL. */
const noDirectIo = (q: RunResult): boolean => q.code !== 0 && /Invalid argument/.test(q.stderr);

describe('-t and -T cache modes: the same target as qemu-img', () => {
  const cases: { args: string[]; source: string; out: 'raw' | 'qcow2'; direct?: boolean }[] = [
    { args: ['-t', 'writeback'], source: 'src.qcow2', out: 'qcow2' },
    { args: ['-t', 'writethrough'], source: 'src.qcow2', out: 'raw' },
    { args: ['-t', 'unsafe'], source: 'src.raw', out: 'qcow2' },
    { args: ['-t', 'none'], source: 'src.qcow2', out: 'raw', direct: true },
    { args: ['-t', 'directsync', '-c'], source: 'src.qcow2', out: 'qcow2', direct: true },
    { args: ['-T', 'writeback'], source: 'src.qcow2', out: 'raw' },
    { args: ['-T', 'none'], source: 'src.raw', out: 'qcow2', direct: true },
    { args: ['-T', 'unsafe', '-t', 'writeback', '-n'], source: 'src.qcow2', out: 'qcow2' },
  ];
  for (const [i, c] of cases.entries()) it(`${c.args.join(' ')}: ${c.source} -> ${c.out}`, async (ctx) => {
    if (c.args.includes('-n')) {
      // -n: both convert into the same kind of existing target.
      await qemuImgOk(['create', '-q', '-f', c.out, `theirs-${i}.${c.out}`, '4M'], dir);
      copyFileSync(join(dir, `theirs-${i}.${c.out}`), join(dir, `ours-${i}.${c.out}`));
    }
    const { q, r, theirs, ours } = await convertBoth(c.args, c.source, i, c.out);
    if (c.direct && noDirectIo(q)) ctx.skip();
    expect(q.code, q.stderr).toBe(0);
    expect({ code: r.code, stdout: r.stdout, stderr: r.stderr }).toEqual({ code: 0, stdout: q.stdout, stderr: '' });
    const cmp = await qemuImg(['compare', '-f', c.out, '-F', c.out, ours, theirs], dir);
    expect(cmp.stdout + cmp.stderr).toBe('Images are identical.\n');
    if (c.out === 'qcow2') {
      const [mo, mt, chk] = await Promise.all([
        qemuImgOk(['map', '--output=json', ours], dir), qemuImgOk(['map', '--output=json', theirs], dir), qemuImg(['check', ours], dir),
      ]);
      expect(mo.stdout).toBe(mt.stdout);
      expect(chk.code, chk.stdout).toBe(0);
    }
  });

  it.each([
    ['-t bogus (checked after the target is created)', ['-t', 'bogus', '-O', 'qcow2', 'src.qcow2', 'e1.qcow2']],
    ['-T bogus (checked before anything is opened)', ['-T', 'bogus', '-O', 'qcow2', 'src.qcow2', 'e2.qcow2']],
    ['-t bogus onto a raw target', ['-t', 'bogus', 'src.qcow2', 'e3.raw']],
    ['--target-image-opts without -n', ['--target-image-opts', 'src.qcow2', 'driver=raw,file.filename=e4.raw']],
  ])('%s: refused as qemu-img refuses it', async (_n, args) => {
    const target = args[args.length - 1]!;
    const q = await qemuImg(['convert', ...args], dir);
    const qemuLeft = existsSync(join(dir, target));
    rmSync(join(dir, target), { force: true });
    const r = await qimg(['convert', ...args], dir);
    expect(q.code).toBe(1);
    expect({ code: r.code, stdout: r.stdout, stderr: r.stderr }).toEqual({ code: q.code, stdout: q.stdout, stderr: asQimg(q.stderr) });
    expect(existsSync(join(dir, target)), 'target left behind as qemu-img leaves it').toBe(qemuLeft);
  });
});

describe('options qimg does not implement: one clear line, nothing written', () => {
  // qemu-img accepts each of these (checked here, so the list stays honest); qimg refuses them
  // before it opens or creates anything.
  const cases: { name: string; args: string[]; target: string; existing?: boolean; refusal: string }[] = [
    {
      name: '--object (a secret)',
      args: ['--object', 'secret,id=sec0,data=123456', '-O', 'raw', 'src.qcow2', 'n1.raw'],
      target: 'n1.raw',
      refusal: '--object is not supported by qimg',
    },
    {
      name: '--image-opts (the source as an option string)',
      args: ['--image-opts', '-O', 'raw', 'driver=qcow2,file.filename=src.qcow2', 'n2.raw'],
      target: 'n2.raw',
      refusal: '--image-opts is not supported by qimg',
    },
    {
      name: '--target-image-opts with -n',
      args: ['-n', '--target-image-opts', 'src.qcow2', 'driver=raw,file.filename=n3.raw'],
      target: 'n3.raw',
      existing: true,
      refusal: '--target-image-opts is not supported by qimg',
    },
  ];
  it.each(cases.map((c) => [c.name, c] as const))('%s', async (_n, c) => {
    const file = join(dir, c.target);
    if (c.existing) execFileSync('truncate', ['-s', '4M', file]);
    const q = await qemuImg(['convert', ...c.args], dir);
    expect(q.code, q.stderr).toBe(0);
    expect((await qemuImg(['compare', '-f', 'raw', '-F', 'qcow2', file, 'src.qcow2'], dir)).stdout).toBe('Images are identical.\n');
    // qimg against the state before qemu-img's run: no target, or the empty existing one.
    rmSync(file, { force: true });
    if (c.existing) execFileSync('truncate', ['-s', '4M', file]);
    const r = await qimg(['convert', ...c.args], dir);
    expect({ code: r.code, stdout: r.stdout, stderr: r.stderr }).toEqual({ code: 1, stdout: '', stderr: `qimg: ${c.refusal}\n` });
    if (c.existing) expect(readFileSync(file).every((b) => b === 0), 'the existing target is untouched').toBe(true);
    else expect(existsSync(file), 'no target created').toBe(false);
  });
});


describe.runIf(canStrace('fdatasync'))('-t: the target is synced at the end exactly when qemu-img syncs it (strace)', () => {
  /** fsync/fdatasync calls on `target` by the command (strace -y prints each fd's path). */
  async function syncs(cmd: string, args: string[], target: string, log: string): Promise<number> {
    const r = await run('strace', ['-f', '-y', '-qq', '-e', 'trace=fsync,fdatasync', '-o', join(dir, log), cmd, ...args], { cwd: dir });
    expect(r.code, r.stderr).toBe(0);
    return readFileSync(join(dir, log), 'utf8').split('\n').filter((l) => l.includes(`${target}>`)).length;
  }
  it.each([
    ['unsafe', 'raw'], ['writeback', 'raw'], ['none', 'raw'], ['unsafe', 'qcow2'], ['writeback', 'qcow2'],
  ] as const)('-t %s, %s target', async (mode, out) => {
    const theirs = `sync-${mode}-theirs.${out}`;
    const ours = `sync-${mode}-ours.${out}`;
    const [q, r] = await Promise.all([
      syncs('qemu-img', ['convert', '-t', mode, '-O', out, 'src.qcow2', theirs], theirs, `${theirs}.strace`),
      syncs(process.execPath, [bundles().cli, 'convert', '-t', mode, '-O', out, 'src.qcow2', ours], ours, `${ours}.strace`),
    ]);
    // The counts differ (QEMU also syncs metadata updates on its own schedule); whether any is made does not.
    expect(r > 0, `qimg synced ${r} times, qemu-img ${q} times`).toBe(q > 0);
    expect((await qemuImg(['compare', '-f', out, '-F', out, ours, theirs], dir)).stdout).toBe('Images are identical.\n');
  });
});
