// Image locks on the command line, against qemu-img 7.2 in the same situations: a real qemu-io
// holding the image (a VM's stand-in: read-write, read-only, read-only with -U), or its backing
// file, or its data file; and a qimg convert in progress holding its source and target. Every
// command is run by both tools against the same holder: same exit status and stderr (QEMU's
// "Failed to get ... lock" + "Is another process using the image [x]?"), and a refused writer
// leaves the image byte-identical. While qimg writes an image, qemu-io cannot open it for writing,
// and the bytes a running qimg convert holds in /proc/locks are the ones qemu-img convert holds.
// Without the native binding, commands work and print a one-line notice once. The tests use
// files of their own and run concurrently.

import { createHash } from 'node:crypto';
import { readFileSync, rmSync } from 'node:fs';
import { join } from 'node:path';
import { beforeAll, describe, expect, it } from 'vitest';
import { run, tmpDir } from '../helpers/qemu.js';
import { background, holdWithQemuIo, probeBytes, settledLocks, type Background } from '../helpers/proc-locks.js';
import { asQimg, cliPath, qemuImg, qemuImgOk, qemuIoOk, qimg, qimgProcess, type RunResult } from './harness.js';

const dir = tmpDir('qimg-lock-cli-');
const sha = (file: string): string => createHash('sha256').update(readFileSync(join(dir, file))).digest('hex');
const locksOf = (...files: string[]): string[][] => files.map((f) => probeBytes(join(dir, f)));

/** An image `<p>top.qcow2` over `<p>base.qcow2` (some data in each), an image with a data file, a raw image. */
async function images(p: string): Promise<void> {
  await qemuImgOk(['create', '-q', '-f', 'qcow2', `${p}base.qcow2`, '1M'], dir);
  await qemuImgOk(['create', '-q', '-f', 'qcow2', '-b', `${p}base.qcow2`, '-F', 'qcow2', `${p}top.qcow2`], dir);
  await qemuImgOk(['create', '-q', '-f', 'qcow2', '-o', `data_file=${p}d.raw`, `${p}d.qcow2`, '1M'], dir);
  await Promise.all([
    qemuIoOk(`${p}base.qcow2`, 'qcow2', ['write -P 1 0 128k'], dir),
    qemuIoOk(`${p}d.qcow2`, 'qcow2', ['write -P 2 0 64k'], dir),
  ]);
  await qemuIoOk(`${p}top.qcow2`, 'qcow2', ['write -P 3 64k 64k'], dir);
}

beforeAll(async () => {
  await qemuImgOk(['create', '-q', '-f', 'qcow2', 'src.qcow2', '1M'], dir);
  await qemuIoOk('src.qcow2', 'qcow2', ['write -P 9 0 64k'], dir);
});

/** Runs `args` with qemu-img, then with qimg: same exit status and stderr; returns both. */
async function same(args: string[]): Promise<{ qemu: RunResult; ours: RunResult }> {
  const qemu = await qemuImg(args, dir);
  const ours = await qimg(args, dir);
  const label = `qimg ${args.join(' ')}`;
  expect({ code: ours.code, stderr: ours.stderr }, label).toEqual({ code: qemu.code, stderr: asQimg(qemu.stderr) });
  return { qemu, ours };
}

/** As `same`, for a command both tools must refuse; the files named stay byte-identical. */
async function refused(args: string[], files: string[], text: RegExp): Promise<void> {
  const before = files.map(sha);
  const { qemu } = await same(args);
  expect(qemu.code, `qemu-img ${args.join(' ')}: ${qemu.stderr}`).not.toBe(0);
  expect(qemu.stderr).toMatch(text);
  expect(files.map(sha), `${args.join(' ')} left ${files.join(', ')} unchanged`).toEqual(before);
}

async function worked(args: string[]): Promise<void> {
  const { qemu } = await same(args);
  expect(qemu.code, `qemu-img ${args.join(' ')}: ${qemu.stderr}`).toBe(0);
}

/** Runs `body` while qemu-io holds `files[0]` (waiting for the locks on every one of `files`). */
async function whileHeld(files: string[], format: 'qcow2' | 'raw', opts: string[], body: () => Promise<void>): Promise<void> {
  const holder = await holdWithQemuIo(files.map((f) => join(dir, f)), format, opts, dir);
  try {
    await body();
  } finally {
    await holder.stop();
  }
}

const WRITE_LOCK = /Failed to get "write" lock\nIs another process using the image \[/;
const SHARED_WRITE_LOCK = /Failed to get shared "write" lock\nIs another process using the image \[/;

/** The commands that write an image (FILE), each refused while another process reads or writes it. */
const writers = (file: string): string[][] => [
  ['resize', file, '2M'],
  ['resize', '-f', 'qcow2', '--shrink', file, '512k'],
  ['check', '-r', 'all', file],
  ['check', '-r', 'leaks', file],
  ['convert', '-n', '-O', 'qcow2', 'src.qcow2', file],
  ['convert', '-O', 'qcow2', 'src.qcow2', file],
  ['convert', '-O', 'raw', 'src.qcow2', file],
  ['create', '-f', 'qcow2', file, '1M'],
  ['create', '-f', 'raw', file, '1M'],
  ['snapshot', '-c', 's1', file],
  ['snapshot', '-a', 's1', file],
  ['snapshot', '-d', 's1', file],
  ['commit', file],
  ['commit', '-d', file],
  ['rebase', '-u', '-b', '', file],
  ['rebase', '-b', '', file],
];

/** The commands that only read it (FILE), and where the output goes. */
const readers = (file: string, out: string): string[][] => [
  ['info', file],
  ['info', '--backing-chain', file],
  ['map', file],
  ['map', '--output=json', file],
  ['check', file],
  ['convert', '-O', 'qcow2', file, out],
  ['snapshot', '-l', file],
  ['compare', file, file],
];

describe.concurrent('qemu-io holds the image', () => {
  it('read-write: every writer and reader refuses, readers work with -U', async () => {
    await images('rw-');
    await whileHeld(['rw-top.qcow2', 'rw-base.qcow2'], 'qcow2', [], async () => {
      for (const args of writers('rw-top.qcow2')) await refused(args, ['rw-top.qcow2', 'rw-base.qcow2'], WRITE_LOCK);
      for (const args of readers('rw-top.qcow2', 'rw-out.qcow2')) {
        await refused(args, ['rw-top.qcow2'], SHARED_WRITE_LOCK);
        await worked([args[0]!, '-U', ...args.slice(1)]);
        rmSync(join(dir, 'rw-out.qcow2'), { force: true });
      }
      // -U is for readers: with a repair, the open itself is refused (as qemu-img: before any lock).
      await refused(['check', '-r', 'leaks', '-U', 'rw-top.qcow2'], ['rw-top.qcow2'], /force-share=on can only be used with read-only images/);
    });
    // (src.qcow2 is left out: the other tests, running concurrently, read it.)
    expect(locksOf('rw-top.qcow2', 'rw-base.qcow2', 'rw-out.qcow2'), 'every qimg command released its locks').toEqual([[], [], []]);
  });

  it('read-only: writers refuse, readers work; read-only with -U: writers work', async () => {
    await images('ro-');
    await whileHeld(['ro-top.qcow2', 'ro-base.qcow2'], 'qcow2', ['-r'], async () => {
      for (const args of writers('ro-top.qcow2')) await refused(args, ['ro-top.qcow2', 'ro-base.qcow2'], WRITE_LOCK);
      for (const args of readers('ro-top.qcow2', 'ro-out.qcow2')) {
        await worked(args);
        rmSync(join(dir, 'ro-out.qcow2'), { force: true });
      }
    });
    // Each command that opened the images (in the long-lived CLI server) released every lock.
    expect(locksOf('ro-top.qcow2', 'ro-base.qcow2', 'ro-out.qcow2')).toEqual([[], [], []]);
    await whileHeld(['ro-top.qcow2', 'ro-base.qcow2'], 'qcow2', ['-r', '-U'], async () => {
      await worked(['resize', 'ro-top.qcow2', '2M']);
      await worked(['check', '-r', 'all', 'ro-top.qcow2']);
      await worked(['convert', '-n', '-O', 'qcow2', 'src.qcow2', 'ro-top.qcow2']);
      await worked(['snapshot', '-c', 's2', 'ro-top.qcow2']);
      await worked(['rebase', '-u', '-b', 'ro-base.qcow2', '-F', 'qcow2', 'ro-top.qcow2']);
      await worked(['commit', 'ro-top.qcow2']);
    });
  });

  it('its backing file or its data file: the opens that conflict there refuse, naming that file', async () => {
    await images('bk-');
    // A writer of the backing file: opening the overlay reads it, which the writer does not share.
    await whileHeld(['bk-base.qcow2'], 'qcow2', [], async () => {
      await worked(['info', 'bk-top.qcow2']);
      await refused(['info', '--backing-chain', 'bk-top.qcow2'], ['bk-base.qcow2'], SHARED_WRITE_LOCK);
      await worked(['info', '-U', '--backing-chain', 'bk-top.qcow2']);
      await refused(['map', 'bk-top.qcow2'], ['bk-base.qcow2'], /Could not open backing file: Failed to get shared "write" lock\nIs another process using the image \[bk-base.qcow2\]/);
      await worked(['map', '-U', 'bk-top.qcow2']);
      await refused(['resize', 'bk-top.qcow2', '2M'], ['bk-top.qcow2', 'bk-base.qcow2'], SHARED_WRITE_LOCK);
      await refused(['check', '-r', 'all', 'bk-top.qcow2'], ['bk-top.qcow2', 'bk-base.qcow2'], SHARED_WRITE_LOCK);
      await refused(['convert', '-O', 'qcow2', 'bk-top.qcow2', 'bk-out.qcow2'], ['bk-base.qcow2'], SHARED_WRITE_LOCK);
      await worked(['convert', '-U', '-O', 'qcow2', 'bk-top.qcow2', 'bk-out.qcow2']);
      rmSync(join(dir, 'bk-out.qcow2'), { force: true });
      // qemu-img create reads the backing file's size without locking it.
      await worked(['create', '-f', 'qcow2', '-b', 'bk-base.qcow2', '-F', 'qcow2', 'bk-new.qcow2']);
    });
    // A writer of the data file (it shares writes): only convert, whose source refuses other writers, conflicts.
    await whileHeld(['bk-d.raw'], 'raw', [], async () => {
      await worked(['map', 'bk-d.qcow2']);
      await worked(['check', '-r', 'all', 'bk-d.qcow2']);
      await refused(['convert', '-O', 'raw', 'bk-d.qcow2', 'bk-out.raw'], ['bk-d.qcow2', 'bk-d.raw'], /Is another process using the image \[bk-d.raw\]/);
      await worked(['convert', '-U', '-O', 'raw', 'bk-d.qcow2', 'bk-out.raw']);
    });
    // The image writable in qemu-io: its data file may not be resized, nor read as a source.
    await whileHeld(['bk-d.qcow2', 'bk-d.raw'], 'qcow2', [], async () => {
      await worked(['map', '-f', 'raw', 'bk-d.raw']);
      await refused(['resize', '-f', 'raw', 'bk-d.raw', '2M'], ['bk-d.raw'], /Failed to get "resize" lock/);
      await refused(['convert', '-f', 'raw', '-O', 'qcow2', 'bk-d.raw', 'bk-out2.qcow2'], ['bk-d.raw'], SHARED_WRITE_LOCK);
    });
    expect(locksOf('bk-top.qcow2', 'bk-base.qcow2', 'bk-d.qcow2', 'bk-d.raw'), 'every qimg command released its locks')
      .toEqual([[], [], [], []]);
  });
});

/** What happens around a convert in progress (source slow.qcow2 -> target busy.qcow2). */
interface AroundConvert {
  locks: string[][];
  qemuIo: { code: number; stderr: string };
  resize: { code: number; stderr: string };
  info: { code: number; stderr: string };
  sourceResize: { code: number; stderr: string };
}

/**
 * Starts `start()` (a convert of slow.qcow2 to busy.qcow2 at 1 KiB/s), waits until it holds the
 * target's writer locks steadily, then records the locks and what other programs get meanwhile.
 */
async function aroundConvert(start: () => Promise<Background>, other: (args: string[]) => Promise<RunResult>): Promise<AroundConvert> {
  rmSync(join(dir, 'busy.qcow2'), { force: true });
  const before = sha('slow.qcow2');
  const proc = await start();
  try {
    const files = ['slow.qcow2', 'busy.qcow2'].map((f) => join(dir, f));
    const locks = await settledLocks(proc, files, ([src, dst]) => src!.length > 0 && dst!.includes('101') && dst!.includes('100'));
    const io = await run('qemu-io', ['-f', 'qcow2', '-c', 'read 0 512', 'busy.qcow2'], { cwd: dir });
    const pick = (r: RunResult): { code: number; stderr: string } => ({ code: r.code, stderr: r.stderr.replace(/^qemu-img: /gm, 'qimg: ') });
    const resize = pick(await other(['resize', 'busy.qcow2', '2M']));
    const info = pick(await other(['info', 'busy.qcow2']));
    const sourceResize = pick(await other(['resize', 'slow.qcow2', '2M']));
    expect(sha('slow.qcow2'), 'the source stays intact').toBe(before);
    return { locks, qemuIo: { code: io.code, stderr: io.stderr }, resize, info, sourceResize };
  } finally {
    await proc.stop();
  }
}

describe.concurrent('a convert in progress holds its images', () => {
  it('qimg convert holds the bytes qemu-img convert holds; qemu-io and a second qimg are refused alike', async () => {
    await qemuImgOk(['create', '-q', '-f', 'qcow2', 'slow.qcow2', '4M'], dir);
    await qemuIoOk('slow.qcow2', 'qcow2', ['write -P 5 0 4M'], dir);
    const args = ['convert', '-r', '1k', '-O', 'qcow2', 'slow.qcow2', 'busy.qcow2'];
    const theirs = await aroundConvert(async () => background('qemu-img', args, dir), (a) => qemuImg(a, dir));
    const ours = await aroundConvert(async () => background(process.execPath, [await cliPath(), ...args], dir), (a) => qimg(a, dir));
    expect(theirs.qemuIo.code).not.toBe(0);
    expect(theirs.qemuIo.stderr).toMatch(/^qemu-io: can't open device busy.qcow2: Failed to get "write" lock\n/);
    expect(theirs.locks).toEqual([['100', '201', '203'], ['100', '101', '103', '201', '203']]);
    expect(theirs.resize.stderr).toMatch(WRITE_LOCK);
    expect(theirs.info.stderr).toMatch(SHARED_WRITE_LOCK);
    expect(theirs.sourceResize.stderr).toMatch(WRITE_LOCK);
    expect(ours).toEqual(theirs);
  });
});

describe.concurrent('without the native binding (QIMG_NO_NATIVE=1)', () => {
  const NOTICE = 'qimg: warning: image locking is unavailable (no native helpers): other processes using the image are not detected\n';

  it('commands work and print the notice once', async () => {
    await images('nn-');
    const env = { QIMG_NO_NATIVE: '1' };
    const [info, convert, ref] = await Promise.all([
      qimgProcess(['info', '--backing-chain', 'nn-top.qcow2'], dir, env),
      // Three files opened and locked (the source, its backing file, the target): one notice.
      qimgProcess(['convert', '-O', 'qcow2', 'nn-top.qcow2', 'nn-out.qcow2'], dir, env),
      qemuImg(['info', '--backing-chain', 'nn-top.qcow2'], dir),
    ]);
    expect(info).toEqual({ code: 0, stdout: ref.stdout, stderr: NOTICE });
    expect(convert).toEqual({ code: 0, stdout: '', stderr: NOTICE });
    expect((await qemuImg(['compare', 'nn-top.qcow2', 'nn-out.qcow2'], dir)).stdout).toBe('Images are identical.\n');
    // With the binding no notice (the same command, in the CLI server).
    const plain = await qimg(['info', '--backing-chain', 'nn-top.qcow2'], dir);
    expect(plain.stderr).toBe('');
  });
});
