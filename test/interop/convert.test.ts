// qimg convert writing qcow2 (and raw) targets, checked only with the real tools: every target
// qimg writes must pass `qemu-img check` with no errors and no leaks, `qemu-img compare` must find
// it identical to the source, and for the same command line qemu-img's own target must have the
// same layout (`qemu-img map --output=json`: data / compressed / zero / unallocated runs; host
// offsets may differ) and the same `qemu-img info` (virtual size, cluster size, format-specific
// data, backing). Sources are made by qemu-img / qemu-io with a varied layout.

import { mkdtempSync, rmSync, writeFileSync, openSync, writeSync, closeSync, ftruncateSync } from 'node:fs';
import { randomBytes } from 'node:crypto';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { qemuImg, qemuImgOk, qemuIoOk, qimg, type RunResult } from '../cli/harness.js';
import { mapLayout, type MapEntry } from '../helpers/qemu.js';

const MiB = 1024 * 1024;
const dir = mkdtempSync(join(tmpdir(), 'qimg-convert-'));
afterAll(() => rmSync(dir, { recursive: true, force: true }));

const RAW_SIZE = 6 * MiB + 1536; // not a multiple of any cluster size

/** Sources (relative names in `dir`). */
async function makeSources(): Promise<void> {
  // src.raw: random (incompressible) and patterned (compressible) data at unaligned offsets, short
  // zero runs inside data, a 2 MiB hole, explicitly written zeros, data in the last sector.
  const fd = openSync(join(dir, 'src.raw'), 'w');
  try {
    ftruncateSync(fd, RAW_SIZE);
    const a = randomBytes(300_001);
    a.fill(0, 4096, 4096 + 8192); // 8 KiB zero run: sparse with -S 4k, data with -S 64k
    a.fill(0, 100_000, 100_000 + 70_000); // 70000-byte zero run: sparse with -S 64k too
    writeSync(fd, a, 0, a.length, 777);
    writeSync(fd, Buffer.alloc(MiB + 3333, 0x5a), 0, MiB + 3333, MiB + 777);
    writeSync(fd, randomBytes(70_000), 0, 70_000, 4 * MiB + 100);
    writeSync(fd, Buffer.alloc(128 * 1024, 0), 0, 128 * 1024, 5 * MiB); // written zeros, not a hole
    writeSync(fd, Buffer.alloc(512, 0xee), 0, 512, RAW_SIZE - 512);
  } finally {
    closeSync(fd);
  }

  // src.qcow2: unaligned writes, compressed clusters, zero clusters, discards, written zeros and
  // an internal snapshot s1 taken half way.
  await qemuImgOk(['create', '-q', '-f', 'qcow2', 'src.qcow2', '8M'], dir);
  await qemuIoOk('src.qcow2', 'qcow2', [
    'write -P 0x11 0 64k',
    'write -P 0x22 100001 30000',
    'write -c -P 0x33 1M 128k',
    'write -P 0x44 2M 512k',
    'write -z 2M 128k',
    'discard 2304k 128k',
    'write -z 3M 256k',
    'write -P 0x45 4194303 3',
  ], dir);
  await qemuImgOk(['snapshot', '-c', 's1', 'src.qcow2'], dir);
  await qemuIoOk('src.qcow2', 'qcow2', [
    'write -P 0x55 0 32k',
    'write -z 1M 64k', // over a compressed cluster (shared with s1)
    'write -P 0x66 7352417 5000',
    'write -P 0 5M 192k', // data that is zeros: sparse in targets
    'write -c -P 0x67 6M 64k',
    'discard 2M 64k',
  ], dir);

  // A chain of depth 3 mixing raw and qcow2: base.raw <- mid.qcow2 <- top.qcow2.
  await qemuImgOk(['create', '-q', '-f', 'raw', 'base.raw', '8M'], dir);
  await qemuIoOk('base.raw', 'raw', ['write -P 0xb0 0 3M', 'write -P 0xb1 5M 1M', 'write -P 0xb2 8387584 512'], dir);
  await qemuImgOk(['create', '-q', '-f', 'qcow2', '-b', 'base.raw', '-F', 'raw', 'mid.qcow2', '8M'], dir);
  await qemuIoOk('mid.qcow2', 'qcow2', ['write -P 0xc0 64k 64k', 'write -z 1M 128k', 'write -P 0xc1 4M 100000', 'write -c -P 0xc2 6M 128k'], dir);
  await qemuImgOk(['create', '-q', '-f', 'qcow2', '-b', 'mid.qcow2', '-F', 'qcow2', 'top.qcow2', '8M'], dir);
  await qemuIoOk('top.qcow2', 'qcow2', [
    'write -P 0xd0 4097 5000', // partial cluster: COW from the backing
    'write -z 2M 64k', // zero over backing data
    'write -P 0xd1 5242880 65536',
    'discard 5M 64k', // discard with a backing: reads zero, not the backing
    'write -P 0xd2 7M 33k',
  ], dir);

  // Extended L2 with subclusters (2 KiB), over a backing.
  await qemuImgOk(['create', '-q', '-f', 'qcow2', 'xbase.qcow2', '4M'], dir);
  await qemuIoOk('xbase.qcow2', 'qcow2', ['write -P 0x10 0 1M'], dir);
  await qemuImgOk(['create', '-q', '-f', 'qcow2', '-o', 'extended_l2=on', '-b', 'xbase.qcow2', '-F', 'qcow2', 'xl2.qcow2', '4M'], dir);
  await qemuIoOk('xl2.qcow2', 'qcow2', [
    'write -P 0x20 4k 2k',
    'write -z 64k 6k',
    'write -P 0x30 128k 64k',
    'discard 132k 4k',
    'write -P 0x31 2M 3000',
    'write -z 3M 2k',
  ], dir);
  // Nothing in the first 4 KiB.
  await qemuImgOk(['create', '-q', '-f', 'qcow2', 'late.qcow2', '4M'], dir);
  await qemuIoOk('late.qcow2', 'qcow2', ['write -P 0x50 1M 64k', 'write -z 2M 64k'], dir);
  await qemuImgOk(['create', '-q', '-f', 'qcow2', '-o', 'extended_l2=on', 'xl2solo.qcow2', '4M'], dir);
  await qemuIoOk('xl2solo.qcow2', 'qcow2', ['write -P 0x40 2k 2k', 'write -P 0x41 70000 9000', 'write -z 1M 4k', 'write -P 0x42 2M 64k', 'write -z 2M 2k'], dir);
}

beforeAll(makeSources);

// ---- checks -----------------------------------------------------------------------------------

const show = (cmd: string, args: string[], r: RunResult): string =>
  `${cmd} ${args.join(' ')} exited ${r.code}\nstderr: ${r.stderr}\nstdout: ${r.stdout}`;

/**
 * QIMG_CONVERT_ENGINE=qemu-img runs every "qimg" command with qemu-img instead, which checks the
 * test itself (its layout and info comparisons must hold for QEMU against QEMU, e.g. with -W).
 */
const ENGINE = process.env.QIMG_CONVERT_ENGINE === 'qemu-img' ? 'qemu-img' : 'qimg';

async function qimgOk(args: string[]): Promise<void> {
  const r = ENGINE === 'qemu-img' ? await qemuImg(args, dir) : await qimg(args, dir);
  if (r.code !== 0) throw new Error(show('qimg', args, r));
}

async function mapOf(file: string, fmt: string): Promise<string[]> {
  const r = await qemuImgOk(['map', '--output=json', '-f', fmt, file], dir);
  return mapLayout(JSON.parse(r.stdout) as MapEntry[]);
}

async function infoOf(file: string, fmt: string): Promise<Record<string, unknown>> {
  const r = await qemuImgOk(['info', '--output=json', '-f', fmt, file], dir);
  const info = JSON.parse(r.stdout) as Record<string, unknown>;
  const pick: Record<string, unknown> = {};
  for (const k of ['format', 'virtual-size', 'cluster-size', 'backing-filename', 'backing-filename-format', 'full-backing-filename', 'format-specific', 'snapshots']) {
    if (k in info) pick[k] = info[k];
  }
  return pick;
}

async function expectCheckClean(file: string): Promise<void> {
  const r = await qemuImg(['check', '-f', 'qcow2', file], dir);
  expect(r.stdout, show('qemu-img', ['check', file], r)).toContain('No errors were found on the image.');
  expect(r.stdout).not.toMatch(/leaked/);
  expect(r.code, show('qemu-img', ['check', file], r)).toBe(0);
}

async function expectIdentical(a: string, aFmt: string, b: string, bFmt: string, extra: string[] = []): Promise<void> {
  const args = ['compare', ...extra, '-f', aFmt, '-F', bFmt, a, b];
  const r = await qemuImg(args, dir);
  expect({ code: r.code, out: r.stdout.trim() }, show('qemu-img', args, r)).toEqual({ code: 0, out: 'Images are identical.' });
}

interface Case {
  name: string;
  /** convert arguments before the target (options and sources) */
  args: string[];
  outFmt: 'qcow2' | 'raw';
  /**
   * What the target must equal: a file and its format; default the (single) last source. 'qemu-img':
   * qemu-img's target of the same command line only (a snapshot, several sources).
   */
  reference?: { file: string; fmt: string } | 'qemu-img';
  /** Makes the pre-existing target (-n). */
  prepare?: (target: string) => Promise<void>;
  /** Extra assertions on qimg's target. */
  extra?: (target: string) => Promise<void>;
}

const junkQcow2 = (size: string, opts: string[] = []) => async (target: string): Promise<void> => {
  await qemuImgOk(['create', '-q', '-f', 'qcow2', ...opts, target, size], dir);
  await qemuIoOk(target, 'qcow2', [`write -P 0xe5 0 ${size}`], dir);
};
const junkRaw = (bytes: number) => async (target: string): Promise<void> => {
  writeFileSync(join(dir, target), Buffer.alloc(bytes, 0xe5));
};

const cases: Case[] = [
  { name: 'raw -> qcow2', args: ['-f', 'raw', '-O', 'qcow2', 'src.raw'], outFmt: 'qcow2' },
  { name: 'qcow2 -> raw', args: ['-O', 'raw', 'src.qcow2'], outFmt: 'raw' },
  { name: 'qcow2 -> qcow2', args: ['-O', 'qcow2', 'src.qcow2'], outFmt: 'qcow2' },
  { name: 'raw -> raw', args: ['-f', 'raw', '-O', 'raw', 'src.raw'], outFmt: 'raw' },
  // qemu-img's raw targets start with an allocated 4 KiB block (file-posix allocate_first_block
  // when the file is created), whatever the source has there.
  { name: 'qcow2 -> raw with nothing in the first 4 KiB', args: ['-O', 'raw', 'late.qcow2'], outFmt: 'raw' },
  { name: 'qcow2 -> qcow2 with nothing in the first 4 KiB', args: ['-O', 'qcow2', 'late.qcow2'], outFmt: 'qcow2' },
  { name: 'raw -> qcow2 -c (zlib; incompressible clusters stay uncompressed)', args: ['-f', 'raw', '-O', 'qcow2', '-c', 'src.raw'], outFmt: 'qcow2' },
  { name: 'qcow2 -> qcow2 -c (zlib)', args: ['-O', 'qcow2', '-c', 'src.qcow2'], outFmt: 'qcow2' },
  { name: 'raw -> qcow2 -c -o compression_type=zstd', args: ['-f', 'raw', '-O', 'qcow2', '-c', '-o', 'compression_type=zstd', 'src.raw'], outFmt: 'qcow2' },
  { name: 'chain -> qcow2 -c -o compression_type=zstd,cluster_size=4k', args: ['-O', 'qcow2', '-c', '-o', 'compression_type=zstd,cluster_size=4k', 'top.qcow2'], outFmt: 'qcow2' },
  { name: '-o cluster_size=512', args: ['-O', 'qcow2', '-o', 'cluster_size=512', 'src.qcow2'], outFmt: 'qcow2' },
  { name: '-o cluster_size=2M', args: ['-f', 'raw', '-O', 'qcow2', '-o', 'cluster_size=2M', 'src.raw'], outFmt: 'qcow2' },
  { name: '-o compat=0.10', args: ['-O', 'qcow2', '-o', 'compat=0.10', 'src.qcow2'], outFmt: 'qcow2' },
  { name: '-o extended_l2=on (from an extended-L2 image)', args: ['-O', 'qcow2', '-o', 'extended_l2=on', 'xl2solo.qcow2'], outFmt: 'qcow2' },
  { name: '-o extended_l2=on (from raw, unaligned data)', args: ['-f', 'raw', '-O', 'qcow2', '-o', 'extended_l2=on', 'src.raw'], outFmt: 'qcow2' },
  { name: 'extended-L2 chain flattened', args: ['-O', 'qcow2', 'xl2.qcow2'], outFmt: 'qcow2' },
  { name: 'backing chain raw <- qcow2 <- qcow2 flattened', args: ['-O', 'qcow2', 'top.qcow2'], outFmt: 'qcow2' },
  { name: 'backing chain flattened -> raw', args: ['-O', 'raw', 'top.qcow2'], outFmt: 'raw' },
  {
    name: 'from a snapshot (-l snapshot.name=s1)',
    args: ['-O', 'qcow2', '-l', 'snapshot.name=s1', 'src.qcow2'],
    outFmt: 'qcow2',
    reference: 'qemu-img',
  },
  {
    name: '-B mid.qcow2 -F qcow2 (only the top delta is written)',
    args: ['-O', 'qcow2', '-B', 'mid.qcow2', '-F', 'qcow2', 'top.qcow2'],
    outFmt: 'qcow2',
    extra: async (target) => {
      // Over the same chain (mid.qcow2 <- base.raw), only the delta written: the target's layout is
      // top.qcow2's own, allocated (depth 0) exactly where top.qcow2 is and read through mid.qcow2
      // and base.raw (depth 1, 2) everywhere else; a flattened copy would be all depth 0.
      const layout = await mapOf(target, 'qcow2');
      expect(layout).toEqual(await mapOf('top.qcow2', 'qcow2'));
      expect(layout.filter((r) => !r.endsWith('@0')), 'runs read from the backing chain').not.toEqual([]);
    },
  },
  {
    // Zero writes in the top that do not cover whole target clusters, where the rest of the
    // cluster reads as zeros from the backing: qemu-img's zero write (qcow2's is_zero check on
    // the unaligned head/tail) makes a zero cluster, not a data cluster of zeros.
    name: '-B xbase.qcow2 from an extended-L2 top with subcluster zero writes',
    args: ['-O', 'qcow2', '-B', 'xbase.qcow2', '-F', 'qcow2', 'xl2.qcow2'],
    outFmt: 'qcow2',
  },
  {
    name: '-n onto an existing qcow2 full of junk',
    args: ['-n', '-O', 'qcow2', 'src.qcow2'],
    outFmt: 'qcow2',
    prepare: junkQcow2('8M'),
  },
  {
    name: '-n onto an existing raw full of junk',
    args: ['-n', '-O', 'raw', 'src.qcow2'],
    outFmt: 'raw',
    prepare: junkRaw(8 * MiB),
  },
  {
    name: '-n onto an existing qcow2 (cluster 4k, v2) full of junk from a chain',
    args: ['-n', '-O', 'qcow2', 'top.qcow2'],
    outFmt: 'qcow2',
    prepare: junkQcow2('8M', ['-o', 'cluster_size=4k,compat=0.10']),
  },
  {
    name: '-n --target-is-zero onto a fresh qcow2',
    args: ['-n', '--target-is-zero', '-O', 'qcow2', 'src.qcow2'],
    outFmt: 'qcow2',
    prepare: async (target) => {
      await qemuImgOk(['create', '-q', '-f', 'qcow2', target, '8M'], dir);
    },
  },
  {
    name: 'several sources concatenated (raw + qcow2 + chain)',
    args: ['-O', 'qcow2', 'src.raw', 'src.qcow2', 'top.qcow2'],
    outFmt: 'qcow2',
    reference: 'qemu-img',
  },
  {
    name: '-S 0 (fully allocated)',
    args: ['-O', 'qcow2', '-S', '0', 'src.qcow2'],
    outFmt: 'qcow2',
    extra: async (target) => {
      const m = await mapOf(target, 'qcow2');
      expect(m.every((r) => r.endsWith(' data@0')), `not fully allocated: ${m.join(', ')}`).toBe(true);
    },
  },
  { name: '-S 0 -> raw', args: ['-f', 'raw', '-O', 'raw', '-S', '0', 'src.raw'], outFmt: 'raw' },
  // 4 KiB clusters so that the zero runs inside data (8 KiB, 70000 bytes) cover whole clusters:
  // unallocated with the default -S 4k, the 8 KiB one allocated with -S 64k.
  { name: '-o cluster_size=4k (zero runs in data become unallocated clusters)', args: ['-f', 'raw', '-O', 'qcow2', '-o', 'cluster_size=4k', 'src.raw'], outFmt: 'qcow2' },
  { name: '-S 64k', args: ['-f', 'raw', '-O', 'qcow2', '-o', 'cluster_size=4k', '-S', '64k', 'src.raw'], outFmt: 'qcow2' },
  { name: '-S 64k -> raw', args: ['-f', 'raw', '-O', 'raw', '-S', '64k', 'src.raw'], outFmt: 'raw' },
  { name: '-W (out-of-order writes)', args: ['-O', 'qcow2', '-W', 'top.qcow2'], outFmt: 'qcow2' },
  { name: '-W -c -m 16', args: ['-f', 'raw', '-O', 'qcow2', '-W', '-c', '-m', '16', 'src.raw'], outFmt: 'qcow2' },
  { name: '-m 1', args: ['-O', 'qcow2', '-m', '1', 'src.qcow2'], outFmt: 'qcow2' },
  { name: '-m 16', args: ['-O', 'qcow2', '-m', '16', 'src.qcow2'], outFmt: 'qcow2' },
  { name: '-m 1 -c (zstd)', args: ['-O', 'qcow2', '-m', '1', '-c', '-o', 'compression_type=zstd', 'top.qcow2'], outFmt: 'qcow2' },
];

function defaultReference(c: Case): { file: string; fmt: string } {
  const fi = c.args.indexOf('-f');
  const src = c.args[c.args.length - 1]!;
  return { file: src, fmt: fi >= 0 ? c.args[fi + 1]! : src.endsWith('.raw') ? 'raw' : 'qcow2' };
}

// One case at a time (cases side by side cost more CPU than they save time on two cores); within a
// case, the independent subprocesses run together.
describe('qimg convert against qemu-img', () => {
  cases.forEach((c, i) => {
    it(`${c.name}: qemu-img check clean, compare identical, same layout and info as qemu-img`, async () => {
      const ours = `q${i}.${c.outFmt}`;
      const theirs = `e${i}.${c.outFmt}`;
      if (c.prepare) await Promise.all([c.prepare(ours), c.prepare(theirs)]);
      await Promise.all([qemuImgOk(['convert', ...c.args, theirs], dir), qimgOk(['convert', ...c.args, ours])]);

      const ref = c.reference === 'qemu-img' ? undefined : (c.reference ?? defaultReference(c));
      const qcow2 = c.outFmt === 'qcow2';
      const [oursMap, theirsMap, oursInfo, theirsInfo] = await Promise.all([
        mapOf(ours, c.outFmt),
        mapOf(theirs, c.outFmt),
        qcow2 ? infoOf(ours, 'qcow2') : undefined,
        qcow2 ? infoOf(theirs, 'qcow2') : undefined,
        qcow2 ? expectCheckClean(ours) : undefined,
        ref ? expectIdentical(ours, c.outFmt, ref.file, ref.fmt) : undefined,
        expectIdentical(ours, c.outFmt, theirs, c.outFmt),
      ]);
      expect(oursMap, 'layout (qemu-img map) of qimg target vs qemu-img target').toEqual(theirsMap);
      expect(oursInfo).toEqual(theirsInfo);
      await c.extra?.(ours);
    });
  });
});
