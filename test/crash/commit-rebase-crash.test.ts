// Crash safety of qimg commit and qimg rebase: a real `qimg commit -p` / `qimg rebase -p` process
// is SIGKILLed once its progress line has reached a random percentage (plus a random delay of a
// few milliseconds; for commit every other round at 100%, when the overlay is being emptied),
// several rounds per case, each on fresh copies of the inputs. Then:
//  - `qemu-img check` finds no corruption in any image (exit 0, or 3 for leaked clusters only);
//  - commit: the overlay's chain reads exactly as before (the base only receives what the layers
//    above it show; the overlay is emptied only after the base is flushed), and the base alone reads,
//    cluster by cluster, either as it did or as the overlay's chain does;
//  - rebase (safe mode): the overlay's guest view is unchanged, through whichever backing file its
//    header names after the kill (the old one until the single header write lands, then the new).
//
// QIMG_CRASH_SEED=<n> replays the random choices.

import { type ChildProcess, spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { copyFile, mkdir, readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { KiB, qemuImg, qemuImgResult, run, tmpDir } from '../helpers/qemu.js';
import { prng, randInt } from '../helpers/model.js';
import { bundles } from '../helpers/bundle.js';

const dir = tmpDir('qimg-crash-cr-');
const masterSeed = process.env.QIMG_CRASH_SEED ? Number(process.env.QIMG_CRASH_SEED) : (randomBytes(4).readUInt32LE() >>> 1);
console.log(`commit/rebase crash seed: ${masterSeed} (QIMG_CRASH_SEED replays)`);

/** qimg processes not yet reaped (killed at the end whatever happened, e.g. a timeout). */
const running = new Set<ChildProcess>();
afterAll(() => {
  for (const child of running) {
    try {
      process.kill(child.pid!, 'SIGKILL');
    } catch {
      // already gone
    }
  }
  running.clear();
});

async function ok(args: string[], cwd: string): Promise<void> {
  await qemuImg(args, { cwd });
}

async function io(file: string, cmds: string[], cwd: string): Promise<void> {
  const args = ['-f', 'qcow2'];
  for (const c of cmds) args.push('-c', c);
  const r = await run('qemu-io', [...args, file], { cwd });
  if (r.code !== 0 || /failed|error/i.test(r.stdout + r.stderr)) throw new Error(`qemu-io ${args.join(' ')} ${file}: ${r.stdout}${r.stderr}`);
}

/**
 * Runs qimg with -p in cwd and SIGKILLs it once its progress has reached `percent` (then after
 * `delayMs`); resolves with whether it was killed (it may finish first).
 */
async function runAndKill(args: string[], cwd: string, percent: number, delayMs: number): Promise<boolean> {
  const child = spawn(process.execPath, [bundles().cli, ...args], { cwd, stdio: ['ignore', 'pipe', 'pipe'] });
  running.add(child);
  let stderr = '';
  child.stderr!.on('data', (d: Buffer) => (stderr += d.toString()));
  const exited = new Promise<number | null>((resolve) => child.on('exit', (code) => resolve(code)));
  let reached!: () => void;
  const reachedPromise = new Promise<void>((resolve) => (reached = resolve));
  let out = '';
  child.stdout!.on('data', (d: Buffer) => {
    out += d.toString();
    for (const m of out.matchAll(/\(\s*([\d.]+)\/100%\)/g)) if (Number(m[1]) >= percent) reached();
  });
  try {
    const first = await Promise.race([reachedPromise.then(() => 'reached' as const), exited.then(() => 'exited' as const)]);
    if (first === 'exited') {
      const code = await exited;
      if (code !== 0) throw new Error(`qimg ${args.join(' ')} failed (${code}): ${stderr}`);
      return false;
    }
    if (delayMs > 0) await new Promise((r) => setTimeout(r, delayMs));
    const killed = child.kill('SIGKILL');
    const code = await exited;
    if (!killed && code !== 0) throw new Error(`qimg ${args.join(' ')} failed (${code}): ${stderr}`);
    return killed && code === null;
  } finally {
    if (child.exitCode === null && child.signalCode === null) {
      child.kill('SIGKILL');
      await exited;
    }
    running.delete(child);
  }
}

async function expectNoCorruption(file: string, cwd: string): Promise<void> {
  const r = await qemuImgResult(['check', '-f', 'qcow2', file], { cwd });
  // 0: clean; 3: leaked clusters only. 2 is corruption, 1 a check that could not run.
  expect([0, 3], `qemu-img check ${file}: ${r.stdout}${r.stderr}`).toContain(r.code);
  expect(r.stdout).not.toMatch(/ERROR/);
}

async function rawOf(file: string, cwd: string, out: string, aloneFile = false): Promise<Buffer> {
  const src = aloneFile
    ? `json:${JSON.stringify({ driver: 'qcow2', file: { driver: 'file', filename: file }, backing: null })}`
    : file;
  await ok(['convert', '-U', '-O', 'raw', src, out], cwd);
  return readFile(join(cwd, out));
}

/** Each cluster of `now` equals that cluster of `before` or of `after` (zeros past a shorter one's end). */
function expectEachClusterOldOrNew(now: Buffer, before: Buffer, after: Buffer, cs: number, what: string): void {
  const at = (b: Buffer, s: number, e: number): Buffer => {
    const part = Buffer.alloc(e - s);
    if (s < b.length) b.copy(part, 0, s, Math.min(e, b.length));
    return part;
  };
  for (let s = 0; s < now.length; s += cs) {
    const e = Math.min(now.length, s + cs);
    const c = now.subarray(s, e);
    if (!c.equals(at(before, s, e)) && !c.equals(at(after, s, e))) {
      throw new Error(`${what}: cluster at ${s} is neither the old nor the new content`);
    }
  }
}

const ROUNDS = 4;

describe.concurrent('SIGKILL during commit and rebase leaves consistent images', () => {
  it('commit: the overlay chain reads the same, the base old or new per cluster, nothing corrupt', async () => {
    const rand = prng(masterSeed);
    const src = join(dir, 'commit-src');
    await mkdir(src, { recursive: true });
    // base (16 MiB, 64 KiB clusters) <- top (24 MiB, refcount_bits=1): the base grows; the top
    // holds data in most clusters, zero clusters and compressed clusters.
    await ok(['create', '-q', '-f', 'qcow2', 'base.qcow2', '16M'], src);
    await io('base.qcow2', ['write -P 1 0 16M'], src);
    await ok(['create', '-q', '-f', 'qcow2', '-o', 'refcount_bits=1', '-b', 'base.qcow2', '-F', 'qcow2', 'top.qcow2', '24M'], src);
    await io('top.qcow2', ['write -P 2 0 6M', 'write -z 6M 1M', 'write -P 3 7M 9M', 'write -c -P 4 16M 1M', 'write -P 5 17M 5M'], src);
    const beforeTop = await rawOf('top.qcow2', src, 'top-before.raw');
    const beforeBase = await rawOf('base.qcow2', src, 'base-before.raw');
    for (let round = 0; round < ROUNDS; round++) {
      const d = join(dir, `commit-${round}`);
      await mkdir(d, { recursive: true });
      await copyFile(join(src, 'base.qcow2'), join(d, 'base.qcow2'));
      await copyFile(join(src, 'top.qcow2'), join(d, 'top.qcow2'));
      // Odd rounds kill at the end, while the overlay is being emptied.
      const percent = round % 2 ? 100 : randInt(rand, 0, 99);
      const delay = round % 2 ? randInt(rand, 0, 150) : randInt(rand, 0, 20);
      const killed = await runAndKill(['commit', '-p', 'top.qcow2'], d, percent, delay);
      await expectNoCorruption('top.qcow2', d);
      await expectNoCorruption('base.qcow2', d);
      const top = await rawOf('top.qcow2', d, 'top-after.raw');
      expect(top.equals(beforeTop), `round ${round} (killed ${killed} at ${percent}% + ${delay} ms): the overlay chain changed`).toBe(true);
      const base = await rawOf('base.qcow2', d, 'base-after.raw');
      expectEachClusterOldOrNew(base, beforeBase, beforeTop, 64 * KiB, `round ${round}: base`);
    }
  });

  it('rebase: the overlay reads the same through whichever backing file it names, nothing corrupt', async () => {
    const rand = prng(masterSeed ^ 0x5eed);
    const src = join(dir, 'rebase-src');
    await mkdir(src, { recursive: true });
    // old.qcow2 and new.qcow2 differ in half the 64 KiB clusters; the overlay (512 B clusters:
    // many small allocations) allocates a few ranges of its own.
    await ok(['create', '-q', '-f', 'qcow2', 'old.qcow2', '16M'], src);
    await io('old.qcow2', ['write -P 1 0 16M'], src);
    await ok(['create', '-q', '-f', 'qcow2', 'new.qcow2', '16M'], src);
    const cmds: string[] = [];
    for (let c = 0; c < 256; c += 2) cmds.push(`write -P 1 ${c * 64}k 64k`, `write -P 9 ${(c + 1) * 64}k 64k`);
    await io('new.qcow2', cmds, src);
    await ok(['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=512', '-b', 'old.qcow2', '-F', 'qcow2', 'top.qcow2', '16M'], src);
    await io('top.qcow2', ['write -P 3 1M 1M', 'write -z 5M 512k', 'write -P 4 9000k 3k'], src);
    const before = await rawOf('top.qcow2', src, 'top-before.raw');
    for (let round = 0; round < ROUNDS; round++) {
      const d = join(dir, `rebase-${round}`);
      await mkdir(d, { recursive: true });
      for (const f of ['old.qcow2', 'new.qcow2', 'top.qcow2']) await copyFile(join(src, f), join(d, f));
      const percent = randInt(rand, 0, 100);
      const delay = randInt(rand, 0, 20);
      const killed = await runAndKill(['rebase', '-p', '-b', 'new.qcow2', '-F', 'qcow2', 'top.qcow2'], d, percent, delay);
      await expectNoCorruption('top.qcow2', d);
      const now = await rawOf('top.qcow2', d, 'top-after.raw');
      expect(now.equals(before), `round ${round} (killed ${killed} at ${percent}% + ${delay} ms): the guest view changed`).toBe(true);
    }
  });
});
