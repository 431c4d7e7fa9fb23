// Crash consistency: a child process (test/crash/writer.ts, bundled by the global setup) writes to
// a qcow2 image through qimg in an endless loop of writes, zero writes, discards, compressed
// writes (zlib or zstd) and flushes; the test SIGKILLs it once it has done real work (a minimum of
// ops started and of flushes returned, read from the log the writer keeps, plus a random number of
// ops and a random delay more), several times per image, then:
//  - `qemu-img check` finds no corruption (leaks allowed: exit 0 or 3, no ERROR line). With
//    lazy_refcounts a dirty image may have refcount-only errors, which qimg's writable open must
//    repair (after which the check is clean and QEMU reads the same data);
//  - `qemu-img convert -O raw` succeeds, qimg opens the image and reads what QEMU reads;
//  - data integrity: every byte reads as the model after the last logged flush, except bytes that
//    ops started after that flush touched, which may hold the value any of those ops wrote there.
//
// QIMG_CRASH_SEED=<n> replays the random choices (kill points, writer seeds, backing data);
// QIMG_CRASH_VERBOSE=1 prints what each round did.

import { type ChildProcess, spawn } from 'node:child_process';
import { closeSync, mkdirSync, openSync, readFileSync, readSync, writeFileSync } from 'node:fs';
import { randomBytes } from 'node:crypto';
import { join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { KiB, MiB, qemuImg, referenceRaw, run, tmpDir, withImage } from '../helpers/qemu.js';
import {
  type DiskOp, type DiskShape, applyOp, describeDiff, describeOp, discardedRange, firstDiff, isRefcountOnlyError,
  openWritable, parseCheck, patternBytes, prng, randInt,
} from '../helpers/model.js';
import { type CrashDisk, compressedWrites, crashOps, firstOps, readCrashDisk } from './ops.js';
import { bundles } from '../helpers/bundle.js';

const dir = tmpDir('qimg-crash-');

const writerJs = bundles().crashWriter;

/**
 * QIMG_CRASH_ENGINE=qemu-io: the writer drives qemu-io instead of qimg (checks this test against
 * QEMU). QEMU 7.2 itself can fail it on compressed writes: qcow2_co_pwritev_compressed_task links
 * the L2 entry before it writes the compressed bytes, so a kill in between (the L2 table written
 * out meanwhile) leaves a cluster that no longer decompresses. qimg writes metadata out only once
 * the data writes in flight are done.
 */
const ENGINE = process.env.QIMG_CRASH_ENGINE === 'qemu-io' ? 'qemu-io' : 'qimg';

const masterSeed = process.env.QIMG_CRASH_SEED ? Number(process.env.QIMG_CRASH_SEED) : (randomBytes(4).readUInt32LE() >>> 1);
const master = prng(masterSeed);

interface CrashCase {
  name: string;
  clusterSize: number;
  clusters: number;
  refcountBits: number;
  lazy: boolean;
  backing: boolean;
  extendedL2?: boolean;
  compat?: '0.10' | '1.1';
  compression?: 'zstd';
  kills: number;
}

// Sizes: enough clusters for ops of up to 4 clusters to land apart and overlap, no more (each round
// has QEMU convert the whole disk).
const CASES: CrashCase[] = [
  { name: '512 B clusters, refcount_bits=16', clusterSize: 512, clusters: 4096, refcountBits: 16, lazy: false, backing: false, kills: 3 },
  { name: '512 B clusters, refcount_bits=1, lazy', clusterSize: 512, clusters: 4096, refcountBits: 1, lazy: true, backing: false, kills: 3 },
  { name: '512 B clusters, refcount_bits=64, backing, zstd', clusterSize: 512, clusters: 4096, refcountBits: 64, lazy: false, backing: true, compression: 'zstd', kills: 3 },
  { name: '512 B clusters, refcount_bits=16, lazy, backing', clusterSize: 512, clusters: 4096, refcountBits: 16, lazy: true, backing: true, kills: 3 },
  { name: '64 KiB clusters, refcount_bits=16, zstd', clusterSize: 64 * KiB, clusters: 128, refcountBits: 16, lazy: false, backing: false, compression: 'zstd', kills: 3 },
  { name: '64 KiB clusters, refcount_bits=1, backing', clusterSize: 64 * KiB, clusters: 128, refcountBits: 1, lazy: false, backing: true, kills: 3 },
  { name: '64 KiB clusters, refcount_bits=64, lazy', clusterSize: 64 * KiB, clusters: 128, refcountBits: 64, lazy: true, backing: false, kills: 3 },
  { name: '64 KiB clusters, extended L2, lazy, backing, zstd', clusterSize: 64 * KiB, clusters: 128, refcountBits: 16, lazy: true, backing: true, extendedL2: true, compression: 'zstd', kills: 3 },
  { name: '64 KiB clusters, compat 0.10, backing (no compressed writes)', clusterSize: 64 * KiB, clusters: 128, refcountBits: 16, lazy: false, backing: true, compat: '0.10', kills: 3 },
  { name: '2 MiB clusters, refcount_bits=16', clusterSize: 2 * MiB, clusters: 12, refcountBits: 16, lazy: false, backing: false, kills: 3 },
  { name: '2 MiB clusters, refcount_bits=64, lazy, backing', clusterSize: 2 * MiB, clusters: 12, refcountBits: 64, lazy: true, backing: true, kills: 3 },
  { name: '2 MiB clusters, refcount_bits=1, zstd', clusterSize: 2 * MiB, clusters: 12, refcountBits: 1, lazy: false, backing: false, compression: 'zstd', kills: 3 },
];

/**
 * The work a round must have done before the kill: ops started (more for small clusters, whose
 * ops are quick) and flushes returned; with compressed writes in the stream, the first of them done.
 */
function minimumWork(clusterSize: number): { ops: number; flushes: number } {
  if (clusterSize >= 2 * MiB) return { ops: 12, flushes: 2 };
  if (clusterSize >= 64 * KiB) return { ops: 30, flushes: 2 };
  return { ops: 60, flushes: 2 };
}

interface Log {
  ready: boolean;
  started: number; // ops started (highest S + 1)
  flushed: number; // ops durable (highest F)
  flushes: number; // F lines
  error?: string;
}

function parseLog(text: string): Log {
  const log: Log = { ready: false, started: 0, flushed: 0, flushes: 0 };
  for (const line of text.split('\n')) {
    if (line === 'R') log.ready = true;
    else if (line.startsWith('S ')) log.started = Math.max(log.started, Number(line.slice(2)) + 1);
    else if (line.startsWith('F ')) {
      log.flushed = Math.max(log.flushed, Number(line.slice(2)));
      log.flushes++;
    } else if (line.startsWith('E ')) log.error = JSON.parse(line.slice(2)) as string;
  }
  return log;
}

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

/** Writers still running (killed after each test whatever happened, e.g. a timeout). */
const live = new Set<ChildProcess>();
afterEach(() => {
  for (const child of live) {
    try {
      process.kill(-child.pid!, 'SIGKILL');
    } catch {
      // already gone
    }
  }
  live.clear();
});

interface KillPoint {
  /** Kill once this many ops have started ... */
  ops: number;
  /** ... and this many flushes have returned ... */
  flushes: number;
  /** ... this long after the log said so. */
  delayMs: number;
}

/** Runs the writer until it has logged the progress `kill` asks for, then SIGKILLs it. */
async function runAndKill(image: string, logFile: string, seed: number, disk: CrashDisk, kill: KillPoint): Promise<Log> {
  writeFileSync(logFile, '');
  const child = spawn(process.execPath, [writerJs, image, logFile, String(seed), String(disk.virtualSize), String(disk.clusterSize), ENGINE], {
    stdio: ['ignore', 'ignore', 'pipe'],
    // Its own process group, killed as a whole (the qemu-io engine has a child of its own).
    detached: true,
  });
  live.add(child);
  let stderr = '';
  child.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
  const exited = new Promise<{ code: number | null; signal: NodeJS.Signals | null }>((resolve) =>
    child.on('exit', (code, signal) => resolve({ code, signal })),
  );
  let exitInfo: { code: number | null; signal: NodeJS.Signals | null } | undefined;
  void exited.then((x) => (exitInfo = x));
  // No time limit of its own: a writer that stops making progress is ended by the test's timeout
  // (and afterEach). The log is read as it grows.
  let text = '';
  let log = parseLog('');
  const fd = openSync(logFile, 'r');
  try {
    const buf = Buffer.alloc(64 * KiB);
    while (!exitInfo && !(log.ready && log.started >= kill.ops && log.flushes >= kill.flushes)) {
      await sleep(2);
      for (let n; (n = readSync(fd, buf, 0, buf.length, null)) > 0; ) text += buf.toString('latin1', 0, n);
      log = parseLog(text);
    }
  } finally {
    closeSync(fd);
  }
  if (!exitInfo) {
    if (kill.delayMs > 0) await sleep(kill.delayMs);
    process.kill(-child.pid!, 'SIGKILL');
  }
  const how = await exited;
  live.delete(child);
  log = parseLog(readFileSync(logFile, 'latin1'));
  if (how.signal !== 'SIGKILL' || !log.ready) {
    const ops = firstOps(seed, disk, log.started);
    const last = ops.length > 0 ? ` in op ${ops.length - 1}: ${describeOp(ops[ops.length - 1]!)} (the 20 ops before it: ${ops.slice(-21, -1).map(describeOp).join('; ')})` : ' before its first op';
    throw new Error(
      `writer (seed ${seed}) ended by itself (code ${how.code}, signal ${how.signal})${last}${log.error ? `\nwith: ${log.error}` : ''}\n${stderr}`,
    );
  }
  return log;
}

function isDirty(file: string): boolean {
  const fd = openSync(file, 'r');
  try {
    const b = Buffer.alloc(8);
    readSync(fd, b, 0, 8, 72);
    return (b.readBigUInt64BE(0) & 1n) === 1n;
  } finally {
    closeSync(fd);
  }
}

const BLOCK = 4096;
const ZEROS = Buffer.alloc(BLOCK);

/**
 * Every byte of `actual` equals `durable` unless some op in `uncertain` (started, not covered by a
 * flush) touched it and would have left exactly that value there. Returns a description of the
 * first unexplained byte, or null. (Per 4 KiB block, a native compare first: equal blocks and
 * blocks all one op wrote need no byte loop, which took a second a round on 2 MiB clusters.)
 */
function unexplained(actual: Uint8Array, durable: Uint8Array, uncertain: DiskOp[], shape: DiskShape): string | null {
  if (firstDiff(actual, durable) < 0) return null;
  const spans: { from: number; to: number; value: Uint8Array | 0 }[] = [];
  for (const op of uncertain) {
    if (op.k === 'write' || op.k === 'compressed') spans.push({ from: op.off, to: op.off + op.len, value: patternBytes(op.fill, op.len) });
    else if (op.k === 'zero') spans.push({ from: op.off, to: op.off + op.len, value: 0 });
    else if (op.k === 'discard') {
      const r = discardedRange(shape, op.off, op.len);
      if (r) spans.push({ from: r[0], to: r[1], value: 0 });
    }
  }
  const view = (b: Uint8Array, from: number, to: number): Buffer => Buffer.from(b.buffer, b.byteOffset + from, to - from);
  for (let start = 0; start < actual.length; start += BLOCK) {
    const end = Math.min(start + BLOCK, actual.length);
    const got = view(actual, start, end);
    if (got.equals(view(durable, start, end))) continue;
    const here = spans.filter((s) => s.from < end && start < s.to);
    // The usual case: the whole block is what one op left there.
    const whole = (s: (typeof spans)[number]): boolean =>
      s.from <= start && end <= s.to && got.equals(s.value === 0 ? ZEROS.subarray(0, end - start) : view(s.value, start - s.from, end - s.from));
    if (here.some(whole)) continue;
    for (let i = start; i < end; i++) {
      if (actual[i] === durable[i]) continue;
      const v = actual[i];
      if (!here.some((s) => s.from <= i && i < s.to && v === (s.value === 0 ? 0 : s.value[i - s.from]))) {
        return describeDiff('qemu-img convert vs the state at the last flush', actual.subarray(0, i + 64), durable.subarray(0, i + 64), i);
      }
    }
  }
  return null;
}

async function check(file: string): Promise<ReturnType<typeof parseCheck>> {
  const r = await run('qemu-img', ['check', '-f', 'qcow2', file]);
  return parseCheck(r.code, r.stdout, r.stderr);
}

/** The index of the first compressed write in the stream (within `limit` ops), or -1. */
function firstCompressed(seed: number, disk: CrashDisk, limit: number): number {
  let k = 0;
  for (const op of crashOps(seed, disk)) {
    if (op.k === 'compressed') return k;
    if (++k >= limit) return -1;
  }
  return -1;
}

describe(`crash consistency: SIGKILL of a qimg writer once it has done real work (QIMG_CRASH_SEED=${masterSeed})`, () => {
  for (const c of CASES) {
    const caseSeed = Math.floor(master() * 2 ** 31);
    it(c.name, async () => {
      const rand = prng(caseSeed);
      const caseDir = join(dir, c.name.replace(/[^a-z0-9]+/gi, '-'));
      mkdirSync(caseDir);
      const file = join(caseDir, 'disk.qcow2');
      const virtualSize = c.clusters * c.clusterSize;
      const o = [`cluster_size=${c.clusterSize}`, `refcount_bits=${c.refcountBits}`, `compat=${c.compat ?? '1.1'}`];
      if (c.lazy) o.push('lazy_refcounts=on');
      if (c.extendedL2) o.push('extended_l2=on');
      if (c.compression) o.push(`compression_type=${c.compression}`);
      const args = ['create', '-q', '-f', 'qcow2', '-o', o.join(',')];
      // What QEMU reads from the fresh image: zeros, or the backing file's bytes.
      let base = new Uint8Array(virtualSize);
      if (c.backing) {
        // A raw backing file of (seeded) random data, a few clusters shorter than the overlay.
        const backing = patternBytes(256 + randInt(rand, 0, 0x7fffff00), virtualSize - 3 * c.clusterSize + 512);
        const baseFile = join(caseDir, 'base.raw');
        writeFileSync(baseFile, backing);
        base.set(backing);
        args.push('-b', baseFile, '-F', 'raw');
      }
      args.push(file, String(virtualSize));
      await qemuImg(args);
      const version = c.compat === '0.10' ? 2 : 3;
      const shape: DiskShape = { virtualSize, clusterSize: c.clusterSize, version, hasBacking: c.backing };
      const disk = readCrashDisk(file);
      expect(disk).toEqual({ virtualSize, clusterSize: c.clusterSize, compressed: compressedWrites(version, c.backing) });
      const work = minimumWork(c.clusterSize);
      let compressedOps = 0;

      for (let round = 0; round < c.kills; round++) {
        const seed = Math.floor(rand() * 2 ** 31);
        // Past the minimum (and the first compressed write, done), a random number of ops more,
        // then a random delay: the kill lands anywhere in an op, a flush included.
        const compressedAt = disk.compressed ? firstCompressed(seed, disk, 10_000) : -1;
        const kill: KillPoint = {
          ops: Math.max(work.ops, compressedAt + 2) + randInt(rand, 0, work.ops / 2),
          flushes: work.flushes,
          delayMs: randInt(rand, 0, 20),
        };
        const logFile = join(caseDir, `round${round}.log`);
        const log = await runAndKill(file, logFile, seed, disk, kill);
        const ops = firstOps(seed, disk, log.started);
        const where = () =>
          `[${c.name}, case seed ${caseSeed}, round ${round}: writer seed ${seed}, killed ${kill.delayMs} ms after ${kill.ops} ops and ${kill.flushes} flushes; ` +
          `${log.started} ops started, ${log.flushes} flushes, the last covering ${log.flushed} ops; image ${file}]\n` +
          `ops since the last flush: ${ops.slice(log.flushed).map(describeOp).join('; ') || '(none)'}`;
        // The round did real work before it was killed.
        expect(log.started, where()).toBeGreaterThanOrEqual(kill.ops);
        expect(log.flushes, where()).toBeGreaterThanOrEqual(kill.flushes);
        const compressedDone = ops.slice(0, -1).filter((op) => op.k === 'compressed').length;
        if (disk.compressed) expect(compressedDone, `compressed writes done ${where()}`).toBeGreaterThan(0);
        compressedOps += compressedDone;

        // 1. qemu-img check: no corruption (leaks allowed); a dirty lazy-refcounts image may have
        //    refcount-only errors. 2. QEMU reads the image (both at once: neither writes).
        const dirty = c.lazy && isDirty(file);
        const [chk, actualBuf] = await Promise.all([check(file), referenceRaw(file, { format: 'qcow2' })]);
        const actual = new Uint8Array(actualBuf);
        if (dirty) {
          const bad = chk.errorLines.filter((l) => !isRefcountOnlyError(l));
          if (bad.length > 0 || ![0, 2, 3].includes(chk.code)) {
            throw new Error(`qemu-img check of a dirty lazy-refcounts image found more than refcount damage (exit ${chk.code}):\n${bad.join('\n')}\n${chk.output}\n${where()}`);
          }
        } else if (!(chk.code === 0 || chk.code === 3) || chk.errorLines.length > 0) {
          throw new Error(`qemu-img check found corruption (exit ${chk.code}):\n${chk.output}\n${where()}`);
        }

        // Every byte is what the last flush made durable, or what an op after it wrote.
        const durable = base.slice();
        for (const op of ops.slice(0, log.flushed)) applyOp(durable, shape, op);
        const why = unexplained(actual, durable, ops.slice(log.flushed), shape);
        if (why) throw new Error(`${why}\n${where()}`);

        // 3. qimg opens it (read-only) and reads what QEMU reads.
        await withImage(file, { format: 'qcow2' }, async (image) => {
          const ours = await image.read(0, image.virtualSize);
          const i = firstDiff(ours, actual);
          if (i >= 0) throw new Error(`${describeDiff('qimg read vs qemu-img convert after the crash', ours, actual, i)}\n${where()}`);
        });

        // 4. Lazy refcounts: a writable open repairs the dirty image (QEMU does the same).
        if (c.lazy && (dirty || !chk.clean)) {
          if (ENGINE === 'qimg') {
            const img = await openWritable(file, { format: 'qcow2' });
            await img.close();
          } else {
            // Checking this test against QEMU: QEMU's writable open repairs it.
            await run('qemu-io', ['-f', 'qcow2', '-c', 'flush', file]);
          }
          const [after, repaired] = await Promise.all([check(file), referenceRaw(file, { format: 'qcow2' })]);
          if (!after.clean) throw new Error(`after the writable open (${ENGINE}) the image is not clean:\n${after.output}\n${where()}`);
          expect(isDirty(file), `still dirty after repair ${where()}`).toBe(false);
          const i = firstDiff(new Uint8Array(repaired), actual);
          if (i >= 0) throw new Error(`${describeDiff('data after the refcount repair vs before', new Uint8Array(repaired), actual, i)}\n${where()}`);
        }
        if (process.env.QIMG_CRASH_VERBOSE) {
          console.log(
            `${c.name} round ${round}: ${log.started} ops started (${compressedDone} compressed writes done), ${log.flushes} flushes covering ${log.flushed} ops, ` +
              `dirty=${dirty}, check exit ${chk.code}, ${chk.leaked} leaked, ${firstDiff(actual, base) >= 0 ? 'changed' : 'unchanged'}`,
          );
        }
        base = actual;
      }
      if (!disk.compressed) expect(compressedOps).toBe(0);
    }, 120_000);
  }
});
