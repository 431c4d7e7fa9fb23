// Helpers that drive the real qemu-img / qemu-io (execFile, never a shell) and compare qimg's view
// of an image with QEMU's, byte for byte.

import { execFile, execFileSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import { mkdtempSync, rmSync } from 'node:fs';
import { readFile, stat } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll } from 'vitest';
import type { Image } from '../../src/image.js';
import type { OpenImage, OpenImageOptions, OpenedImage } from '../../src/open.js';
import * as openModule from '../../src/open.js';
import { prng } from './model.js';

export const MiB = 1024 * 1024;
export const KiB = 1024;
export const TiB = 1024 * 1024 * MiB;

export interface ToolResult {
  code: number;
  stdout: string;
  stderr: string;
}

/** Runs a program; resolves with its exit code and output (never rejects on a non-zero exit). */
export function run(cmd: string, args: string[], options: { cwd?: string; timeoutMs?: number } = {}): Promise<ToolResult> {
  return new Promise((resolve, reject) => {
    execFile(
      cmd,
      args,
      { cwd: options.cwd, maxBuffer: 64 * MiB, encoding: 'utf8', env: { ...process.env, LC_ALL: 'C' }, timeout: options.timeoutMs ?? 0, killSignal: 'SIGKILL' },
      (err, stdout, stderr) => {
        if (err && (err as { killed?: boolean }).killed) {
          resolve({ code: 124, stdout, stderr: `${stderr}(timed out after ${options.timeoutMs} ms)` });
          return;
        }
        if (err && typeof (err as NodeJS.ErrnoException).code === 'string') {
          reject(err); // ENOENT etc.: the tool is missing
          return;
        }
        const code = err ? ((err as { code?: number }).code ?? 1) : 0;
        resolve({ code: typeof code === 'number' ? code : 1, stdout, stderr });
      },
    );
  });
}

function describeRun(cmd: string, args: string[], r: ToolResult): string {
  return `${cmd} ${args.map((a) => (/[\s'"]/.test(a) ? JSON.stringify(a) : a)).join(' ')} exited ${r.code}\n${r.stderr}${r.stdout}`;
}

/**
 * strace can trace `syscall` in children here: CI installs it (.ci/run), but it may be missing, or
 * ptrace forbidden in a container, and then the tests that watch syscalls cannot run.
 */
export function canStrace(syscall: string): boolean {
  try {
    execFileSync('strace', ['-f', '-qq', '-e', `trace=${syscall}`, '-o', '/dev/null', 'true'], { stdio: 'ignore' });
    return true;
  } catch {
    return false;
  }
}

/** Runs qemu-img; throws (with the command line and output) when it fails. */
export async function qemuImg(args: string[], options: { cwd?: string } = {}): Promise<ToolResult> {
  const r = await run('qemu-img', args, options);
  if (r.code !== 0) throw new Error(describeRun('qemu-img', args, r));
  return r;
}

/** Runs qemu-img and returns its result whatever the exit code (for bad-input tests). */
export function qemuImgResult(args: string[], options: { cwd?: string } = {}): Promise<ToolResult> {
  return run('qemu-img', args, options);
}

/**
 * Runs all `cmds` in one qemu-io invocation (`-c cmd1 -c cmd2 …`) on file; throws when any fails.
 * qemu-io exits non-zero when a command fails, and we also watch its output for "failed".
 */
export async function qemuIo(
  file: string,
  cmds: string[],
  options: { format?: 'qcow2' | 'raw'; cwd?: string; imageOpts?: boolean } = {},
): Promise<ToolResult> {
  if (cmds.length === 0) return { code: 0, stdout: '', stderr: '' };
  const args: string[] = [];
  if (options.imageOpts) args.push('--image-opts');
  else args.push('-f', options.format ?? 'qcow2');
  for (const c of cmds) args.push('-c', c);
  args.push(file);
  const r = await run('qemu-io', args, { cwd: options.cwd });
  if (r.code !== 0 || /failed|error/i.test(r.stdout + r.stderr)) throw new Error(describeRun('qemu-io', args, r));
  return r;
}

/**
 * A fresh directory under os.tmpdir(), removed in afterAll. Call at module or describe scope
 * (it registers the hook where it is called).
 */
export function tmpDir(prefix = 'qimg-test-'): string {
  const dir = mkdtempSync(join(tmpdir(), prefix));
  afterAll(() => {
    rmSync(dir, { recursive: true, force: true });
  });
  return dir;
}

let refCounter = 0;

export interface ReferenceOptions {
  format?: 'qcow2' | 'raw';
  /** `-l snapshot.name=…` / `snapshot.id=…` */
  snapshot?: { name?: string; id?: string };
  cwd?: string;
}

/** The bytes of `qemu-img convert -O raw file` (whole virtual disk; for small images only). */
export async function referenceRaw(file: string, options: ReferenceOptions = {}): Promise<Buffer> {
  const dir = mkdtempSync(join(tmpdir(), 'qimg-ref-'));
  try {
    const out = join(dir, `ref-${refCounter++}.raw`);
    const args = ['convert'];
    if (options.format) args.push('-f', options.format);
    if (options.snapshot?.name !== undefined) args.push('-l', `snapshot.name=${options.snapshot.name}`);
    else if (options.snapshot?.id !== undefined) args.push('-l', `snapshot.id=${options.snapshot.id}`);
    args.push('-O', 'raw', file, out);
    await qemuImg(args, { cwd: options.cwd });
    return await readFile(out);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}

/**
 * Guest bytes [offset, offset+length) as QEMU reads them, without converting the whole disk: a raw
 * filter with offset/size over the image. The raw driver wants size a multiple of 512, and
 * qemu-img 7.2 convert misplaces data under an unaligned raw offset (block status is not shifted
 * by the sub-sector part), so we widen to 512-aligned bounds and slice.
 */
export async function referenceRange(
  file: string,
  format: 'qcow2' | 'raw',
  offset: number,
  length: number,
  virtualSize: number,
): Promise<Buffer> {
  const begin = Math.floor(offset / 512) * 512;
  const end = Math.min(Math.ceil((offset + length) / 512) * 512, virtualSize);
  const size = end - begin;
  if (size % 512 !== 0) throw new Error(`referenceRange: ${file} size ${virtualSize} is not a sector multiple`);
  const spec = JSON.stringify({
    driver: 'raw',
    offset: begin,
    size,
    file: { driver: format, file: { driver: 'file', filename: file } },
  });
  const dir = mkdtempSync(join(tmpdir(), 'qimg-ref-'));
  try {
    const out = join(dir, 'range.raw');
    await qemuImg(['convert', '-O', 'raw', `json:${spec}`, out]);
    const buf = await readFile(out);
    return buf.subarray(offset - begin, offset - begin + length);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}

export interface MapEntry {
  start: number;
  length: number;
  depth: number;
  present: boolean;
  zero: boolean;
  data: boolean;
  offset?: number;
  compressed?: boolean;
}

/**
 * The layout in `qemu-img map --output=json` entries, as convert tests compare it: data /
 * compressed / zero / unallocated runs with their depth, host offsets and host holes dropped
 * (QEMU zeroes cluster tails with fallocate: a host-file detail, not the image layout), adjacent
 * runs of one kind merged, from guest offset `from` on.
 */
export function mapLayout(all: MapEntry[], from = 0): string[] {
  const runs: { start: number; length: number; kind: string }[] = [];
  for (const e of all) {
    if (e.start + e.length <= from) continue;
    const start = Math.max(e.start, from);
    const length = e.start + e.length - start;
    const kind = `${!e.present ? 'unallocated' : e.data ? (e.offset === undefined ? 'compressed' : 'data') : 'zero'}@${e.depth}`;
    const last = runs[runs.length - 1];
    if (last && last.kind === kind && last.start + last.length === start) last.length += length;
    else runs.push({ start, length, kind });
  }
  return runs.map((r) => `${r.start}+${r.length} ${r.kind}`);
}

/** `qemu-img map --output=json`. */
export async function qemuMap(file: string, format?: 'qcow2' | 'raw'): Promise<MapEntry[]> {
  const args = ['map', '--output=json'];
  if (format) args.push('-f', format);
  args.push(file);
  const r = await qemuImg(args);
  return JSON.parse(r.stdout) as MapEntry[];
}

/** `qemu-img info --output=json`. */
export async function qemuInfo(file: string, extra: string[] = []): Promise<Record<string, unknown>> {
  const r = await qemuImg(['info', '--output=json', ...extra, file]);
  return JSON.parse(r.stdout) as Record<string, unknown>;
}

export function sha256(data: Uint8Array): string {
  return createHash('sha256').update(data).digest('hex');
}

export async function fileSize(file: string): Promise<number> {
  return (await stat(file)).size;
}

/** The library's openImage, looked up at run time so these tests load before it exists. */
export function getOpenImage(): OpenImage {
  const fn = (openModule as Record<string, unknown>).openImage;
  if (typeof fn !== 'function') throw new Error('src/open.ts does not export openImage yet');
  return fn as OpenImage;
}

export async function open(target: string, options: OpenImageOptions = {}): Promise<OpenedImage> {
  return getOpenImage()(target, options);
}

/** Opens, runs fn, always closes. */
export async function withImage<T>(
  target: string,
  options: OpenImageOptions,
  fn: (image: Image) => Promise<T>,
): Promise<T> {
  const { image } = await open(target, options);
  try {
    return await fn(image);
  } finally {
    await image.close();
  }
}

/** mulberry32: a small seeded PRNG so random reads are reproducible (in model.ts, which the crash child bundles without vitest). */
export { prng };

function hex(b: number | undefined): string {
  return b === undefined ? 'EOF' : `0x${b.toString(16).padStart(2, '0')}`;
}

/** Throws a precise message at the first differing byte (offset is the guest offset of got[0]). */
export function assertBytesEqual(what: string, offset: number, got: Uint8Array, expected: Uint8Array): void {
  if (got.length !== expected.length) {
    throw new Error(`${what}: length at ${offset}: expected ${expected.length} bytes, got ${got.length}`);
  }
  if (Buffer.compare(Buffer.from(got.buffer, got.byteOffset, got.length), Buffer.from(expected.buffer, expected.byteOffset, expected.length)) === 0) return;
  let i = 0;
  while (i < got.length && got[i] === expected[i]) i++;
  let j = i;
  while (j < got.length && got[j] !== expected[j]) j++;
  const ctx = (b: Uint8Array): string => Array.from(b.subarray(i, Math.min(i + 8, b.length)), (x) => hex(x)).join(' ');
  throw new Error(
    `${what}: first mismatch at guest offset ${offset + i} (0x${(offset + i).toString(16)}): ` +
      `expected ${ctx(expected)} got ${ctx(got)}; ${j - i} differing bytes in a row`,
  );
}

export interface SameBytesOptions {
  /** Reference bytes already made (e.g. from a snapshot); default: referenceRaw(file, {format}). */
  reference?: Uint8Array;
  format?: 'qcow2' | 'raw';
  seed?: number;
  /** How many random unaligned reads besides the sequential 1 MiB chunks. */
  randomReads?: number;
  chunk?: number;
  /** Label used in failure messages. */
  label?: string;
}

/** Above this the whole disk is not compared; block-status-guided sampled ranges are. */
export const WHOLE_COMPARE_LIMIT = 256 * MiB;

/**
 * Reads the whole virtual disk through qimg in chunks plus seeded random unaligned reads and
 * compares with QEMU's bytes; also checks block status runs are contiguous, positive and that runs
 * saying zero-and-not-data read as zeros. Large images go to expectSameBytesSampled.
 */
export async function expectSameBytes(image: Image, file: string, options: SameBytesOptions = {}): Promise<void> {
  const label = options.label ?? file;
  if (!options.reference && image.virtualSize > WHOLE_COMPARE_LIMIT) {
    await expectSameBytesSampled(image, file, options);
    return;
  }
  const ref = options.reference ?? (await referenceRaw(file, { format: options.format ?? image.format }));
  if (image.virtualSize !== ref.length) {
    throw new Error(`${label}: virtual size: qemu-img converts ${ref.length} bytes, qimg says ${image.virtualSize}`);
  }
  const chunk = options.chunk ?? MiB;
  const size = image.virtualSize;
  for (let off = 0; off < size; off += chunk) {
    const n = Math.min(chunk, size - off);
    const got = await image.read(off, n);
    assertBytesEqual(`${label} (sequential ${n}-byte read)`, off, got, ref.subarray(off, off + n));
  }
  const rand = prng(options.seed ?? 0x5eed);
  const count = size === 0 ? 0 : (options.randomReads ?? 64);
  for (let k = 0; k < count; k++) {
    const off = Math.floor(rand() * size);
    const maxLen = Math.min(size - off, rand() < 0.2 ? 4 * MiB : 200_000);
    const len = Math.max(0, Math.floor(rand() * (maxLen + 1)));
    const got = await image.read(off, len);
    assertBytesEqual(`${label} (random read ${k}: ${len} bytes at ${off})`, off, got, ref.subarray(off, off + len));
  }
  // A buffer-reuse path: readInto with one buffer for several offsets.
  if (size > 0) {
    const buf = new Uint8Array(Math.min(size, 3 * 4096 + 7));
    for (let k = 0; k < 8; k++) {
      const off = Math.floor(rand() * (size - buf.length + 1));
      buf.fill(0xee);
      await image.readInto(buf, off);
      assertBytesEqual(`${label} (readInto ${buf.length} at ${off})`, off, buf, ref.subarray(off, off + buf.length));
    }
  }
  await checkBlockStatusAgainstBytes(image, ref, label);
}

const ZEROS = new Uint8Array(64 * 1024);

/** Index of the first non-zero byte, or -1 (64 KiB blocks compared natively, then bytes). */
export function firstNonZero(b: Uint8Array): number {
  for (let off = 0; off < b.length; off += ZEROS.length) {
    const n = Math.min(ZEROS.length, b.length - off);
    if (Buffer.compare(Buffer.from(b.buffer, b.byteOffset + off, n), Buffer.from(ZEROS.buffer, 0, n)) === 0) continue;
    for (let i = off; i < off + n; i++) if (b[i] !== 0) return i;
  }
  return -1;
}

/** Block status runs must tile the disk and zero runs (zero && !data) must read as zeros. */
export async function checkBlockStatusAgainstBytes(image: Image, ref: Uint8Array, label: string): Promise<void> {
  let pos = 0;
  for await (const st of image.blockStatus()) {
    if (st.offset !== pos) throw new Error(`${label}: block status run at ${st.offset}, expected ${pos}`);
    if (!(st.length > 0)) throw new Error(`${label}: block status run at ${pos} has length ${st.length}`);
    if (st.zero && !st.data) {
      const slice = ref.subarray(st.offset, st.offset + st.length);
      const nz = firstNonZero(slice);
      if (nz >= 0) {
        throw new Error(
          `${label}: block status says zero for [${st.offset}, +${st.length}) but QEMU reads ${hex(slice[nz])} at ${st.offset + nz}`,
        );
      }
    }
    pos += st.length;
  }
  if (pos !== image.virtualSize) throw new Error(`${label}: block status covers ${pos} of ${image.virtualSize} bytes`);
}

/**
 * For huge sparse images: QEMU's map (qemu-img map) decides what to sample. Every data run (up to
 * 1 MiB of it, plus its last bytes) is compared with QEMU's bytes read through a raw offset filter;
 * zero runs are sampled at their edges and at seeded random offsets and must read as zeros.
 */
export async function expectSameBytesSampled(image: Image, file: string, options: SameBytesOptions = {}): Promise<void> {
  const label = options.label ?? file;
  const format = options.format ?? image.format;
  const info = await qemuInfo(file, ['-f', format]);
  const vsize = info['virtual-size'] as number;
  if (image.virtualSize !== vsize) throw new Error(`${label}: virtual size: qemu-img ${vsize}, qimg ${image.virtualSize}`);
  const map = await qemuMap(file, format);
  const rand = prng(options.seed ?? 0x5eed);
  const compare = async (off: number, len: number, why: string): Promise<void> => {
    if (len <= 0) return;
    const expected = await referenceRange(file, format, off, len, vsize);
    const got = await image.read(off, len);
    assertBytesEqual(`${label} (${why})`, off, got, expected);
  };
  for (const e of map) {
    if (e.data) {
      const head = Math.min(e.length, MiB);
      await compare(e.start, head, `data run at ${e.start}`);
      if (e.length > head) await compare(e.start + e.length - 4096, 4096, `end of data run at ${e.start}`);
      // Across the run's start (unaligned, straddling the previous run).
      if (e.start > 0) await compare(e.start - 777, Math.min(777 + 1000, vsize - e.start + 777), `across ${e.start}`);
    } else if (e.zero) {
      const probes = [e.start, e.start + e.length - 1];
      for (let k = 0; k < 4; k++) probes.push(e.start + Math.floor(rand() * e.length));
      for (const p of probes) {
        const len = Math.min(4096 + 13, e.start + e.length - p);
        const got = await image.read(p, len);
        const nz = firstNonZero(got);
        if (nz >= 0) throw new Error(`${label}: QEMU maps [${e.start}, +${e.length}) as zero but qimg reads ${hex(got[nz])} at ${p + nz}`);
      }
    }
  }
}

/** A run of block status in the terms qemu-img map --output=json prints (host offsets ignored). */
export interface StatusRun {
  start: number;
  length: number;
  data: boolean;
  zero: boolean;
  present: boolean;
  depth: number;
}

function mergeRuns(runs: StatusRun[]): StatusRun[] {
  const out: StatusRun[] = [];
  for (const r of runs) {
    const last = out[out.length - 1];
    if (last && last.start + last.length === r.start && last.data === r.data && last.zero === r.zero && last.present === r.present && last.depth === r.depth) {
      last.length += r.length;
    } else out.push({ ...r });
  }
  return out;
}

/**
 * qimg's block status against `qemu-img map --output=json` on the same file at the same moment:
 * data/zero/present/depth per byte range (runs merged; host offsets not compared).
 */
export async function expectSameMap(image: Image, file: string, format: 'qcow2' | 'raw', label = file): Promise<void> {
  const ours: StatusRun[] = [];
  for await (const st of image.blockStatus()) {
    ours.push({ start: st.offset, length: st.length, data: st.data, zero: st.zero, present: st.present, depth: st.depth });
  }
  const theirs = (await qemuMap(file, format)).map((e) => ({ start: e.start, length: e.length, data: e.data, zero: e.zero, present: e.present, depth: e.depth }));
  const a = mergeRuns(ours);
  const b = mergeRuns(theirs);
  for (let i = 0; i < Math.max(a.length, b.length); i++) {
    const x = a[i];
    const y = b[i];
    if (!x || !y || x.start !== y.start || x.length !== y.length || x.data !== y.data || x.zero !== y.zero || x.present !== y.present || x.depth !== y.depth) {
      throw new Error(`${label}: block status run ${i} differs from qemu-img map:\n  qemu-img: ${JSON.stringify(y)}\n  qimg:     ${JSON.stringify(x)}`);
    }
  }
}
