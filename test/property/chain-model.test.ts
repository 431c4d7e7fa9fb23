// Model-based property test of qimg commit and rebase on backing chains. A random chain of 2-4
// small images (qcow2 with 512 B, 4 KiB or 64 KiB clusters, compat 0.10 or 1.1, extended L2 where
// allowed; sometimes a raw bottom layer; sizes that differ so some layers end before others) is
// built by qemu-img create and filled by qemu-io (so QEMU wrote the inputs). Then 1-3 steps run:
// `qimg commit [-d] [-b base]`, `qimg rebase -b NEW -F fmt` (safe mode; onto a layer of the chain,
// a fresh standalone image, or nothing), `qimg rebase -u`, and more qemu-io writes. After the
// build and after every step, through QEMU only: `qemu-img check` is clean (no errors, no leaks)
// for every qcow2 image, `qemu-img convert -O raw` of every image, read as its chain, equals the
// model, and where the model knows a layer's allocation exactly, `qemu-img map` of it agrees.
//
// The model keeps each layer's own content (which bytes it allocates and their values; zeros
// written as allocated zeros) and its backing pointer; an image's guest view is its own bytes
// over its backing file's view, zeros past the backing file's end. QEMU 7.2's rules it follows:
//  - qemu-io writes here are aligned to the layer's allocation unit (cluster, or subcluster with
//    extended L2), so no copy-on-write of partial units has to be modelled;
//  - `write -z`: the zero flag (v3) or zero data (v2 with a backing file) allocate; v2 without a
//    backing file discards instead (qcow2_subcluster_zeroize), leaving the clusters unallocated;
//  - `discard` (whole clusters, plus a partial last one): v3 sets the zero flag when the image has
//    a backing file or the cluster was allocated, else leaves it unallocated (discard_in_l2_slice);
//    v2 without a backing file unallocates; v2 with one is never asked (QEMU refuses);
//  - commit: the base reads, over the committed image's size, what that image read (grown to it
//    when shorter); the image is emptied (reads through) unless -d or -b;
//  - rebase in safe mode leaves the image's view as it was; -u keeps its own clusters over the new
//    backing file.
// Which clusters commit and safe rebase allocate in the file they write is qimg's choice within
// what the view allows: the model checks that layer's view (as if it allocated everything), then
// takes its allocation from `qemu-img map` (later writes below it and `rebase -u` depend on it).
// Elsewhere the model predicts each layer's allocation, and `qemu-img map` must agree (so an
// overlay that commit should have emptied, but did not, is caught at once).
// One run through checkProperty (test/helpers/property.ts): the seed is printed, QIMG_PROP_SEED
// replays it.

import { mkdir, readFile, rm } from 'node:fs/promises';
import { join } from 'node:path';
import fc from 'fast-check';
import { describe, it } from 'vitest';
import { checkProperty } from '../helpers/property.js';
import { KiB, qemuIo, run, tmpDir } from '../helpers/qemu.js';
import { describeDiff, firstDiff, parseCheck } from '../helpers/model.js';
import { qimg } from '../cli/harness.js';

const root = tmpDir('qimg-chain-model-');
let seq = 0;

/** Sizes are multiples of 4 KiB up to this many; a layer never grows past the largest one. */
const MAX_SIZE_UNITS = 32;
const CAPACITY = MAX_SIZE_UNITS * 4 * KiB;

interface LayerParams {
  clusterSize: number;
  v2: boolean;
  extendedL2: boolean;
  sizeUnits: number;
  raw: boolean;
}

/** A qemu-io command on one layer; positions are fractions resolved against that layer. */
interface IoOp {
  layer: number;
  kind: 'w' | 'z' | 'd';
  at: number;
  len: number;
  fill: number;
}

type Step =
  | { k: 'io'; ops: IoOp[] }
  | { k: 'commit'; pick: number; base: number | null; drop: boolean }
  | { k: 'rebase'; pick: number; target: number; fresh: LayerParams | null; none: boolean; unsafe: boolean };

interface Params {
  layers: LayerParams[];
  fills: IoOp[];
  steps: Step[];
}

const frac = fc.double({ min: 0, max: 0.999, noNaN: true });

const layerArb = (raw: boolean): fc.Arbitrary<LayerParams> =>
  fc
    .record({
      clusterSize: fc.constantFrom(512, 4 * KiB, 64 * KiB),
      v2: fc.boolean(),
      extendedL2: fc.boolean(),
      sizeUnits: fc.integer({ min: 1, max: MAX_SIZE_UNITS }),
    })
    .map((l) => ({
      ...l,
      raw,
      // v2 has no extended L2; QEMU wants clusters of 16 KiB and more for it.
      extendedL2: !raw && !l.v2 && l.extendedL2 && l.clusterSize === 64 * KiB,
      v2: !raw && l.v2,
    }));

const ioArb: fc.Arbitrary<IoOp> = fc.record({
  layer: frac,
  kind: fc.constantFrom('w', 'w', 'z', 'd') as fc.Arbitrary<'w' | 'z' | 'd'>,
  at: frac,
  len: frac,
  fill: fc.integer({ min: 1, max: 255 }),
});

const stepArb: fc.Arbitrary<Step> = fc.oneof(
  { weight: 1, arbitrary: fc.record({ k: fc.constant('io' as const), ops: fc.array(ioArb, { minLength: 1, maxLength: 3 }) }) },
  { weight: 3, arbitrary: fc.record({ k: fc.constant('commit' as const), pick: frac, base: fc.option(frac, { freq: 2 }), drop: fc.boolean() }) },
  {
    weight: 4,
    arbitrary: fc.record({
      k: fc.constant('rebase' as const),
      pick: frac,
      target: frac,
      fresh: fc.option(fc.boolean().chain((raw) => layerArb(raw)), { freq: 3 }),
      // "-b ''" (stand alone) one time in six.
      none: fc.integer({ min: 0, max: 5 }).map((n) => n === 0),
      unsafe: fc.boolean(),
    }),
  },
);

const paramsArb: fc.Arbitrary<Params> = fc
  .record({
    rawBottom: fc.boolean(),
    count: fc.integer({ min: 2, max: 4 }),
    layers: fc.array(layerArb(false), { minLength: 4, maxLength: 4 }),
    bottom: layerArb(true),
    fills: fc.array(ioArb, { minLength: 2, maxLength: 8 }),
    steps: fc.array(stepArb, { minLength: 1, maxLength: 3 }),
  })
  .map((p) => ({
    layers: [...(p.rawBottom ? [p.bottom] : [p.layers[3]!]), ...p.layers.slice(0, p.count - 1)],
    fills: p.fills,
    steps: p.steps,
  }));

// ---- the model ------------------------------------------------------------------------------

interface Layer {
  file: string;
  fmt: 'qcow2' | 'raw';
  clusterSize: number;
  v2: boolean;
  extendedL2: boolean;
  size: number;
  own: Uint8Array;
  alloc: Uint8Array;
  backing: number | null;
  /** Whether the model predicts `alloc` (else verify() takes it from qemu-img map; see the header comment). */
  exact: boolean;
}

function view(layers: Layer[], i: number): Uint8Array {
  const l = layers[i]!;
  const below = l.backing === null ? null : view(layers, l.backing);
  const v = new Uint8Array(l.size);
  for (let p = 0; p < l.size; p++) {
    if (l.fmt === 'raw' || l.alloc[p]) v[p] = l.own[p]!;
    else if (below && p < below.length) v[p] = below[p]!;
  }
  return v;
}

/** The layers in i's chain, i first. */
function chainOf(layers: Layer[], i: number): number[] {
  const out: number[] = [];
  for (let j: number | null = i; j !== null; j = layers[j]!.backing) out.push(j);
  return out;
}

/** Resolves an IoOp to a qemu-io command and applies it to the model; null when it does not apply. */
function ioCommand(layers: Layer[], op: IoOp): { index: number; cmd: string } | null {
  const index = Math.floor(op.layer * layers.length);
  const l = layers[index]!;
  if (op.kind === 'd' && (l.fmt === 'raw' || (l.v2 && l.backing !== null))) return null; // raw discards may be no-ops; v2 refuses
  const unit = op.kind === 'd' ? l.clusterSize : l.fmt === 'raw' ? 512 : l.extendedL2 ? l.clusterSize / 32 : l.clusterSize;
  const units = Math.ceil(l.size / unit);
  const first = Math.floor(op.at * units);
  const n = 1 + Math.floor(op.len * Math.min(4, units - first));
  const a = first * unit;
  const b = Math.min(l.size, (first + n) * unit);
  if (op.kind === 'w') {
    l.own.fill(op.fill, a, b);
    l.alloc.fill(1, a, b);
    return { index, cmd: `write -P ${op.fill} ${a} ${b - a}` };
  }
  if (op.kind === 'z') {
    l.own.fill(0, a, b);
    l.alloc.fill(l.fmt === 'qcow2' && l.v2 && l.backing === null ? 0 : 1, a, b);
    return { index, cmd: `write -z ${a} ${b - a}` };
  }
  for (let c = a; c < b; c += l.clusterSize) {
    const e = Math.min(b, c + l.clusterSize);
    l.own.fill(0, c, e);
    if (l.v2) l.alloc.fill(0, c, e);
    else if (l.backing !== null || l.alloc.subarray(c, e).includes(1)) {
      l.alloc.fill(1, c, e);
      // Extended L2 without a backing file: QEMU's choice depends on whether the cluster has a host
      // offset, which zero-only subclusters do not (the view is zeros either way).
      if (l.extendedL2 && l.backing === null) l.exact = false;
    }
  }
  return { index, cmd: `discard ${a} ${b - a}` };
}

async function runIo(dir: string, layers: Layer[], ops: IoOp[]): Promise<string[]> {
  const done: string[] = [];
  for (const op of ops) {
    const c = ioCommand(layers, op);
    if (!c) continue;
    const l = layers[c.index]!;
    await qemuIo(l.file, [c.cmd], { format: l.fmt, cwd: dir });
    done.push(`qemu-io ${l.file}: ${c.cmd}`);
  }
  return done;
}

async function createLayer(dir: string, layers: Layer[], lp: LayerParams, backing: number | null, name: string): Promise<number> {
  const file = `${name}.${lp.raw ? 'img' : 'qcow2'}`;
  const size = lp.sizeUnits * 4 * KiB;
  const args = ['create', '-q', '-f', lp.raw ? 'raw' : 'qcow2'];
  if (!lp.raw) {
    args.push('-o', `cluster_size=${lp.clusterSize},compat=${lp.v2 ? '0.10' : '1.1'}${lp.extendedL2 ? ',extended_l2=on' : ''}`);
    if (backing !== null) args.push('-b', layers[backing]!.file, '-F', layers[backing]!.fmt);
  }
  args.push(file, String(size));
  const r = await run('qemu-img', args, { cwd: dir });
  if (r.code !== 0) throw new Error(`qemu-img ${args.join(' ')}: ${r.stderr}`);
  layers.push({
    file, fmt: lp.raw ? 'raw' : 'qcow2', clusterSize: lp.raw ? 512 : lp.clusterSize, v2: lp.v2, extendedL2: lp.extendedL2,
    size, own: new Uint8Array(CAPACITY), alloc: new Uint8Array(CAPACITY), backing, exact: true,
  });
  return layers.length - 1;
}

function describeLayers(layers: Layer[]): string {
  return layers
    .map((l) => `${l.file}(${l.size}${l.fmt === 'qcow2' ? `, ${l.clusterSize} B clusters${l.v2 ? ', v2' : ''}${l.extendedL2 ? ', extended L2' : ''}` : ''}` +
      `${l.backing === null ? '' : ` <- ${layers[l.backing]!.file}`})`)
    .join(' ');
}

/** The bytes `qemu-img map` shows the layer allocating itself (depth 0 and present: data or zeros). */
async function qemuAllocation(dir: string, l: Layer, where: string): Promise<Uint8Array> {
  const m = await run('qemu-img', ['map', '--output=json', '-f', 'qcow2', l.file], { cwd: dir });
  if (m.code !== 0) throw new Error(`${where}: qemu-img map ${l.file}: ${m.stderr}`);
  const got = new Uint8Array(l.size);
  for (const e of JSON.parse(m.stdout) as { start: number; length: number; depth: number; present: boolean }[]) {
    if (e.depth === 0 && e.present) got.fill(1, e.start, e.start + e.length);
  }
  return got;
}

/**
 * What QEMU sees now: every qcow2 image checks clean, every image reads as the model says, and
 * every layer whose allocation the model knows allocates what it says. A layer whose allocation
 * was left to qimg (commit's base, a safe rebase) then takes QEMU's map of it: its view was just
 * checked, so where it does not allocate, what lies below reads the same.
 */
async function verify(dir: string, layers: Layer[], where: string): Promise<void> {
  // Every check is waited for (allSettled) before one failure is thrown: none still writes into
  // the directory the case then removes.
  const settled = await Promise.allSettled(
    layers.map(async (l, i): Promise<Uint8Array | null> => {
      if (l.fmt === 'qcow2') {
        const chk = await run('qemu-img', ['check', '-f', 'qcow2', l.file], { cwd: dir });
        const c = parseCheck(chk.code, chk.stdout, chk.stderr);
        if (!c.clean) throw new Error(`${where}: qemu-img check ${l.file} is not clean:\n${c.output}`);
      }
      const out = `${l.file}.view.raw`;
      const conv = await run('qemu-img', ['convert', '-f', l.fmt, '-O', 'raw', l.file, out], { cwd: dir });
      if (conv.code !== 0) throw new Error(`${where}: qemu-img convert ${l.file}: ${conv.stderr}`);
      const got = await readFile(join(dir, out));
      await rm(join(dir, out), { force: true });
      const want = view(layers, i);
      const at = firstDiff(got, want);
      if (at >= 0) throw new Error(`${where}: ${describeDiff(`${l.file} as a chain`, got, want, at)}`);
      if (l.fmt !== 'qcow2') return null;
      const alloc = await qemuAllocation(dir, l, where);
      if (!l.exact) return alloc;
      const model = l.alloc.subarray(0, l.size);
      const k = firstDiff(alloc, model);
      if (k >= 0) throw new Error(`${where}: ${l.file} ${model[k] ? 'does not allocate' : 'allocates'} guest offset ${k} (qemu-img map), the model ${model[k] ? 'does' : 'does not'}`);
      return null;
    }),
  );
  const failed = settled.find((r) => r.status === 'rejected');
  if (failed) throw failed.reason;
  const learnt = settled.map((r) => (r.status === 'fulfilled' ? r.value : null));
  // Views first, for every layer (an upper layer's view reads this one's), then the allocations.
  const views = layers.map((_, i) => view(layers, i));
  for (const [i, alloc] of learnt.entries()) {
    if (!alloc) continue;
    const l = layers[i]!;
    l.alloc.fill(0);
    l.alloc.set(alloc);
    l.own.fill(0);
    l.own.set(views[i]!);
    l.exact = true;
  }
}

async function qimgOk(dir: string, args: string[]): Promise<string> {
  const r = await qimg(args, dir);
  const line = `qimg ${args.map((a) => (a === '' ? "''" : a)).join(' ')}`;
  if (r.code !== 0 || r.stderr !== '') throw new Error(`${line} exited ${r.code}: ${r.stderr}${r.stdout}`);
  return line;
}

async function runCase(p: Params): Promise<void> {
  const dir = join(root, `c${seq++}`);
  await mkdir(dir);
  const layers: Layer[] = [];
  const done: string[] = [];
  let fresh = 0;
  try {
    for (const [i, lp] of p.layers.entries()) await createLayer(dir, layers, lp, i === 0 ? null : i - 1, `l${i}`);
    done.push(...(await runIo(dir, layers, p.fills)));
    await verify(dir, layers, `the inputs QEMU made (${describeLayers(layers)}; ${done.join('; ')})`);
    for (const step of p.steps) {
      let what: string[];
      if (step.k === 'io') {
        what = await runIo(dir, layers, step.ops);
        if (what.length === 0) continue;
      } else if (step.k === 'commit') {
        const candidates = layers.map((_, i) => i).filter((i) => layers[i]!.backing !== null);
        if (candidates.length === 0) continue;
        const x = candidates[Math.floor(step.pick * candidates.length)]!;
        const below = chainOf(layers, x).slice(1);
        const base = step.base === null ? below[0]! : below[Math.floor(step.base * below.length)]!;
        const bl = layers[base]!;
        // Growing a v2 base whose backing file reaches past its end needs zero writes v2 cannot
        // make: qemu-img 7.2 fails the commit ("Block job failed: Operation not supported"), so
        // does qimg; not a case for the model.
        if (bl.v2 && bl.backing !== null && layers[x]!.size > bl.size && layers[bl.backing]!.size > bl.size) continue;
        const args = ['commit'];
        if (step.base !== null) args.push('-b', layers[base]!.file);
        else if (step.drop) args.push('-d');
        args.push(layers[x]!.file);
        const top = layers[x]!;
        const vx = view(layers, x);
        const newSize = Math.max(layers[base]!.size, top.size);
        const vb = view(layers, base);
        what = [await qimgOk(dir, args)];
        const b = layers[base]!;
        // The base now reads what the image read over its size (zeros where it grew past its old end).
        b.own.fill(0);
        b.own.set(vb);
        b.own.set(vx);
        b.alloc.fill(1, 0, newSize);
        b.size = newSize;
        b.exact = false;
        if (step.base === null && !step.drop) {
          // Emptied: every cluster reads through again.
          top.own.fill(0);
          top.alloc.fill(0);
          top.exact = true;
        }
      } else {
        // Safe mode leaves out v2 images with no backing file: there qemu-img 7.2 itself does not
        // keep the view (it writes the old chain's zeros as zero writes, which a v2 image without a
        // backing file turns into discards, so the new backing file shows through; qimg does the same).
        const candidates = layers.map((_, i) => i).filter((i) => {
          const l = layers[i]!;
          if (l.fmt !== 'qcow2') return false;
          if (step.unsafe) return l.exact;
          return l.backing !== null || !l.v2;
        });
        if (candidates.length === 0) continue;
        const x = candidates[Math.floor(step.pick * candidates.length)]!;
        let target: number | null = null;
        what = [];
        if (step.fresh && !step.none) {
          target = await createLayer(dir, layers, step.fresh, null, `s${fresh++}`);
          const ops: IoOp[] = [0.1, 0.5, 0.8].map((at, k) => ({ layer: (target! + 0.5) / layers.length, kind: 'w', at, len: 0.5, fill: 100 + k }));
          what.push(`qemu-img create ${layers[target]!.file}`, ...(await runIo(dir, layers, ops)));
        } else if (!step.none) {
          // Not the image itself, nor an image whose chain holds it (a loop).
          const targets = layers.map((_, i) => i).filter((i) => !chainOf(layers, i).includes(x));
          if (targets.length === 0) continue;
          target = targets[Math.floor(step.target * targets.length)]!;
        }
        const l = layers[x]!;
        const v = view(layers, x);
        const args = ['rebase', ...(step.unsafe ? ['-u'] : [])];
        args.push('-b', target === null ? '' : layers[target]!.file);
        if (target !== null) args.push('-F', layers[target]!.fmt);
        args.push(l.file);
        what.push(await qimgOk(dir, args));
        l.backing = target;
        if (!step.unsafe) {
          // Safe mode: the view is what it was, whatever the new backing file holds.
          l.own.fill(0);
          l.own.set(v);
          l.alloc.fill(1, 0, l.size);
          l.exact = false;
        }
      }
      done.push(...what);
      await verify(dir, layers, `after ${done.join('; ')} (now ${describeLayers(layers)})`);
    }
  } catch (e) {
    throw new Error(`${describeLayers(layers)}: ${(e as Error).message}`);
  } finally {
    await rm(dir, { recursive: true, force: true, maxRetries: 3 });
  }
}

describe('commit and rebase follow the chain model', () => {
  it('random chains, commit [-d] [-b], rebase (safe and -u), qemu-io writes', async () => {
    await checkProperty({ name: 'chain model', runs: 40, minRuns: 8, budgetMs: 15_000 }, paramsArb, runCase);
  }, 300_000);
});
