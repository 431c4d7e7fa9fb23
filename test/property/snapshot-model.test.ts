// Model-based property test of internal snapshots through the library: random sequences of guest
// writes, zero writes (with and without mayUnmap) and discards, mixed with createSnapshot,
// applySnapshot and deleteSnapshot on one open Image, against a model that keeps the guest disk
// and a copy of it per snapshot. After every step (the image flushed, still open) and once more
// after close, through qemu-img only: `qemu-img check` is clean (no errors, no leaks), the snapshot
// table lists the model's ids and names, and `qemu-img convert` of the active layer and of every
// snapshot reads the model's bytes.
//
// Shapes: 512 B, 4 KiB and 64 KiB clusters; refcount widths 8, 16 and 64; compat 0.10 and 1.1;
// extended L2; lazy refcounts; starting images prefilled by qemu-io with compressed and data clusters.
// One run through checkProperty (test/helpers/property.ts): the seed is printed, QIMG_PROP_SEED
// replays it.

import { readFile, rm } from 'node:fs/promises';
import { join } from 'node:path';
import fc from 'fast-check';
import { describe, it } from 'vitest';
import { checkProperty } from '../helpers/property.js';
import { KiB, qemuImg, qemuIo, run, tmpDir } from '../helpers/qemu.js';
import { type DiskOp, type DiskShape, applyOp, describeOp, firstDiff, parseCheck, runOp } from '../helpers/model.js';
import { openImage } from '../../src/open.js';
import type { Image } from '../../src/image.js';

const dir = tmpDir('qimg-snapshot-model-');
let seq = 0;

interface Params {
  clusterSize: number;
  clusters: number;
  refcountBits: number;
  compat: '0.10' | '1.1';
  extendedL2: boolean;
  lazy: boolean;
  /** Clusters qemu-io fills before qimg opens the image: c = compressed, w = data. */
  prefill: { cluster: number; kind: 'c' | 'w'; fill: number }[];
  steps: Step[];
}

/** Positions are fractions resolved against the disk and the snapshot list when the step runs. */
type Step =
  | { k: 'write' | 'zero' | 'discard'; at: number; len: number; fill: number; unmap: boolean }
  | { k: 'create' }
  | { k: 'apply' | 'delete'; pick: number };

const stepArb: fc.Arbitrary<Step> = fc.oneof(
  { weight: 4, arbitrary: fc.record({ k: fc.constantFrom('write', 'zero', 'discard') as fc.Arbitrary<'write' | 'zero' | 'discard'>, at: fc.double({ min: 0, max: 1, noNaN: true }), len: fc.double({ min: 0, max: 1, noNaN: true }), fill: fc.integer({ min: 1, max: 255 }), unmap: fc.boolean() }) },
  { weight: 3, arbitrary: fc.constant({ k: 'create' as const }) },
  { weight: 2, arbitrary: fc.record({ k: fc.constantFrom('apply', 'delete') as fc.Arbitrary<'apply' | 'delete'>, pick: fc.double({ min: 0, max: 0.999, noNaN: true }) }) },
);

const paramsArb: fc.Arbitrary<Params> = fc
  .record({
    clusterSize: fc.constantFrom(512, 4 * KiB, 64 * KiB),
    refcountBits: fc.constantFrom(8, 16, 64),
    compat: fc.constantFrom('0.10', '1.1', '1.1') as fc.Arbitrary<'0.10' | '1.1'>,
    extendedL2: fc.boolean(),
    lazy: fc.boolean(),
    prefill: fc.array(fc.record({ cluster: fc.nat({ max: 23 }), kind: fc.constantFrom('c', 'w') as fc.Arbitrary<'c' | 'w'>, fill: fc.integer({ min: 1, max: 255 }) }), { maxLength: 5 }),
    steps: fc.array(stepArb, { minLength: 3, maxLength: 9 }),
  })
  .map((p) => {
    const v2 = p.compat === '0.10';
    return {
      ...p,
      clusters: 24,
      // v2 has 16-bit refcounts and no extended L2 or lazy refcounts; extended L2 wants clusters of 16 KiB and more here.
      refcountBits: v2 ? 16 : p.refcountBits,
      extendedL2: !v2 && p.extendedL2 && p.clusterSize === 64 * KiB,
      lazy: !v2 && p.lazy,
    };
  });

interface ModelSnapshot {
  id: string;
  name: string;
  bytes: Uint8Array;
}

function describeParams(p: Params): string {
  return `${p.clusterSize} B clusters x${p.clusters}, refcount_bits=${p.refcountBits}, compat ${p.compat}` +
    `${p.extendedL2 ? ', extended L2' : ''}${p.lazy ? ', lazy' : ''}, prefill ${JSON.stringify(p.prefill)}`;
}

async function qemuReads(file: string, id?: string): Promise<Buffer> {
  const out = `${file}.${id ?? 'active'}.raw`;
  const args = ['convert', '-U', ...(id === undefined ? [] : ['-l', `snapshot.id=${id}`]), '-O', 'raw', file, out];
  const r = await run('qemu-img', args);
  if (r.code !== 0) throw new Error(`qemu-img ${args.join(' ')}: ${r.stderr}`);
  try {
    return await readFile(out);
  } finally {
    await rm(out, { force: true });
  }
}

/** What qemu-img sees now: a clean check, the model's snapshot table, the model's bytes everywhere. */
async function verify(file: string, model: Uint8Array, snapshots: ModelSnapshot[], where: string): Promise<void> {
  const chk = await run('qemu-img', ['check', '-U', file]);
  const c = parseCheck(chk.code, chk.stdout, chk.stderr);
  if (!c.clean) throw new Error(`${where}: qemu-img check is not clean:\n${c.output}`);
  const info = JSON.parse((await qemuImg(['info', '-U', '--output=json', file])).stdout) as { snapshots?: { id: string; name: string }[] };
  const listed = (info.snapshots ?? []).map((s) => `${s.id}:${s.name}`).join(' ');
  const expected = snapshots.map((s) => `${s.id}:${s.name}`).join(' ');
  if (listed !== expected) throw new Error(`${where}: snapshot table [${listed}], model [${expected}]`);
  for (const s of [undefined, ...snapshots]) {
    const got = await qemuReads(file, s?.id);
    const want = s ? s.bytes : model;
    const at = firstDiff(got, want);
    if (at >= 0) throw new Error(`${where}: ${s ? `snapshot ${s.id}` : 'the active layer'} differs from the model at byte ${at}`);
  }
}

async function runSequence(p: Params): Promise<void> {
  const file = join(dir, `s${seq++}.qcow2`);
  const size = p.clusters * p.clusterSize;
  const opts = [`cluster_size=${p.clusterSize}`, `refcount_bits=${p.refcountBits}`, `compat=${p.compat}`];
  if (p.extendedL2) opts.push('extended_l2=on');
  if (p.lazy) opts.push('lazy_refcounts=on');
  const created = await run('qemu-img', ['create', '-q', '-f', 'qcow2', '-o', opts.join(','), file, String(size)]);
  if (created.code !== 0) throw new Error(created.stderr);
  const model = new Uint8Array(size);
  const seen = new Set<number>();
  const cmds: string[] = [];
  for (const f of p.prefill) {
    if (seen.has(f.cluster)) continue; // compressed writes go to unallocated clusters only
    seen.add(f.cluster);
    cmds.push(`write ${f.kind === 'c' ? '-c ' : ''}-P ${f.fill} ${f.cluster * p.clusterSize} ${p.clusterSize}`);
    model.fill(f.fill, f.cluster * p.clusterSize, (f.cluster + 1) * p.clusterSize);
  }
  await qemuIo(file, cmds);
  const shape: DiskShape = { virtualSize: size, clusterSize: p.clusterSize, version: p.compat === '0.10' ? 2 : 3, hasBacking: false };
  const snapshots: ModelSnapshot[] = [];
  let nextId = 1;
  let names = 0;
  const done: string[] = [];
  let image: Image | null = (await openImage(file, { readOnly: false })).image;
  try {
    for (const step of p.steps) {
      let what: string;
      if (step.k === 'write' || step.k === 'zero' || step.k === 'discard') {
        const off = Math.floor(step.at * (size - 1));
        const len = Math.max(1, Math.floor(step.len * Math.min(size - off, 4 * p.clusterSize)));
        const op: DiskOp = step.k === 'write' ? { k: 'write', off, len, fill: step.fill } : step.k === 'zero' ? { k: 'zero', off, len, unmap: step.unmap } : { k: 'discard', off, len };
        await runOp(image as unknown as Parameters<typeof runOp>[0], op);
        applyOp(model, shape, op);
        what = describeOp(op);
      } else if (step.k === 'create') {
        const name = `n${names++ % 3}`; // names repeat: QEMU allows it
        const info = await image.createSnapshot(name);
        // ids: one more than the largest (QEMU's find_new_snapshot_id).
        nextId = Math.max(0, ...snapshots.map((s) => Number(s.id))) + 1;
        if (info.id !== String(nextId) || info.name !== name) throw new Error(`createSnapshot returned ${info.id}:${info.name}, expected ${nextId}:${name}`);
        snapshots.push({ id: info.id, name, bytes: model.slice() });
        what = `createSnapshot(${name}) -> ${info.id}`;
      } else if (step.k === 'apply' || step.k === 'delete') {
        if (snapshots.length === 0) continue;
        const s = snapshots[Math.floor(step.pick * snapshots.length)]!;
        if (step.k === 'apply') {
          await image.applySnapshot(s.id);
          model.set(s.bytes);
          what = `applySnapshot(${s.id})`;
        } else {
          await image.deleteSnapshot({ id: s.id });
          snapshots.splice(snapshots.indexOf(s), 1);
          what = `deleteSnapshot(${s.id})`;
        }
      } else {
        continue;
      }
      done.push(what);
      await image.flush();
      await verify(file, model, snapshots, `after ${done.join('; ')}`);
    }
    await image.close();
    image = null;
    await verify(file, model, snapshots, `after close (${done.join('; ')})`);
  } finally {
    await image?.close().catch(() => undefined);
    await rm(file, { force: true });
  }
}

describe('internal snapshots follow the model', () => {
  it('random writes, zero writes, discards and snapshot create/apply/delete', async () => {
    await checkProperty({ name: 'snapshot model', runs: 40, minRuns: 5, budgetMs: 12_000 }, paramsArb, async (p) => {
      try {
        await runSequence(p);
      } catch (e) {
        throw new Error(`${describeParams(p)}: ${(e as Error).message}`);
      }
    });
  }, 300_000);
});
