// Property: for a random source (raw or qcow2 with random cluster size / extended L2 / backing,
// written by qemu-io with unaligned data, zero writes, discards and compressed clusters) and
// random convert options (target format, cluster size, compat, extended L2, -c zlib/zstd, -S, -m,
// -W, -B onto the source's backing), qimg's target passes `qemu-img check` cleanly, `qemu-img
// compare` finds it identical to the source, and it has the same layout (`qemu-img map`) and
// `qemu-img info` as qemu-img's target for the same command line.
//
// Through checkProperty (test/helpers/property.ts): the seed is printed (QIMG_PROP_SEED=<n> replays
// it); at least 12 cases run, up to 40 while a 20 s budget lasts (QIMG_PROP_SCALE=<x> scales all
// three). QIMG_CONVERT_ENGINE=qemu-img checks the property against QEMU itself.

import { rmSync } from 'node:fs';
import { join } from 'node:path';
import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import { qemuImg, qemuImgOk, qemuIoOk, qimg, type RunResult } from '../cli/harness.js';
import { checkProperty } from '../helpers/property.js';
import { mapLayout, tmpDir, type MapEntry } from '../helpers/qemu.js';

const dir = tmpDir('qimg-convert-prop-');

const ENGINE = process.env.QIMG_CONVERT_ENGINE === 'qemu-img' ? 'qemu-img' : 'qimg';
const SIZE = 3 * 1024 * 1024 + 512 * 7; // odd number of sectors

interface Op {
  kind: 'write' | 'zero' | 'discard' | 'compressed';
  off: number;
  len: number;
  pattern: number;
}

interface Params {
  source: { format: 'raw' | 'qcow2'; clusterSize: number; extendedL2: boolean; backing: 'none' | 'raw' | 'qcow2' };
  baseOps: Op[];
  ops: Op[];
  target: {
    format: 'raw' | 'qcow2';
    clusterSize?: number;
    compat?: '0.10' | '1.1';
    extendedL2?: boolean;
    compress?: 'zlib' | 'zstd';
    sparse?: string;
    coroutines?: number;
    outOfOrder: boolean;
    shallow: boolean; // -B onto the source's backing
  };
}

const opArb = (clusterSize: number, allowCompressed: boolean): fc.Arbitrary<Op> =>
  fc
    .record({
      kind: allowCompressed
        ? fc.constantFrom('write' as const, 'write' as const, 'zero' as const, 'discard' as const, 'compressed' as const)
        : fc.constantFrom('write' as const, 'write' as const, 'zero' as const, 'discard' as const),
      unit: fc.constantFrom(1, 512, 4096, clusterSize),
      k: fc.nat({ max: 1 << 20 }),
      delta: fc.oneof(fc.constant(0), fc.integer({ min: -700, max: 700 })),
      len: fc.oneof(fc.integer({ min: 1, max: 3 * clusterSize }), fc.integer({ min: 1, max: 300_000 })),
      pattern: fc.integer({ min: 0, max: 255 }),
    })
    .map(({ kind, unit, k, delta, len, pattern }) => {
      if (kind === 'compressed') {
        // qemu-io write -c: whole clusters
        const off = (k % Math.floor(SIZE / clusterSize)) * clusterSize;
        return { kind, off, len: clusterSize, pattern };
      }
      const off = Math.min(SIZE - 1, Math.max(0, ((k * unit) % SIZE) + delta));
      return { kind, off, len: Math.max(1, Math.min(len, SIZE - off)), pattern };
    });

const paramsArb: fc.Arbitrary<Params> = fc
  .record({
    format: fc.constantFrom('raw' as const, 'qcow2' as const, 'qcow2' as const),
    clusterSize: fc.constantFrom(512, 4096, 65536, 65536),
    extendedL2: fc.boolean(),
    backing: fc.constantFrom('none' as const, 'raw' as const, 'qcow2' as const),
  })
  .map((s) => ({
    ...s,
    extendedL2: s.format === 'qcow2' && s.clusterSize >= 16384 && s.extendedL2,
    backing: s.format === 'qcow2' ? s.backing : ('none' as const),
  }))
  .chain((source) =>
    fc.record({
      source: fc.constant(source),
      baseOps: source.backing === 'none' ? fc.constant([]) : fc.array(opArb(65536, false), { maxLength: 5 }).map((ops) => ops.filter((o) => o.kind !== 'discard' || source.backing === 'qcow2')),
      ops: fc.array(opArb(source.clusterSize, source.format === 'qcow2'), { minLength: 1, maxLength: 10 }),
      target: fc
        .record({
          format: fc.constantFrom('raw' as const, 'qcow2' as const, 'qcow2' as const, 'qcow2' as const),
          clusterSize: fc.option(fc.constantFrom(512, 4096, 65536, 2 * 1024 * 1024), { nil: undefined }),
          compat: fc.option(fc.constantFrom('0.10' as const, '1.1' as const), { nil: undefined }),
          extendedL2: fc.boolean(),
          compress: fc.option(fc.constantFrom('zlib' as const, 'zstd' as const), { nil: undefined }),
          sparse: fc.option(fc.constantFrom('0', '512', '4k', '64k', '1M'), { nil: undefined }),
          coroutines: fc.option(fc.constantFrom(1, 2, 8, 16), { nil: undefined }),
          outOfOrder: fc.boolean(),
          shallow: fc.boolean(),
        })
        .map((t) => {
          if (t.format === 'raw') return { format: t.format, sparse: t.sparse, coroutines: t.coroutines, outOfOrder: t.outOfOrder, shallow: false };
          const extendedL2 = t.extendedL2 && t.compat !== '0.10' && (t.clusterSize ?? 65536) >= 16384;
          const compress = t.compress === 'zstd' && t.compat === '0.10' ? 'zlib' : t.compress;
          // qemu-img refuses -c with -S (copy offloading aside, -c and -S do combine); keep both.
          return { ...t, extendedL2, compress, shallow: t.shallow && source.backing !== 'none' };
        }),
    }),
  );

/**
 * qemu-io's write -c only goes to clusters not allocated yet: compressed writes first, one per
 * cluster, then the others in their order.
 */
function orderOps(ops: Op[]): Op[] {
  const seen = new Set<number>();
  const compressed = ops.filter((o) => o.kind === 'compressed' && !seen.has(o.off) && seen.add(o.off));
  return [...compressed, ...ops.filter((o) => o.kind !== 'compressed')];
}

function ioCmd(o: Op): string {
  switch (o.kind) {
    case 'write': return `write -P ${o.pattern} ${o.off} ${o.len}`;
    case 'zero': return `write -z ${o.off} ${o.len}`;
    case 'discard': return `discard ${o.off} ${o.len}`;
    case 'compressed': return `write -c -P ${o.pattern} ${o.off} ${o.len}`;
  }
}

// Raw targets are compared after their first 4 KiB, which QEMU allocates when it creates a raw
// file (file-posix allocate_first_block) and qimg convert does not (convert.test.ts checks that
// difference on its own).

const show = (cmd: string, args: string[], r: RunResult): string => `${cmd} ${args.join(' ')} exited ${r.code}\n${r.stderr}${r.stdout}`;

let counter = 0;

async function check(p: Params): Promise<void> {
  const n = counter++;
  const src = `s${n}.${p.source.format}`;
  const base = `b${n}.${p.source.backing}`;
  if (p.source.backing !== 'none') {
    await qemuImgOk(['create', '-q', '-f', p.source.backing, base, String(SIZE)], dir);
    if (p.baseOps.length) await qemuIoOk(base, p.source.backing, p.baseOps.map(ioCmd), dir);
  }
  const opts: string[] = [`cluster_size=${p.source.clusterSize}`];
  if (p.source.extendedL2) opts.push('extended_l2=on');
  if (p.source.backing !== 'none') opts.push(`backing_file=${base}`, `backing_fmt=${p.source.backing}`);
  await qemuImgOk(['create', '-q', '-f', p.source.format, ...(p.source.format === 'qcow2' ? ['-o', opts.join(',')] : []), src, String(SIZE)], dir);
  await qemuIoOk(src, p.source.format, orderOps(p.ops).map(ioCmd), dir);

  const t = p.target;
  const args = ['convert', '-f', p.source.format, '-O', t.format];
  const o: string[] = [];
  if (t.clusterSize) o.push(`cluster_size=${t.clusterSize}`);
  if (t.compat) o.push(`compat=${t.compat}`);
  if (t.extendedL2) o.push('extended_l2=on');
  if (t.compress === 'zstd') o.push('compression_type=zstd');
  if (o.length) args.push('-o', o.join(','));
  if (t.compress) args.push('-c');
  if (t.sparse !== undefined) args.push('-S', t.sparse);
  if (t.coroutines !== undefined) args.push('-m', String(t.coroutines));
  if (t.outOfOrder) args.push('-W');
  if (t.shallow) args.push('-B', base, '-F', p.source.backing);
  args.push(src);
  const ours = `q${n}.${t.format}`;
  const theirs = `e${n}.${t.format}`;
  const what = `${args.join(' ')} (source ${JSON.stringify(p.source)}, ops ${orderOps(p.ops).map(ioCmd).join('; ')})`;

  // Both converts read the source only: side by side.
  const [, r] = await Promise.all([
    qemuImgOk([...args, theirs], dir),
    ENGINE === 'qemu-img' ? qemuImg([...args, ours], dir) : qimg([...args, ours], dir),
  ]);
  if (r.code !== 0) throw new Error(`${what}\n${show(ENGINE, [...args, ours], r)}`);

  const map = async (f: string): Promise<string[]> =>
    mapLayout(JSON.parse((await qemuImgOk(['map', '--output=json', '-f', t.format, f], dir)).stdout) as MapEntry[], t.format === 'raw' ? 4096 : 0);
  const info = async (f: string): Promise<unknown> => {
    const j = JSON.parse((await qemuImgOk(['info', '--output=json', '-f', 'qcow2', f], dir)).stdout) as Record<string, unknown>;
    return { vs: j['virtual-size'], cs: j['cluster-size'], fs: j['format-specific'], bf: j['backing-filename'], bff: j['backing-filename-format'] };
  };
  // Everything after the converts only reads: all at once.
  const [c, cmp, ourMap, theirMap, ourInfo, theirInfo] = await Promise.all([
    t.format === 'qcow2' ? qemuImg(['check', '-f', 'qcow2', ours], dir) : Promise.resolve(null),
    qemuImg(['compare', '-f', t.format, '-F', p.source.format, ours, src], dir),
    map(ours),
    map(theirs),
    t.format === 'qcow2' ? info(ours) : Promise.resolve(null),
    t.format === 'qcow2' ? info(theirs) : Promise.resolve(null),
  ]);
  if (c) {
    expect(c.stdout, `${what}\n${show('qemu-img', ['check', ours], c)}`).toContain('No errors were found on the image.');
    expect(c.code, what).toBe(0);
  }
  expect({ code: cmp.code, out: cmp.stdout.trim() }, `${what}\n${show('qemu-img', ['compare', ours, src], cmp)}`).toEqual({ code: 0, out: 'Images are identical.' });
  expect(ourMap, `layout: ${what}`).toEqual(theirMap);
  expect(ourInfo, `info: ${what}`).toEqual(theirInfo);
  for (const f of [ours, theirs, src, base]) rmSync(join(dir, f), { force: true });
}

describe('qimg convert property (random sources and options vs qemu-img)', () => {
  it('check clean, identical, same layout as qemu-img (at least 12 cases, up to 40 in 20 s)', async () => {
    await checkProperty({ name: 'convert vs qemu-img', runs: 40, minRuns: 12, budgetMs: 20_000 }, paramsArb, check);
  }, 180_000);
});
