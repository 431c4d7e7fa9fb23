// qimg resize against qemu-img resize 7.2: two images made the same way (qemu-img create, qemu-io
// writes, snapshots, bitmaps), one resized by each tool; same stdout, stderr (with our program
// name), exit status, then the same `qemu-img info --output=json` (less the file name), the same
// `qemu-img check` output, the same `qemu-img map`, and the same host allocation of the two files
// (test/helpers/host-alloc.ts; actual-size through it).

import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { loadNative } from '../../src/io/native.js';
import { expectSameHostAllocation, hostAllocation, takeActualSize, type HostAllocation } from '../helpers/host-alloc.js';
import { asQimg, qemuImg, qemuImgOk, qemuIoOk, qimg } from './harness.js';

let dir: string;
beforeAll(async () => {
  dir = await mkdtemp(join(tmpdir(), 'qimg-resize-cli-'));
});
afterAll(async () => {
  await rm(dir, { recursive: true, force: true });
});

interface Case {
  name: string;
  /** qemu-img create arguments (FILE = the image). */
  create: string[];
  /** qemu-io commands run on the new image. */
  io?: string[];
  /** Further qemu-img commands run on the image (FILE = the image). */
  prep?: string[][];
  /** qemu-img resize arguments (FILE = the image). */
  resize: string[];
  /**
   * Why the two files' host allocation legitimately differs, when it does; otherwise it is
   * compared (length, data and unwritten ranges, st_blocks up to ext4's extent bookkeeping:
   * test/helpers/host-alloc.ts), and actual-size with it.
   */
  hostDiffers?: string;
  /** Compare qemu-img map (default true). */
  map?: boolean;
  /** Compare check's image end offset (default true). */
  endOffset?: boolean;
}

const QCOW2 = (size: string, ...opts: string[]): string[] => ['-f', 'qcow2', ...(opts.length ? ['-o', opts.join(',')] : []), 'FILE', size];
const RAW = (size: string): string[] => ['-f', 'raw', 'FILE', size];
const DATA = ['write -P 0x11 0 64k', 'write -P 0x22 1M 100k', 'write -z 2M 64k'];

async function make(c: Case, name: string): Promise<void> {
  const sub = (args: string[]): string[] => args.map((a) => (a === 'FILE' ? name : a));
  await qemuImgOk(['create', '-q', ...sub(c.create)], dir);
  const fmt = c.create[c.create.indexOf('-f') + 1] as 'qcow2' | 'raw';
  if (c.io?.length) await qemuIoOk(name, fmt, c.io, dir);
  for (const p of c.prep ?? []) await qemuImgOk(sub(p), dir);
}

interface Facts {
  alloc: HostAllocation;
  info: Record<string, unknown>;
  check: string;
  map: string;
}

async function facts(name: string, c: Case): Promise<Facts> {
  const fmt = c.create[c.create.indexOf('-f') + 1]!;
  // First: FIEMAP's sync settles delayed allocation, so the actual-size info reads is final.
  const alloc = await hostAllocation(join(dir, name));
  const [infoRun, check, mapRun] = await Promise.all([
    qemuImgOk(['info', '-f', fmt, '--output=json', name], dir),
    fmt === 'qcow2' ? qemuImg(['check', '-f', fmt, name], dir) : { stdout: '', stderr: '', code: 0 },
    c.map === false ? undefined : qemuImgOk(['map', '-f', fmt, '--output=json', name], dir),
  ]);
  const info = JSON.parse(infoRun.stdout) as Record<string, unknown>;
  delete info.filename;
  takeActualSize(info, alloc, name);
  // Snapshot times are when each image's snapshot was taken.
  for (const sn of (info.snapshots ?? []) as Record<string, unknown>[]) {
    delete sn['date-sec'];
    delete sn['date-nsec'];
  }
  let checkText = `${check.code}\n${check.stdout.replaceAll(name, 'FILE')}${check.stderr.replaceAll(name, 'FILE')}`;
  if (c.endOffset === false) checkText = checkText.replace(/^Image end offset: \d+\n/m, '');
  return { alloc, info, check: checkText, map: mapRun?.stdout ?? '' };
}

/**
 * Without fallocate (no koffi, or QIMG_NO_NATIVE=1) qimg writes falloc preallocation as zeros, as
 * posix_fallocate does where fallocate is missing: the blocks are allocated all the same, but
 * written, where QEMU's are unwritten (holes to SEEK_DATA, so to raw's qemu-img map).
 */
const fallocEmulated = loadNative() === null;

let serial = 0;
async function compare(c: Case): Promise<{ code: number; stderr: string }> {
  const n = serial++;
  const a = `q${n}.img`;
  const b = `o${n}.img`;
  // The two images are independent files: made, resized and described side by side.
  await Promise.all([make(c, a), make(c, b)]);
  const [theirs, ours] = await Promise.all([
    qemuImg(['resize', ...c.resize.map((x) => (x === 'FILE' ? a : x))], dir),
    qimg(['resize', ...c.resize.map((x) => (x === 'FILE' ? b : x))], dir),
  ]);
  expect(ours.code).toBe(theirs.code);
  expect(ours.stdout).toBe(theirs.stdout);
  expect(ours.stderr).toBe(asQimg(theirs.stderr).replaceAll(a, b));
  const [fa, fb] = await Promise.all([facts(a, c), facts(b, c)]);
  expect(fb.info).toEqual(fa.info);
  expect(fb.check).toBe(fa.check);
  expect(fb.map).toBe(fa.map);
  if (c.hostDiffers === undefined) expectSameHostAllocation(fb.alloc, fa.alloc, c.name, { fallocEmulated });
  return theirs;
}

describe('qimg resize does what qemu-img resize does', () => {
  const cases: Case[] = [
    // Growing and shrinking, absolute and relative.
    { name: 'grow absolute', create: QCOW2('10M'), io: DATA, resize: ['FILE', '20M'] },
    { name: 'grow relative', create: QCOW2('10M'), io: DATA, resize: ['FILE', '+5M'] },
    { name: 'grow unaligned old size', create: QCOW2('1000K'), io: ['write -P 7 0 1000K'], resize: ['FILE', '1100M'] },
    { name: 'same size', create: QCOW2('10M'), resize: ['FILE', '10M'] },
    { name: 'shrink without --shrink', create: QCOW2('10M'), io: DATA, resize: ['FILE', '5M'] },
    { name: 'relative shrink without --shrink', create: QCOW2('10M'), resize: ['FILE', '-1M'] },
    { name: '--shrink absolute', create: QCOW2('10M'), io: DATA, resize: ['--shrink', 'FILE', '1M'] },
    { name: '--shrink relative', create: QCOW2('10M'), io: DATA, resize: ['--shrink', 'FILE', '-9M'] },
    { name: '--shrink into a cluster', create: QCOW2('10M'), io: DATA, resize: ['--shrink', 'FILE', '1056768'] },
    { name: 'size 0', create: QCOW2('10M'), resize: ['--shrink', 'FILE', '0'] },
    { name: 'negative result', create: QCOW2('10M'), resize: ['--shrink', 'FILE', '-20M'] },
    { name: 'qcow2 size not a multiple of 512', create: QCOW2('10M'), resize: ['FILE', '1000'] },
    { name: 'qcow2 relative size not a multiple of 512', create: QCOW2('10M'), resize: ['FILE', '+1000'] },
    { name: 'quiet', create: QCOW2('10M'), resize: ['-q', 'FILE', '11M'] },
    // 40G: the new 10 MB L1 table needs new refcount blocks and a refcount table of 2 clusters (one
    // covers 8 MB of 512-byte clusters). Those are placed differently (the allocator's refblock
    // growth is not QEMU's), so the files end at different offsets.
    { name: '512-byte clusters grown to 40G (L1 growth)', create: QCOW2('1M', 'cluster_size=512'), io: ['write -P 3 0 4k'], resize: ['FILE', '40G'],
      endOffset: false, hostDiffers: 'refcount blocks for the grown L1 table placed differently' },
    { name: 'compat=0.10 grow', create: QCOW2('10M', 'compat=0.10'), io: DATA, resize: ['FILE', '30M'] },
    { name: 'compat=0.10 shrink', create: QCOW2('10M', 'compat=0.10'), io: DATA, resize: ['--shrink', 'FILE', '1M'] },
    { name: 'lazy refcounts grow', create: QCOW2('10M', 'lazy_refcounts=on'), io: DATA, resize: ['FILE', '2G'] },
    {
      name: 'v3 with an internal snapshot: grow', create: QCOW2('10M'), io: DATA,
      prep: [['snapshot', '-c', 's1', 'FILE']], resize: ['FILE', '20M'],
    },
    {
      name: 'v3 with an internal snapshot: shrink', create: QCOW2('10M'), io: DATA,
      prep: [['snapshot', '-c', 's1', 'FILE']], resize: ['--shrink', 'FILE', '1M'],
    },
    {
      name: 'v2 with an internal snapshot (refused)', create: QCOW2('10M', 'compat=0.10'), io: DATA,
      prep: [['snapshot', '-c', 's1', 'FILE']], resize: ['FILE', '20M'],
    },
    // raw, with and without -f.
    { name: 'raw grow with -f', create: RAW('3M'), io: ['write -P 9 0 64k'], resize: ['-f', 'raw', 'FILE', '5M'] },
    { name: 'raw grow probed (warning)', create: RAW('3M'), io: ['write -P 9 0 64k'], resize: ['FILE', '+2M'] },
    { name: 'raw shrink without --shrink', create: RAW('3M'), resize: ['-f', 'raw', 'FILE', '1M'] },
    { name: 'raw --shrink', create: RAW('3M'), io: ['write -P 9 0 2M'], resize: ['-f', 'raw', '--shrink', 'FILE', '1M'] },
    { name: 'raw size not a multiple of 512', create: RAW('3M'), resize: ['-f', 'raw', 'FILE', '3146728'] },
    { name: 'raw grown from empty', create: RAW('0'), resize: ['-f', 'raw', 'FILE', '1000'] },
    // Options and operands qemu-img refuses.
    { name: 'bad preallocation mode', create: QCOW2('10M'), resize: ['--preallocation=bogus', 'FILE', '20M'] },
    { name: 'preallocation with shrink', create: QCOW2('10M'), resize: ['--preallocation=full', '--shrink', 'FILE', '5M'] },
    { name: 'preallocation with the same size', create: QCOW2('10M'), resize: ['--preallocation=metadata', 'FILE', '10M'] },
    { name: 'bad size text', create: QCOW2('10M'), resize: ['FILE', '12Q'] },
    { name: 'bad relative size text', create: QCOW2('10M'), resize: ['FILE', '+abc'] },
    { name: 'missing operand', create: QCOW2('10M'), resize: ['FILE'] },
    { name: 'raw metadata preallocation', create: RAW('1M'), resize: ['-f', 'raw', '--preallocation=metadata', 'FILE', '2M'] },
  ];
  for (const m of ['metadata', 'falloc', 'full']) {
    cases.push({ name: `qcow2 --preallocation=${m}`, create: QCOW2('1M'), resize: [`--preallocation=${m}`, 'FILE', '10M'] });
    // 16k clusters: an L2 table maps 32M, so 70M needs 3 L1 entries where 1000K had 1 (the L1 table
    // grows, as it does past 1G with 64k clusters), for a 70M full preallocation instead of 1.1G;
    // 1000K is 62.5 clusters, so the old last cluster is partial and holds data.
    cases.push({
      name: `qcow2 --preallocation=${m}, unaligned old size with data, L1 growth`, create: QCOW2('1000K', 'cluster_size=16k'),
      io: ['write -P 7 0 1000K'], resize: [`--preallocation=${m}`, 'FILE', '70M'],
    });
    cases.push({ name: `qcow2 v2 --preallocation=${m}`, create: QCOW2('1000K', 'compat=0.10'), io: DATA.slice(0, 1), resize: [`--preallocation=${m}`, 'FILE', '+7M'] });
    cases.push({ name: `qcow2 lazy refcounts --preallocation=${m}`, create: QCOW2('3M', 'lazy_refcounts=on'), io: DATA, resize: [`--preallocation=${m}`, 'FILE', '40M'] });
    cases.push({
      name: `qcow2 with a snapshot --preallocation=${m}`, create: QCOW2('3M'), io: DATA,
      prep: [['snapshot', '-c', 's1', 'FILE']], resize: [`--preallocation=${m}`, 'FILE', '20M'],
    });
  }
  for (const m of ['falloc', 'full']) {
    // raw's map is SEEK_DATA's: it shows zeros written in place of a fallocate (fallocEmulated).
    const map = m === 'full' || !fallocEmulated;
    cases.push({ name: `raw --preallocation=${m}`, create: RAW('1M'), io: ['write -P 9 0 64k'], resize: ['-f', 'raw', `--preallocation=${m}`, 'FILE', '3M'], map });
    cases.push({ name: `raw --preallocation=${m} from empty`, create: RAW('0'), resize: ['-f', 'raw', `--preallocation=${m}`, 'FILE', '10000'], map });
  }

  for (const c of cases) {
    it(c.name, async () => {
      await compare(c);
    }, 60_000);
  }

  // Images with persistent bitmaps: test/cli/resize-bitmaps.test.ts.

  it('missing file', async () => {
    const theirs = await qemuImg(['resize', 'nonexistent.img', '1M'], dir);
    const ours = await qimg(['resize', 'nonexistent.img', '1M'], dir);
    expect(ours.code).toBe(theirs.code);
    expect(ours.stdout).toBe(theirs.stdout);
    expect(ours.stderr).toBe(asQimg(theirs.stderr));
  });

  it('the shrink refusal carries the warning', async () => {
    const r = await compare({ name: 'x', create: QCOW2('10M'), resize: ['FILE', '5M'] });
    expect(r.code).toBe(1);
    expect(r.stderr).toContain('Use the --shrink option');
    expect(r.stderr).toContain('warning: Shrinking an image will delete all data');
  });
});
