// Property: whatever sequence of qemu-io writes, zero writes, discards and compressed writes built
// a qcow2 image (any cluster size, with or without extended L2, with or without a backing file of
// random data), qimg reads the whole disk exactly as `qemu-img convert -O raw` does.
//
// Through checkProperty (test/helpers/property.ts): the seed is printed (QIMG_PROP_SEED=<n>
// replays it); at least 10 cases run, up to 25 while a 12 s budget lasts.

import { randomBytes } from 'node:crypto';
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import fc from 'fast-check';
import { describe, it } from 'vitest';
import { checkProperty } from '../helpers/property.js';
import { KiB, expectSameBytes, qemuImg, qemuIo, tmpDir, withImage } from '../helpers/qemu.js';

const dir = tmpDir('qimg-prop-ops-');
const source = join(dir, 'random.bin');
const sourceBytes = randomBytes(512 * KiB);
writeFileSync(source, sourceBytes);
let seq = 0;

type Op =
  | { kind: 'write'; off: number; len: number; pattern: number | 'random' }
  | { kind: 'zero'; off: number; len: number; unmap: boolean }
  | { kind: 'discard'; off: number; len: number }
  | { kind: 'compressed'; cluster: number; pattern: number | 'random' };

interface Shape {
  clusterSize: number;
  extendedL2: boolean;
  compression: 'zlib' | 'zstd';
  backing: 'none' | 'qcow2' | 'raw';
  /** Backing shorter than the overlay by this many 512-byte sectors (0 = same size). */
  backingShortBy: number;
  /** Sectors added past a whole number of clusters. */
  tailSectors: number;
}

const shapeArb: fc.Arbitrary<Shape> = fc
  .record({
    clusterSize: fc.constantFrom(512, 4 * KiB, 64 * KiB),
    extendedL2: fc.boolean(),
    compression: fc.constantFrom('zlib' as const, 'zstd' as const),
    backing: fc.constantFrom('none' as const, 'qcow2' as const, 'raw' as const),
    backingShortBy: fc.oneof(fc.constant(0), fc.integer({ min: 1, max: 300 })),
    tailSectors: fc.oneof(fc.constant(0), fc.integer({ min: 1, max: 127 })),
  })
  // extended_l2 needs clusters of at least 16 KiB.
  .map((s) => ({ ...s, extendedL2: s.extendedL2 && s.clusterSize >= 16 * KiB }));

const clustersOf = (cs: number): number => (cs === 512 ? 512 : cs === 4096 ? 96 : 24);
const sizeOf = (s: Shape): number => clustersOf(s.clusterSize) * s.clusterSize + s.tailSectors * 512;

function opsArb(s: Shape): fc.Arbitrary<Op[]> {
  const size = sizeOf(s);
  const cs = s.clusterSize;
  const range = fc
    .record({ off: fc.integer({ min: 0, max: size - 1 }), len: fc.integer({ min: 1, max: 3 * cs }) })
    // Sometimes snap to subcluster / cluster boundaries, where the interesting cases are.
    .chain((r) =>
      fc.constantFrom('raw', 'sub', 'cluster').map((snap) => {
        const unit = snap === 'cluster' ? cs : snap === 'sub' ? Math.max(512, cs / 32) : 1;
        const off = Math.floor(r.off / unit) * unit;
        const len = Math.max(unit, Math.ceil(r.len / unit) * unit);
        return { off, len: Math.min(len, size - off) };
      }),
    );
  const pattern = fc.oneof(fc.integer({ min: 1, max: 255 }), fc.constant('random' as const));
  const op: fc.Arbitrary<Op> = fc.oneof(
    { weight: 4, arbitrary: fc.tuple(range, pattern).map(([r, p]) => ({ kind: 'write' as const, ...r, pattern: p })) },
    { weight: 2, arbitrary: fc.tuple(range, fc.boolean()).map(([r, u]) => ({ kind: 'zero' as const, ...r, unmap: u })) },
    { weight: 2, arbitrary: range.map((r) => ({ kind: 'discard' as const, ...r })) },
    {
      weight: 2,
      arbitrary: fc
        .tuple(fc.integer({ min: 0, max: Math.ceil(size / cs) - 1 }), pattern)
        .map(([c, p]) => ({ kind: 'compressed' as const, cluster: c, pattern: p })),
    },
  );
  return fc.array(op, { minLength: 1, maxLength: 24 });
}

/** qemu-io commands; compressed writes only into clusters nothing earlier touched (QEMU refuses to overwrite). */
function commands(s: Shape, ops: Op[]): string[] {
  const size = sizeOf(s);
  const cs = s.clusterSize;
  const touched = new Set<number>();
  const touch = (off: number, len: number): void => {
    for (let c = Math.floor(off / cs); c <= Math.floor((off + len - 1) / cs); c++) touched.add(c);
  };
  const fill = (p: number | 'random'): string => (p === 'random' ? `-s ${source}` : `-P ${p}`);
  const out: string[] = [];
  for (const op of ops) {
    switch (op.kind) {
      case 'write':
        out.push(`write ${fill(op.pattern)} ${op.off} ${op.len}`);
        touch(op.off, op.len);
        break;
      case 'zero':
        out.push(`write -z${op.unmap ? ' -u' : ''} ${op.off} ${op.len}`);
        touch(op.off, op.len);
        break;
      case 'discard':
        out.push(`discard ${op.off} ${op.len}`);
        touch(op.off, op.len);
        break;
      case 'compressed': {
        if (touched.has(op.cluster)) break;
        const off = op.cluster * cs;
        out.push(`write -c ${fill(op.pattern)} ${off} ${Math.min(cs, size - off)}`);
        touched.add(op.cluster);
        break;
      }
    }
  }
  return out;
}

async function build(s: Shape, ops: Op[]): Promise<{ file: string; cmds: string[]; createArgs: string[] }> {
  const n = seq++;
  const size = sizeOf(s);
  const file = join(dir, `${n}.qcow2`);
  const opts = [`cluster_size=${s.clusterSize}`, `compression_type=${s.compression}`];
  if (s.extendedL2) opts.push('extended_l2=on');
  const createArgs = ['create', '-q', '-f', 'qcow2', '-o', opts.join(',')];
  if (s.backing !== 'none') {
    const base = join(dir, `${n}-base.${s.backing}`);
    const baseSize = Math.max(512, size - s.backingShortBy * 512);
    if (s.backing === 'raw') {
      // A raw base is just its bytes: written here rather than by two more qemu processes.
      const bytes = Buffer.alloc(baseSize, 0xbb);
      sourceBytes.copy(bytes, 0, 0, Math.min(baseSize, sourceBytes.length));
      writeFileSync(base, bytes);
    } else {
      await qemuImg(['create', '-q', '-f', s.backing, base, String(baseSize)]);
      await qemuIo(base, [`write -s ${source} 0 ${Math.min(baseSize, 512 * KiB)}`, ...(baseSize > 512 * KiB ? [`write -P 0xbb ${512 * KiB} ${baseSize - 512 * KiB}`] : [])], { format: s.backing });
    }
    createArgs.push('-b', base, '-F', s.backing);
  }
  createArgs.push(file, String(size));
  await qemuImg(createArgs);
  const cmds = commands(s, ops);
  await qemuIo(file, cmds);
  return { file, cmds, createArgs };
}

describe('qemu-io operation sequences: qimg reads what qemu-img convert reads', () => {
  it('random write -P/-s, write -z [-u], discard, write -c sequences (at least 10, up to 25 in 12 s)', async () => {
    await checkProperty(
      { name: 'qemu-io sequences read back', runs: 25, minRuns: 10, budgetMs: 12_000 },
      shapeArb.chain((s) => opsArb(s).map((ops) => [s, ops] as const)),
      async ([shape, ops]) => {
        const { file, cmds, createArgs } = await build(shape, ops);
        try {
          await withImage(file, { format: 'qcow2' }, (image) =>
            expectSameBytes(image, file, { format: 'qcow2', randomReads: 16 }),
          );
        } catch (e) {
          throw new Error(
            `${(e as Error).message}\nrepro: qemu-img ${createArgs.join(' ')} && qemu-io -f qcow2 ${cmds.map((c) => `-c '${c}'`).join(' ')} ${file}`,
          );
        }
      },
    );
  }, 120_000);
});
