// Crash safety of `qimg snapshot -c / -a / -d`: the real CLI process is SIGKILLed at random moments
// while it works on an image with many allocated clusters (512-byte clusters, so an operation
// reads and rewrites hundreds of tables), then, through qemu-img:
//  - `qemu-img check` finds no corruption and no leaks either (qimg commits each operation with one
//    header write: before it the image is the old one, after it the new one);
//  - the snapshot table is the old one or the new one, never anything else;
//  - every snapshot in it, and the active layer, read what they read before (or, when the
//    operation completed, what it made them: the new snapshot, the applied contents);
//  - the image still works: the same command run again to completion leaves a clean image.
// Kill moments: a random delay up to one uninterrupted run's duration, or a random delay after the
// image file first changes (the operation's first write landed).
//
// QIMG_CRASH_SEED=<n> replays the random choices.

import { type ChildProcess, spawn } from 'node:child_process';
import { copyFile, readFile, rm, stat } from 'node:fs/promises';
import { randomBytes } from 'node:crypto';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { MiB, qemuImg, qemuIo, run, tmpDir } from '../helpers/qemu.js';
import { parseCheck, prng } from '../helpers/model.js';
import { bundles } from '../helpers/bundle.js';

const dir = tmpDir('qimg-snapshot-crash-');
const seed = process.env.QIMG_CRASH_SEED ? Number(process.env.QIMG_CRASH_SEED) : randomBytes(4).readUInt32LE() >>> 1;
const SIZE = 4 * MiB;
const base = join(dir, 'base.qcow2');

/** Processes still running when the file ends (a test that failed or timed out while one ran). */
const live = new Set<ChildProcess>();
afterAll(() => {
  for (const child of live) child.kill('SIGKILL');
  live.clear();
});
let outputs = 0;

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

interface State {
  snapshots: string[]; // "id:name"
  contents: Map<string, Buffer>; // id (or "active") -> bytes
}

async function readState(file: string): Promise<State> {
  const info = JSON.parse((await qemuImg(['info', '--output=json', file])).stdout) as { snapshots?: { id: string; name: string }[] };
  const snapshots = (info.snapshots ?? []).map((s) => `${s.id}:${s.name}`);
  const contents = new Map<string, Buffer>();
  for (const id of ['active', ...(info.snapshots ?? []).map((s) => s.id)]) {
    const out = `${file}.${id}.${outputs++}.raw`;
    await qemuImg(['convert', ...(id === 'active' ? [] : ['-l', `snapshot.id=${id}`]), '-O', 'raw', file, out]);
    contents.set(id, await readFile(out));
    await rm(out, { force: true });
  }
  return { snapshots, contents };
}

/** Runs `qimg snapshot args file`; with `kill`, SIGKILLs it at that moment. Resolves when it is gone. */
async function runQimg(args: string[], file: string, kill?: { afterMs: number; onChange: boolean }): Promise<{ code: number | null; killed: boolean; ms: number }> {
  const t0 = Date.now();
  const before = (await stat(file)).mtimeMs;
  const child = spawn(process.execPath, [bundles().cli, 'snapshot', ...args, file], { stdio: ['ignore', 'ignore', 'pipe'] });
  live.add(child);
  let stderr = '';
  child.stderr!.on('data', (d: Buffer) => (stderr += d.toString()));
  let exited = false;
  const done = new Promise<{ code: number | null; signal: NodeJS.Signals | null }>((resolve) =>
    child.on('exit', (code, signal) => {
      exited = true;
      resolve({ code, signal });
    }),
  );
  if (kill) {
    void (async () => {
      if (kill.onChange) {
        // Wait for the first write to the image, then the delay.
        while (!exited) {
          const s = await stat(file).catch(() => null);
          if (s && s.mtimeMs !== before) break;
          await sleep(1);
        }
      }
      await sleep(kill.afterMs);
      if (!exited) child.kill('SIGKILL');
    })();
  }
  const r = await done;
  live.delete(child);
  if (!kill && r.code !== 0) throw new Error(`qimg snapshot ${args.join(' ')} failed: ${stderr}`);
  return { code: r.code, killed: r.signal === 'SIGKILL', ms: Date.now() - t0 };
}

function sameState(a: State, b: State): boolean {
  if (a.snapshots.join() !== b.snapshots.join()) return false;
  for (const [k, v] of a.contents) if (!b.contents.get(k)?.equals(v)) return false;
  return true;
}

interface OpCase {
  name: string;
  args: string[];
}

const OPS: OpCase[] = [
  { name: 'create', args: ['-c', 'new'] },
  { name: 'apply', args: ['-a', 'old'] },
  { name: 'delete', args: ['-d', 'old'] },
];
const KILLS = 4;

beforeAll(async () => {
  // Every cluster allocated (8192 data clusters, 128 L2 tables), one snapshot, then half rewritten.
  await qemuImg(['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=512', base, String(SIZE)]);
  await qemuIo(base, [`write -P 0x11 0 ${SIZE}`]);
  await qemuImg(['snapshot', '-c', 'old', base]);
  await qemuIo(base, [`write -P 0x22 0 ${SIZE / 2}`, `write -z ${SIZE / 2} 64k`]);
}, 120_000);

describe(`SIGKILL during qimg snapshot (QIMG_CRASH_SEED=${seed})`, () => {
  // The three run side by side (each on its own copies, with its own random choices).
  it.concurrent.each(OPS.map((o, i) => [o.name, o, i] as const))('%s', async (_name, op, i) => {
    const rand = prng(seed + i);
    const before = await readState(base);
    // The outcome of a run that completes.
    const full = join(dir, `${op.name}-full.qcow2`);
    await copyFile(base, full);
    const { ms } = await runQimg(op.args, full);
    const after = await readState(full);
    expect(sameState(before, after)).toBe(false);
    for (let k = 0; k < KILLS; k++) {
      const img = join(dir, `${op.name}-${k}.qcow2`);
      await copyFile(base, img);
      const onChange = rand() < 0.5;
      const afterMs = Math.floor(rand() * (onChange ? 30 : ms));
      const r = await runQimg(op.args, img, { afterMs, onChange });
      const where = `${op.name} kill ${k} (${onChange ? 'after first write +' : 'after start +'}${afterMs} ms, ${r.killed ? 'killed' : `exited ${r.code}`})`;
      const chk = await run('qemu-img', ['check', img]);
      const c = parseCheck(chk.code, chk.stdout, chk.stderr);
      expect(c.clean, `${where}: ${c.output}`).toBe(true);
      const state = await readState(img);
      expect(sameState(state, before) || sameState(state, after), `${where}: neither the old nor the new image`).toBe(true);
      if (process.env.QIMG_CRASH_VERBOSE) process.stdout.write(`${where} (full run ${ms} ms): ${sameState(state, before) ? 'old' : 'new'} image\n`);
      // Still usable: the command completes now and leaves the outcome of a full run.
      if (sameState(state, before)) {
        await runQimg(op.args, img);
        const chk2 = await run('qemu-img', ['check', img]);
        expect(parseCheck(chk2.code, chk2.stdout, chk2.stderr).clean, `${where}, then run again`).toBe(true);
        expect(sameState(await readState(img), after), `${where}, then run again`).toBe(true);
      }
      await rm(img, { force: true });
    }
  }, 180_000);
});
