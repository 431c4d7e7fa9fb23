// Model-based property test of the qcow2 write engine: random sequences of write, writeZeroes
// (with and without mayUnmap), discard, writeCompressed, resize (growing with each preallocation
// mode, or shrinking), flush and close+reopen, applied both to
// the image through qimg and to a plain byte-array model of the guest disk with QEMU 7.2's
// semantics (test/helpers/model.ts; a grown range reads as zeros whatever the backing file holds
// there, and QEMU's refusals are predicted). After each sequence the image must pass `qemu-img check` with
// no errors and no leaks, and `qemu-img convert -O raw` (and qimg's own read) must equal the model.
//
// Shapes: cluster sizes 512 B .. 2 MiB, refcount widths 1..64, compat 0.10 / 1.1, extended L2,
// lazy refcounts, raw or qcow2 backing files of random data (sometimes shorter than the overlay),
// starting images prefilled by qemu-io with compressed clusters, data and zero clusters.
//
// Each cluster size is its own property run through checkProperty (test/helpers/property.ts): a
// seed printed for every run (QIMG_PROP_SEED=<n> replays it), a minimum number of sequences that
// always runs, more while a time budget lasts (QIMG_PROP_SCALE=<x> scales both). The four run
// side by side: vitest gives a 2-core machine one worker, and a sequence spends much of its time
// in qemu-img processes, so one run alone would leave a core idle.

import { settleAll } from '../../src/async.js';
import { randomBytes } from 'node:crypto';
import { mkdirSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import fc from 'fast-check';
import { beforeAll, describe, it } from 'vitest';
import { checkProperty } from '../helpers/property.js';
import { createImage } from '../../src/create.js';
import { KiB, MiB, qemuImg, qemuIo, referenceRaw, run, tmpDir, withImage } from '../helpers/qemu.js';
import {
  type DiskOp, type DiskShape, EngineMissing, type ResizableImage, type ResizeOp, type ResizeShape, applyOp, applyResize,
  describeDiff, describeOp, describeResize, firstDiff, openWritable, parseCheck, resizeRefusal, runOp, runResize,
  type WritableImage,
} from '../helpers/model.js';

/** The ops a sequence draws: the engine's DiskOps and resizes. */
type ModelOp = DiskOp | ResizeOp;

const describeModelOp = (op: ModelOp): string => (op.k === 'resize' ? describeResize(op) : describeOp(op));

const dir = tmpDir('qimg-write-model-');
/** qemu-io `write -s` source for prefilled data. */
const source = join(dir, 'source.bin');
const sourceBytes = randomBytes(2 * MiB);
let seq = 0;

interface Params {
  clusterSize: number;
  clusters: number;
  /** 512-byte sectors past the last whole cluster (a partial last cluster). */
  tailSectors: number;
  refcountBits: number;
  compat: '0.10' | '1.1';
  extendedL2: boolean;
  lazyRefcounts: boolean;
  backing: 'none' | 'raw' | 'qcow2';
  /** The backing file is this many sectors shorter than the overlay (negative: longer). */
  backingShortBy: number;
  creator: 'qemu-img' | 'qimg';
  /** Clusters prefilled by qemu-io before qimg writes: c = compressed, w = data, z = zero. */
  prefill: { cluster: number; kind: 'c' | 'w' | 'z' }[];
  /**
   * Ops between reopens are issued at once, none awaited before the next (the engine queues them
   * in call order while data writes are still in flight), instead of one after the other.
   */
  concurrent: boolean;
  /** The sequence may resize the disk (half of them: resizes cost fsyncs and bigger images). */
  resizes: boolean;
}

const sizeOf = (p: Params): number => p.clusters * p.clusterSize + p.tailSectors * 512;

function paramsArb(clusterSize: number): fc.Arbitrary<Params> {
  const big = clusterSize >= 2 * MiB;
  return fc
    .record({
      clusterSize: fc.constant(clusterSize),
      clusters: big ? fc.integer({ min: 4, max: 8 }) : fc.integer({ min: 8, max: 64 }),
      tailSectors: fc.oneof({ weight: 3, arbitrary: fc.constant(0) }, { weight: 1, arbitrary: fc.integer({ min: 1, max: Math.max(1, Math.min(127, clusterSize / 512 - 1)) }) }),
      refcountBits: fc.constantFrom(1, 2, 4, 8, 16, 32, 64),
      compat: fc.oneof({ weight: 4, arbitrary: fc.constant('1.1' as const) }, { weight: 1, arbitrary: fc.constant('0.10' as const) }),
      extendedL2: fc.boolean(),
      lazyRefcounts: fc.oneof({ weight: 3, arbitrary: fc.constant(false) }, { weight: 1, arbitrary: fc.constant(true) }),
      backing: fc.constantFrom('none' as const, 'none' as const, 'raw' as const, 'qcow2' as const),
      backingShortBy: fc.oneof(
        fc.constant(0),
        fc.integer({ min: 1, max: 3 * Math.max(1, clusterSize / 512) }),
        // Longer: a grown disk would show its data unless the resize hides it.
        fc.integer({ min: 1, max: 3 * Math.max(1, clusterSize / 512) }).map((k) => -k),
      ),
      creator: fc.constantFrom('qemu-img' as const, 'qimg' as const),
      concurrent: fc.boolean(),
      resizes: fc.boolean(),
      prefill: fc.oneof(
        { weight: 2, arbitrary: fc.constant([] as Params['prefill']) },
        {
          weight: 1,
          arbitrary: fc.array(
            fc.record({ cluster: fc.nat({ max: 63 }), kind: fc.constantFrom('c' as const, 'c' as const, 'w' as const, 'z' as const) }),
            { minLength: 1, maxLength: big ? 3 : 8 },
          ),
        },
      ),
    })
    .map((p) => {
      const v3 = p.compat === '1.1';
      // QEMU: refcount_bits other than 16, extended L2 and lazy refcounts need compat 1.1;
      // extended L2 needs clusters of at least 16 KiB.
      const q: Params = {
        ...p,
        refcountBits: v3 ? p.refcountBits : 16,
        extendedL2: v3 && p.extendedL2 && p.clusterSize >= 16 * KiB,
        lazyRefcounts: v3 && p.lazyRefcounts,
        prefill: p.prefill.filter((f) => f.cluster < p.clusters),
      };
      return q;
    });
}

/** Offsets and lengths biased toward cluster, subcluster and sector boundaries. */
function rangeArb(p: Params): fc.Arbitrary<{ off: number; len: number }> {
  const size = sizeOf(p);
  const cs = p.clusterSize;
  const sub = p.extendedL2 ? cs / 32 : cs;
  const unit = fc.constantFrom(cs, cs, sub, 512, 1);
  const delta = fc.oneof(
    { weight: 3, arbitrary: fc.constant(0) },
    { weight: 2, arbitrary: fc.constantFrom(-1, 1) },
    { weight: 1, arbitrary: fc.integer({ min: -700, max: 700 }) },
  );
  const off = fc.tuple(unit, fc.nat({ max: 1 << 30 }), delta).map(([u, k, d]) => {
    const base = (k % Math.ceil(size / u)) * u;
    return Math.max(0, Math.min(size - 1, base + d));
  });
  const len = fc.oneof(
    { weight: 1, arbitrary: fc.integer({ min: 1, max: 16 }) },
    { weight: 2, arbitrary: fc.integer({ min: 1, max: 3 * cs }) },
    { weight: 3, arbitrary: fc.tuple(unit, fc.integer({ min: 1, max: 3 }), delta).map(([u, k, d]) => Math.max(1, u * k + d)) },
  );
  return fc.tuple(off, len).map(([o, l]) => ({ off: o, len: Math.min(l, size - o) }));
}

function opsArb(p: Params): fc.Arbitrary<ModelOp[]> {
  const range = rangeArb(p);
  const size = sizeOf(p);
  const cs = p.clusterSize;
  // New sizes: a few sectors to clusters past the start size, double it, or smaller (a shrink,
  // often into a cluster). Ops drawn for the start size are cut to the size at their turn (legalOps).
  const newSize = fc.oneof(
    { weight: 2, arbitrary: fc.integer({ min: 1, max: Math.max(1, (3 * cs) / 512) }).map((k) => size + k * 512) },
    { weight: 1, arbitrary: fc.constant(Math.ceil((size * 1.5) / 512) * 512) },
    { weight: 2, arbitrary: fc.integer({ min: 1, max: size / 512 - 1 }).map((k) => k * 512) },
  );
  const resize: fc.Arbitrary<ResizeOp> = fc
    .tuple(newSize, fc.constantFrom('off' as const, 'off' as const, 'metadata' as const, 'metadata' as const, 'falloc' as const, 'full' as const))
    .map(([n, prealloc]) => ({ k: 'resize' as const, size: n, prealloc }));
  const fill = fc.oneof(fc.constant(0), fc.integer({ min: 1, max: 255 }), fc.integer({ min: 256, max: 0x7fffffff }));
  const op: fc.Arbitrary<ModelOp> = fc.oneof(
    { weight: 6, arbitrary: fc.tuple(range, fill).map(([r, f]) => ({ k: 'write' as const, ...r, fill: f })) },
    { weight: 3, arbitrary: fc.tuple(range, fc.boolean()).map(([r, u]) => ({ k: 'zero' as const, ...r, unmap: u })) },
    { weight: 3, arbitrary: range.map((r) => ({ k: 'discard' as const, ...r })) },
    {
      weight: 1,
      arbitrary: fc
        .tuple(fc.nat({ max: p.clusters - 1 }), fill)
        .map(([c, f]) => ({ k: 'compressed' as const, off: c * p.clusterSize, len: p.clusterSize, fill: f })),
    },
    { weight: 1, arbitrary: fc.constant({ k: 'flush' as const }) },
    { weight: 1, arbitrary: fc.constant({ k: 'reopen' as const }) },
    { weight: p.resizes ? 3 : 0, arbitrary: resize },
  );
  return fc.array(op, { minLength: 1, maxLength: p.clusterSize >= 2 * MiB ? 10 : 28 });
}

/** The backing file's virtual size (0 without one). */
const backingSizeOf = (p: Params): number => (p.backing === 'none' ? 0 : Math.max(512, sizeOf(p) - p.backingShortBy * 512));

/**
 * Makes the drawn ops legal for the disk at their turn: drops compressed writes into clusters that
 * are not pristine (touched by the prefill or by an earlier op; the engine, like QEMU, compresses
 * only into unallocated clusters) and ops past the current size (cut at it when they start inside);
 * a shrink never preallocates. Resizes the model cannot predict are dropped: extended L2 refusing
 * to split a compressed cluster holding the old end into zero subclusters.
 */
function legalOps(p: Params, ops: ModelOp[]): ModelOp[] {
  const cs = p.clusterSize;
  const sc = p.extendedL2 ? cs / 32 : cs;
  const touched = new Set<number>(p.prefill.map((f) => f.cluster));
  const compressed = new Set<number>(p.prefill.filter((f) => f.kind === 'c').map((f) => f.cluster));
  const backingSize = backingSizeOf(p);
  let size = sizeOf(p);
  const out: ModelOp[] = [];
  for (const op of ops) {
    if (op.k === 'flush' || op.k === 'reopen') {
      out.push(op);
      continue;
    }
    if (op.k === 'resize') {
      if (op.size === size) continue;
      const r: ResizeOp = op.size < size ? { ...op, prealloc: 'off' } : op;
      const zeroFill = backingSize > size && r.size > size;
      const zeroStart = Math.ceil(size / sc) * sc;
      if (p.extendedL2 && zeroFill && r.prealloc === 'off' && compressed.has(Math.floor(size / cs)) && zeroStart % cs !== 0 && r.size > zeroStart) continue;
      out.push(r);
      const shape: ResizeShape = { virtualSize: size, clusterSize: cs, version: p.compat === '1.1' ? 3 : 2, hasBacking: p.backing !== 'none', backingSize };
      if (resizeRefusal(shape, r) === null) {
        // Clusters wholly past a shrunk end are freed: pristine again; grown ones may be allocated.
        if (r.size < size) for (let c = Math.ceil(r.size / cs); c < Math.ceil(size / cs); c++) touched.delete(c);
        else for (let c = Math.floor(size / cs); c < Math.ceil(r.size / cs); c++) touched.add(c);
        size = r.size;
      }
      continue;
    }
    if (op.off >= size) continue;
    const o = op.off + op.len > size ? { ...op, len: size - op.off } : op;
    if (o.k === 'compressed') {
      const c = o.off / cs;
      // Whole clusters only (the last may end at the disk's end).
      if (touched.has(c) || (o.len !== cs && o.off + o.len !== size)) continue;
      touched.add(c);
      compressed.add(c);
      out.push(o);
      continue;
    }
    for (let c = Math.floor(o.off / cs); c <= Math.floor((o.off + o.len - 1) / cs); c++) touched.add(c);
    out.push(o);
  }
  return out;
}

function prefillCommands(p: Params): string[] {
  const cs = p.clusterSize;
  const size = sizeOf(p);
  const cmds: string[] = [];
  const done = new Set<number>();
  for (const f of p.prefill) {
    if (done.has(f.cluster)) continue;
    done.add(f.cluster);
    const off = f.cluster * cs;
    const len = Math.min(cs, size - off);
    if (f.kind === 'c') cmds.push(`write -c -s ${source} ${off} ${len}`);
    else if (f.kind === 'w') cmds.push(`write -s ${source} ${off} ${Math.max(512, len - 1024)}`);
    else cmds.push(`write -z ${off} ${len}`);
  }
  return cmds;
}

interface Built {
  file: string;
  runDir: string;
  setup: string[];
  /** The backing file's guest bytes (random data we wrote), when there is one. */
  backingBytes?: Uint8Array;
}

async function build(p: Params): Promise<Built> {
  const runDir = join(dir, `r${seq++}`);
  mkdirSync(runDir);
  const size = sizeOf(p);
  const file = join(runDir, 'disk.qcow2');
  const setup: string[] = [];
  let backingFile: string | undefined;
  let backingFormat: 'raw' | 'qcow2' | undefined;
  let backingBytes: Uint8Array | undefined;
  if (p.backing !== 'none') {
    const baseSize = backingSizeOf(p);
    const raw = join(runDir, 'base.raw');
    backingBytes = randomBytes(baseSize);
    writeFileSync(raw, backingBytes);
    setup.push(`head -c ${baseSize} /dev/urandom > base.raw`);
    if (p.backing === 'qcow2') {
      backingFile = join(runDir, 'base.qcow2');
      await qemuImg(['convert', '-q', '-f', 'raw', '-O', 'qcow2', raw, backingFile]);
      setup.push('qemu-img convert -f raw -O qcow2 base.raw base.qcow2');
    } else backingFile = raw;
    backingFormat = p.backing;
  }
  const o = [`cluster_size=${p.clusterSize}`, `refcount_bits=${p.refcountBits}`, `compat=${p.compat}`];
  if (p.extendedL2) o.push('extended_l2=on');
  if (p.lazyRefcounts) o.push('lazy_refcounts=on');
  const createArgs = ['create', '-q', '-f', 'qcow2', '-o', o.join(',')];
  if (backingFile) createArgs.push('-b', backingFile, '-F', backingFormat!);
  createArgs.push(file, String(size));
  if (p.creator === 'qemu-img') {
    await qemuImg(createArgs);
  } else {
    await createImage(file, {
      format: 'qcow2', size, clusterSize: p.clusterSize, refcountBits: p.refcountBits, compat: p.compat,
      ...(p.extendedL2 ? { extendedL2: true } : {}), ...(p.lazyRefcounts ? { lazyRefcounts: true } : {}),
      ...(backingFile ? { backingFile, backingFormat } : {}),
    });
  }
  setup.push(`${p.creator === 'qimg' ? 'qimg (createImage)' : 'qemu-img'} ${createArgs.slice(1).join(' ')}`.replaceAll(runDir + '/', ''));
  const cmds = prefillCommands(p);
  if (cmds.length > 0) {
    await qemuIo(file, cmds);
    setup.push(`qemu-io -f qcow2 ${cmds.map((c) => `-c '${c.replace(source, 'source.bin')}'`).join(' ')} disk.qcow2`);
  }
  return { file, runDir, setup, ...(backingBytes ? { backingBytes } : {}) };
}

/**
 * The guest disk before the ops, worked out instead of read back through qemu-img (one process
 * less per sequence; the end state is compared with QEMU's reading anyway, so a wrong start fails
 * the run): the backing file's bytes (zeros past its end) or zeros, then the prefill as qemu-io
 * does it (`write -s` takes the file's first bytes, `write -z` zeros).
 */
function initialModel(p: Params, b: Built): Uint8Array {
  const model = new Uint8Array(sizeOf(p));
  if (b.backingBytes) model.set(b.backingBytes.subarray(0, model.length));
  const cs = p.clusterSize;
  const done = new Set<number>();
  for (const f of p.prefill) {
    if (done.has(f.cluster)) continue;
    done.add(f.cluster);
    const off = f.cluster * cs;
    const len = Math.min(cs, model.length - off);
    if (f.kind === 'c') model.set(sourceBytes.subarray(0, len), off);
    else if (f.kind === 'w') model.set(sourceBytes.subarray(0, Math.max(512, len - 1024)), off);
    else model.fill(0, off, off + len);
  }
  return model;
}

function repro(p: Params, b: Built, ops: ModelOp[], upTo = ops.length): string {
  const lines = [
    `params: ${JSON.stringify(p)}`,
    ...b.setup.map((s) => `  $ ${s}`),
    `ops (${upTo} of ${ops.length}):`,
    ...ops.slice(0, upTo).map((op, i) => `  ${i}: ${describeModelOp(op)}`),
  ];
  return lines.join('\n');
}

async function property(p: Params, rawOps: ModelOp[]): Promise<void> {
  const ops = legalOps(p, rawOps);
  const b = await build(p);
  const shape: ResizeShape = {
    virtualSize: sizeOf(p), clusterSize: p.clusterSize, version: p.compat === '1.1' ? 3 : 2, hasBacking: p.backing !== 'none', backingSize: backingSizeOf(p),
  };
  let done = 0;
  let image: ResizableImage | undefined;
  try {
    let model = initialModel(p, b);
    image = await openEngine(b.file, b.runDir);
    // Concurrent: issued in order, settled together (every one awaited, the first failure thrown).
    const inFlight: Promise<void>[] = [];
    const settle = (): Promise<void> => settleAll(inFlight.splice(0));
    for (const op of ops) {
      if (op.k === 'reopen') {
        await settle();
        await image.close();
        image = undefined;
        image = await openEngine(b.file, b.runDir);
      } else if (op.k === 'resize') {
        // Waits for the ops before it (a resize is queued after them anyway).
        await settle();
        const refusal = resizeRefusal(shape, op);
        if (refusal === null) {
          await runResize(image, op);
          model = applyResize(model, op);
          shape.virtualSize = op.size;
        } else {
          const err = await runResize(image, op).then(() => null, (e: unknown) => e as Error);
          // (qemu-io's failure quotes QEMU's message among its output.)
          if (!err?.message.includes(refusal)) throw new Error(`${describeResize(op)}: expected the refusal "${refusal}", got ${err ? `"${err.message}"` : 'success'}`);
        }
      } else if (p.concurrent) {
        inFlight.push(runOp(image, op));
        applyOp(model, shape, op);
      } else {
        await runOp(image, op);
        applyOp(model, shape, op);
      }
      done++;
    }
    await settle();
    await image.close();
    image = undefined;

    // qemu-img check, QEMU's reading and ours, side by side (all read-only).
    const [chk, ref, ours] = await Promise.all([
      run('qemu-img', ['check', '-f', 'qcow2', b.file]),
      referenceRaw(b.file, { format: 'qcow2' }),
      withImage(b.file, { format: 'qcow2' }, (ro) => ro.read(0, ro.virtualSize)),
    ]);
    const check = parseCheck(chk.code, chk.stdout, chk.stderr);
    if (!check.clean) throw new Error(`qemu-img check (exit ${check.code}) is not clean:\n${check.output}`);
    const i = firstDiff(ref, model);
    if (i >= 0) throw new Error(describeDiff('qemu-img convert -O raw vs model', ref, model, i));
    const k = firstDiff(ours, model);
    if (k >= 0) throw new Error(describeDiff('qimg read vs model', ours, model, k));
    rmSync(b.runDir, { recursive: true, force: true });
  } catch (e) {
    if (e instanceof EngineMissing) throw e;
    await image?.close().catch(() => undefined);
    const failedAt = done < ops.length ? ` (op ${done} threw)` : '';
    throw new Error(`${(e as Error).message}${failedAt}\nrepro:\n${repro(p, b, ops, Math.min(ops.length, done + 1))}\nimage kept at ${b.file}`, { cause: e });
  }
}

/**
 * QIMG_WRITE_ENGINE=qemu-io runs the same ops through qemu-io instead of qimg: a check of the model
 * itself against QEMU (every op becomes a qemu-io command, run on close).
 */
const viaQemuIo = process.env.QIMG_WRITE_ENGINE === 'qemu-io';

function qemuIoWritable(file: string, runDir: string): ResizableImage {
  const cmds: string[] = [];
  let n = 0;
  const data = (d: Uint8Array): string => {
    const f = join(runDir, `data${n++}.bin`);
    writeFileSync(f, d);
    return f;
  };
  return {
    virtualSize: 0,
    read: () => Promise.reject(new Error('not used')),
    write: async (off, d) => void cmds.push(`write -s ${data(d)} ${off} ${d.length}`),
    writeZeroes: async (off, len, o) => void cmds.push(`write -z${o?.mayUnmap ? ' -u' : ''} ${off} ${len}`),
    discard: async (off, len) => void cmds.push(`discard ${off} ${len}`),
    // A new qemu-io session for every compressed write: QEMU 7.2 keeps the byte offset where the
    // last compressed cluster ended (s->free_byte_offset) even after that host cluster was freed and
    // reused for data, then appends the next compressed cluster into the data cluster (refcount 2,
    // "ERROR OFLAG_COPIED data cluster"). Minimal: write -c 8k 4k; write 12287 4095; write 0 4k;
    // write -c 4k 4k, all in one session (4 KiB clusters).
    writeCompressed: async (off, d) => {
      await qemuIo(file, cmds.splice(0));
      cmds.push(`write -c -s ${data(d)} ${off} ${d.length}`);
    },
    flush: async () => void cmds.push('flush'),
    // In a session of its own, after the commands before it (a refusal fails only this one).
    // QEMU 7.2 shows again the bytes a shrink left in the old last cluster, which the model (and
    // qimg) say read as zeros: sequences that shrink into a cluster and grow again fail here.
    resize: async (size, o) => {
      await qemuIo(file, [...cmds.splice(0), `truncate -m ${o.preallocation ?? 'off'} ${size}`]);
    },
    close: async () => {
      await qemuIo(file, cmds.splice(0));
    },
  };
}

function openEngine(file: string, runDir: string): Promise<ResizableImage> {
  // openWritable gives an Image, which has resize.
  return viaQemuIo ? Promise.resolve(qemuIoWritable(file, runDir)) : (openWritable(file, { format: 'qcow2' }) as Promise<ResizableImage>);
}

let probed: Promise<void> | undefined;
/** Fails fast (no shrinking) while the write engine is missing. */
function engineProbe(): Promise<void> {
  if (viaQemuIo) return Promise.resolve();
  probed ??= (async () => {
    const file = join(dir, 'probe.qcow2');
    await qemuImg(['create', '-q', '-f', 'qcow2', file, '1M']);
    const image = await openWritable(file, { format: 'qcow2' });
    await image.close();
  })();
  return probed;
}

/**
 * One cluster size per property run: `minRuns` sequences always run (with 20-25, each refcount
 * width, compat level, backing kind, creator and prefill kind is drawn with high probability;
 * the 2 MiB group's sequences are the slowest and fewest), more, up to `runs`, while the budget
 * lasts. The four run concurrently, so the file takes about one budget (longer only where a
 * slow machine needs more for the minimums).
 */
const GROUPS: { clusterSize: number; runs: number; minRuns: number; budgetMs: number }[] = [
  { clusterSize: 512, runs: 250, minRuns: 25, budgetMs: 18_000 },
  { clusterSize: 4 * KiB, runs: 250, minRuns: 25, budgetMs: 18_000 },
  { clusterSize: 64 * KiB, runs: 180, minRuns: 20, budgetMs: 18_000 },
  { clusterSize: 2 * MiB, runs: 60, minRuns: 10, budgetMs: 18_000 },
];

const label = (cs: number): string => (cs >= MiB ? `${cs / MiB} MiB` : cs >= KiB ? `${cs / KiB} KiB` : `${cs} B`);

describe.concurrent('qcow2 write engine against a byte model (qemu-img check + convert)', () => {
  beforeAll(() => {
    writeFileSync(source, sourceBytes);
  });

  for (const g of GROUPS) {
    it(`${label(g.clusterSize)} clusters: at least ${g.minRuns}, up to ${g.runs} random op sequences (${g.budgetMs / 1000} s budget)`, async () => {
      await engineProbe();
      const first: { message?: string } = {};
      try {
        await checkProperty(
          { name: `write engine, ${label(g.clusterSize)} clusters`, runs: g.runs, minRuns: g.minRuns, budgetMs: g.budgetMs },
          paramsArb(g.clusterSize).chain((p) => opsArb(p).map((ops) => [p, ops] as const)),
          async ([p, ops]) => {
            try {
              await property(p, ops);
            } catch (e) {
              first.message ??= (e as Error).message;
              throw e;
            }
          },
        );
      } catch (e) {
        // The report shows the shrunk counterexample; the first failure's own repro is kept too.
        if (first.message && !(e as Error).message.includes(first.message)) {
          (e as Error).message += `\n\nfirst failure before shrinking:\n${first.message}`;
        }
        throw e;
      }
    }, 180_000);
  }
});
