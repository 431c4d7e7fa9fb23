// qimg convert --bitmaps / --skip-broken-bitmaps against qemu-img 7.2 on the same sources. QEMU is
// the judge of the result: `qemu-img info` lists the target's bitmaps (names, granularity, flags),
// `qemu-img check` must find no leaks or errors, and each bitmap's bits are read back by QEMU
// itself (qemu-nbd exports the bitmap, `qemu-img map` over NBD with x-dirty-bitmap shows its dirty
// ranges), compared with what qemu-img's own target holds.

import { copyFileSync, existsSync, readFileSync, rmSync } from 'node:fs';
import { join } from 'node:path';
import { beforeAll, describe, expect, it } from 'vitest';
import { asQimg, qemuImg, qemuImgOk, qemuIoOk, qimg } from '../cli/harness.js';
import { run, tmpDir } from '../helpers/qemu.js';
import { readAt, writeAt } from '../helpers/craft.js';

const dir = tmpDir('qimg-cbm-');

async function bitmapsOf(file: string): Promise<unknown> {
  const j = JSON.parse((await qemuImgOk(['info', '--output=json', file], dir)).stdout) as {
    'format-specific'?: { data?: { bitmaps?: unknown } };
  };
  return j['format-specific']?.data?.bitmaps ?? null;
}

async function checkClean(file: string): Promise<void> {
  const r = await qemuImg(['check', '--output=json', file], dir);
  const out = JSON.parse(r.stdout) as Record<string, unknown>;
  expect({ code: r.code, errors: out['check-errors'] ?? 0, leaks: out.leaks ?? 0, corruptions: out.corruptions ?? 0 }, `check ${file}`)
    .toEqual({ code: 0, errors: 0, leaks: 0, corruptions: 0 });
}

let sockN = 0;
/**
 * The bitmap's dirty ranges as QEMU reads them: qemu-nbd exports the image with the bitmap (on a
 * unix socket in the test's directory, never a TCP port), and qemu-img map over NBD with
 * x-dirty-bitmap shows the dirty ranges as data:false. qemu-nbd --fork returns once it listens; it
 * would exit after its one client, and is killed in any case.
 */
async function dirtyRanges(file: string, bitmap: string): Promise<string> {
  const n = sockN++;
  const sock = join(dir, `s${n}`);
  const pidFile = join(dir, `s${n}.pid`);
  try {
    const nbd = await run('qemu-nbd', ['-r', '-f', 'qcow2', '-B', bitmap, '-x', 'exp', '-k', sock, '--pid-file', pidFile, '--fork', join(dir, file)]);
    expect(nbd.code, nbd.stderr).toBe(0);
    const m = await qemuImg(
      ['map', '--output=json', '--image-opts', `driver=nbd,server.type=unix,server.path=${sock},export=exp,x-dirty-bitmap=qemu:dirty-bitmap:${bitmap}`],
      dir,
    );
    expect(m.code, m.stderr).toBe(0);
    return (JSON.parse(m.stdout) as { start: number; length: number; data: boolean }[])
      .filter((r) => !r.data)
      .map((r) => `${r.start}+${r.length}`)
      .join(' ');
  } finally {
    stopNbd(pidFile, sock);
    rmSync(sock, { force: true });
  }
}

/** Stops the qemu-nbd of pidFile if it still runs (the pid is checked to be that qemu-nbd: it may have exited and the pid been reused). */
function stopNbd(pidFile: string, sock: string): void {
  if (!existsSync(pidFile)) return;
  const pid = Number(readFileSync(pidFile, 'utf8').trim());
  rmSync(pidFile, { force: true });
  try {
    const cmdline = readFileSync(`/proc/${pid}/cmdline`, 'utf8').split('\0');
    if (pid > 0 && cmdline[0]?.endsWith('qemu-nbd') && cmdline.includes(sock)) process.kill(pid, 'SIGTERM');
  } catch {
    // Already gone: it exits when its client disconnects.
  }
}

/** Sets the in_use flag of the named bitmaps directly in the directory (as a crash of QEMU leaves it). */
function markInUse(file: string, names: string[]): void {
  const head = readAt(file, 0, 65536);
  let pos = head.readUInt32BE(100);
  let dirOffset = 0;
  let dirSize = 0;
  for (;;) {
    const type = head.readUInt32BE(pos);
    const len = head.readUInt32BE(pos + 4);
    if (type === 0) break;
    if (type === 0x23852875) {
      dirSize = Number(head.readBigUInt64BE(pos + 16));
      dirOffset = Number(head.readBigUInt64BE(pos + 24));
    }
    pos += 8 + ((len + 7) & ~7);
  }
  const d = readAt(file, dirOffset, dirSize);
  for (let p = 0; p < d.length; ) {
    const nameSize = d.readUInt16BE(p + 18);
    const extra = d.readUInt32BE(p + 20);
    const name = d.subarray(p + 24 + extra, p + 24 + extra + nameSize).toString();
    if (names.includes(name)) d.writeUInt32BE(d.readUInt32BE(p + 12) | 1, p + 12);
    p += (24 + extra + nameSize + 7) & ~7;
  }
  writeAt(file, dirOffset, d);
}

beforeAll(async () => {
  // A v3 source with 4 KiB clusters and bitmaps of several granularities: b1 enabled (tracks all
  // writes), fine enabled at 512 bytes (its table spans several clusters), b2 disabled after the
  // first writes, empty disabled, and one with a long name.
  await qemuImgOk(['create', '-f', 'qcow2', '-o', 'cluster_size=4096', 'src.qcow2', '8M'], dir);
  await qemuImgOk(['bitmap', '--add', 'src.qcow2', 'b1'], dir);
  await qemuImgOk(['bitmap', '--add', '-g', '512', 'src.qcow2', 'fine'], dir);
  await qemuImgOk(['bitmap', '--add', '-g', '128K', 'src.qcow2', 'b2'], dir);
  await qemuImgOk(['bitmap', '--add', '--disable', 'src.qcow2', 'empty'], dir);
  await qemuIoOk('src.qcow2', 'qcow2', ['write -P 1 0 64k', 'write -P 2 3M 1M', 'write -P 0 5M 4k'], dir);
  await qemuImgOk(['bitmap', '--disable', 'src.qcow2', 'b2'], dir);
  await qemuImgOk(['bitmap', '--add', '-g', '1M', 'src.qcow2', 'a-rather-long-bitmap-name-with-odd-length'], dir);
  await qemuIoOk('src.qcow2', 'qcow2', ['write -P 3 6M 100k', 'write -P 4 7M 512', 'write -z 1M 8k'], dir);
  copyFileSync(join(dir, 'src.qcow2'), join(dir, 'broken.qcow2'));
  markInUse(join(dir, 'broken.qcow2'), ['b1', 'empty']);
  await qemuImgOk(['create', '-f', 'raw', 'src.raw', '8M'], dir);
  await qemuImgOk(['create', '-f', 'qcow2', '-o', 'compat=0.10', 'v2.qcow2', '8M'], dir);
});

interface Case {
  name: string;
  args: string[];
  source: string;
  /** Prepares the target before both runs (for -n): the same file for both tools. */
  prepare?: (file: string) => Promise<void>;
}

const CASES: Case[] = [
  { name: 'qcow2 -> qcow2', args: ['-O', 'qcow2', '--bitmaps'], source: 'src.qcow2' },
  { name: 'other target cluster size', args: ['-O', 'qcow2', '-o', 'cluster_size=512', '--bitmaps'], source: 'src.qcow2' },
  { name: 'compressed target', args: ['-c', '-O', 'qcow2', '--bitmaps'], source: 'src.qcow2' },
  { name: '--skip-broken-bitmaps leaves in-use bitmaps out', args: ['-O', 'qcow2', '--bitmaps', '--skip-broken-bitmaps'], source: 'broken.qcow2' },
  {
    name: '-n into a target with its own bitmaps',
    args: ['-n', '-O', 'qcow2', '--bitmaps'],
    source: 'src.qcow2',
    prepare: async (file) => {
      await qemuImgOk(['create', '-f', 'qcow2', file, '8M'], dir);
      await qemuImgOk(['bitmap', '--add', file, 'mine'], dir);
      await qemuImgOk(['bitmap', '--add', '--disable', file, 'old'], dir);
    },
  },
  {
    name: '-n: a name the target has already (stops there; earlier bitmaps are kept)',
    args: ['-n', '-O', 'qcow2', '--bitmaps'],
    source: 'src.qcow2',
    prepare: async (file) => {
      await qemuImgOk(['create', '-f', 'qcow2', file, '8M'], dir);
      await qemuImgOk(['bitmap', '--add', file, 'b2'], dir);
    },
  },
  {
    name: '-n: a larger target cannot take the bitmaps',
    args: ['-n', '-O', 'qcow2', '--bitmaps'],
    source: 'src.qcow2',
    prepare: async (file) => {
      await qemuImgOk(['create', '-f', 'qcow2', file, '9M'], dir);
    },
  },
  { name: 'a source without bitmaps', args: ['-O', 'qcow2', '--bitmaps'], source: 'v2x.qcow2' },
];

describe('qimg convert --bitmaps matches qemu-img', () => {
  beforeAll(async () => {
    await qemuImgOk(['create', '-f', 'qcow2', 'v2x.qcow2', '1M'], dir);
  });
  it.each(CASES.map((c, i) => [c.name, c, i] as const))('%s', async (_n, c, i) => {
    const ours = `ours-${i}.qcow2`;
    const theirs = `theirs-${i}.qcow2`;
    if (c.prepare) {
      await c.prepare(join(dir, ours));
      copyFileSync(join(dir, ours), join(dir, theirs));
    }
    // Independent files: both tools run at once, and so do QEMU's looks at the results.
    const [q, r] = await Promise.all([qemuImg(['convert', ...c.args, c.source, theirs], dir), qimg(['convert', ...c.args, c.source, ours], dir)]);
    expect({ code: r.code, stdout: r.stdout, stderr: r.stderr }).toEqual({ code: q.code, stdout: q.stdout, stderr: asQimg(q.stderr) });
    const [list, ourList, cmp] = await Promise.all([
      bitmapsOf(theirs), bitmapsOf(ours), qemuImg(['compare', '-f', 'qcow2', '-F', 'qcow2', ours, theirs], dir), checkClean(ours),
    ]);
    expect(ourList).toEqual(list);
    expect(cmp.stdout).toBe('Images are identical.\n');
    const names = ((list ?? []) as { name: string }[]).map((b) => b.name);
    const [got, want] = await Promise.all([ours, theirs].map((f) => Promise.all(names.map((name) => dirtyRanges(f, name)))));
    expect(Object.fromEntries(names.map((name, k) => [name, got![k]]))).toEqual(Object.fromEntries(names.map((name, k) => [name, want![k]])));
  });

  it('the copied bitmaps keep tracking writes in QEMU', async () => {
    const r = await qimg(['convert', '-O', 'qcow2', '--bitmaps', 'src.qcow2', 'track.qcow2'], dir);
    expect(r.code, r.stderr).toBe(0);
    copyFileSync(join(dir, 'track.qcow2'), join(dir, 'track-q.qcow2'));
    const q = await qemuImg(['convert', '-O', 'qcow2', '--bitmaps', 'src.qcow2', 'track-q.qcow2'], dir);
    expect(q.code).toBe(0);
    for (const f of ['track.qcow2', 'track-q.qcow2']) await qemuIoOk(f, 'qcow2', ['write -P 9 2M 64k'], dir);
    const names = ['b1', 'b2', 'fine'];
    const [got, want] = await Promise.all(['track.qcow2', 'track-q.qcow2'].map((f) => Promise.all(names.map((name) => dirtyRanges(f, name)))));
    expect(got).toEqual(want);
    // The write at 2M is in the enabled bitmaps only (b2 was disabled in the source).
    expect(got![0]).toMatch(/(^| )2097152\+/);
    expect(got![1]).not.toMatch(/(^| )2097152\+/);
    await checkClean('track.qcow2');
  });
});

const ERRORS: { name: string; args: string[] }[] = [
  { name: 'raw source', args: ['--bitmaps', '-O', 'qcow2', 'src.raw', 'e1.qcow2'] },
  { name: 'raw target', args: ['--bitmaps', '-O', 'raw', 'src.qcow2', 'e2.raw'] },
  { name: 'qcow2 v2 target', args: ['--bitmaps', '-O', 'qcow2', '-o', 'compat=0.10', 'src.qcow2', 'e3.qcow2'] },
  { name: 'qcow2 v2 source', args: ['--bitmaps', '-O', 'qcow2', 'v2.qcow2', 'e4.qcow2'] },
  { name: 'several sources', args: ['--bitmaps', '-O', 'qcow2', 'src.qcow2', 'src.qcow2', 'e5.qcow2'] },
  { name: 'an inconsistent bitmap', args: ['--bitmaps', '-O', 'qcow2', 'broken.qcow2', 'e6.qcow2'] },
  { name: '--skip-broken-bitmaps without --bitmaps', args: ['--skip-broken-bitmaps', '-O', 'qcow2', 'broken.qcow2', 'e7.qcow2'] },
  { name: '-n onto a raw target', args: ['-n', '--bitmaps', 'src.qcow2', 'src.raw'] },
];

describe('qimg convert --bitmaps refusals as qemu-img prints them', () => {
  it.each(ERRORS.map((c) => [c.name, c] as const))('%s', async (_n, c) => {
    const target = c.args[c.args.length - 1]!;
    const q = await qemuImg(['convert', ...c.args], dir);
    const qemuLeft = existsSync(join(dir, target));
    const fresh = /^e\d/.test(target);
    if (fresh) rmSync(join(dir, target), { force: true });
    const r = await qimg(['convert', ...c.args], dir);
    expect({ code: r.code, stdout: r.stdout, stderr: r.stderr }).toEqual({ code: q.code, stdout: q.stdout, stderr: asQimg(q.stderr) });
    // Refused before creating the target, or after (the target stays, as qemu-img leaves it).
    if (fresh) expect(existsSync(join(dir, target))).toBe(qemuLeft);
  });
});
