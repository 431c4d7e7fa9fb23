// qimg create against qemu-img create 7.2: same stdout (the Formatting line), same stderr (with our
// program name), same exit status, and images with the same host allocation that qemu-img
// describes identically and checks clean.

import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { loadNative } from '../../src/io/native.js';
import { compareHostAllocation, takeActualSize, type HostAllocation } from '../helpers/host-alloc.js';
import { asQimg, qemuImg, qemuImgOk, qimg } from './harness.js';

let dir: string;
beforeAll(async () => {
  dir = await mkdtemp(join(tmpdir(), 'qimg-create-cli-'));
  await qemuImgOk(['create', '-q', '-f', 'qcow2', 'base.qcow2', '10M'], dir);
  await qemuImgOk(['create', '-q', '-f', 'raw', 'base.raw', '3M'], dir);
});
afterAll(async () => {
  await rm(dir, { recursive: true, force: true });
});

/** Runs `create` with both tools into two files (named in place of FILE) and compares everything. */
async function compareCreate(args: string[]): Promise<void> {
  const withName = (name: string): string[] => args.map((a) => (a === 'FILE' ? name : a));
  const [theirs, ours] = await Promise.all([qemuImg(['create', ...withName('qemu.img')], dir), qimg(['create', ...withName('ours.img')], dir)]);
  expect(ours.code).toBe(theirs.code);
  expect(ours.stdout).toBe(theirs.stdout.replaceAll("'qemu.img'", "'ours.img'"));
  expect(ours.stderr).toBe(asQimg(theirs.stderr).replaceAll('qemu.img', 'ours.img'));
  if (theirs.code !== 0) return;
  // Host allocation first (its sync settles what actual-size reads), then info: actual-size is
  // each file's st_blocks * 512, compared through the allocation (test/helpers/host-alloc.ts).
  // Without fallocate (no koffi, or QIMG_NO_NATIVE=1) qimg writes falloc preallocation as zeros.
  const [allocOurs, allocTheirs] = await compareHostAllocation(join(dir, 'ours.img'), join(dir, 'qemu.img'), args.join(' '), {
    fallocEmulated: loadNative() === null,
  });
  const fmtArg = args.includes('-f') ? ['-f', args[args.indexOf('-f') + 1]!] : ['-f', 'raw'];
  const infoOf = async (name: string, alloc: HostAllocation): Promise<Record<string, unknown>> => {
    const r = await qemuImgOk(['info', ...fmtArg, '--output=json', name], dir);
    const info = JSON.parse(r.stdout) as Record<string, unknown>;
    delete info.filename;
    takeActualSize(info, alloc, name);
    return info;
  };
  const [infoOurs, infoTheirs] = await Promise.all([infoOf('ours.img', allocOurs), infoOf('qemu.img', allocTheirs)]);
  expect(infoOurs).toEqual(infoTheirs);
  if (fmtArg[1] === 'qcow2' && !args.includes('-u')) {
    const check = await qemuImg(['check', 'ours.img'], dir);
    expect(check.stdout).toContain('No errors were found on the image.');
    expect(check.code).toBe(0);
  }
}

describe('qimg create prints and makes what qemu-img create does', () => {
  const cases: string[][] = [
    ['-f', 'qcow2', 'FILE', '1M'],
    ['FILE', '1G'],
    ['-q', '-f', 'qcow2', 'FILE', '64M'],
    ['-f', 'qcow2', '-o', 'cluster_size=4k,lazy_refcounts=yes', 'FILE', '1M'],
    ['-f', 'qcow2', '-o', 'compat=0.10', 'FILE', '5M'],
    ['-f', 'qcow2', '-o', 'compat=v3,refcount_bits=1', 'FILE', '5M'],
    ['-f', 'qcow2', '-o', 'extended_l2=on,cluster_size=128k', '-o', 'compression_type=zstd', 'FILE', '100M'],
    ['-f', 'qcow2', '-o', 'preallocation=metadata', 'FILE', '3M'],
    ['-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', 'FILE'],
    ['-f', 'qcow2', '-b', 'base.raw', '-F', 'raw', 'FILE', '5M'],
    ['-f', 'qcow2', '-u', '-b', 'missing.qcow2', '-F', 'qcow2', 'FILE', '1M'],
    ['-f', 'raw', '-o', 'preallocation=full', 'FILE', '100k'],
    ['-f', 'qcow2', '-o', 'size=2M', 'FILE'],
    // errors
    ['-f', 'qcow2', '-o', 'foo=bar', 'FILE', '1M'],
    ['-f', 'qcow2', '-o', 'lazy_refcounts=maybe', 'FILE', '1M'],
    ['-f', 'qcow2', '-o', 'cluster_size=abc', 'FILE', '1M'],
    ['-f', 'qcow2', 'FILE'],
    ['-f', 'qcow2', '-o', 'size=2M', 'FILE', '1M'],
    ['-f', 'qcow2', '-o', 'preallocation=foo', 'FILE', '1M'],
    ['-f', 'qcow2', '-o', 'refcount_bits=3', 'FILE', '1M'],
    ['-f', 'qcow2', '-o', 'compat=0.10,lazy_refcounts=on', 'FILE', '1M'],
    ['-f', 'qcow2', '-b', 'base.qcow2', 'FILE'],
    ['-f', 'qcow2', '-b', 'missing.qcow2', '-F', 'qcow2', 'FILE', '1M'],
    ['-f', 'qcow2', 'FILE', '1X'],
  ];
  for (const args of cases) {
    it(args.join(' '), () => compareCreate(args));
  }
});
