// qimg convert against qemu-img convert on the same sources: every source/target combination the
// CLI takes. Each qimg output must be `qemu-img check` clean (no errors, no leaks), `qemu-img
// compare` identical to the source, and laid out like qemu-img's own output (qemu-img map
// --output=json: which ranges are data, zero or unallocated, and where, since both write in guest
// order). Error cases compare stderr and exit status.

import { copyFileSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { beforeAll, describe, expect, it } from 'vitest';
import { asQimg, cliPath, qemuImg, qemuImgOk, qemuIoOk, qimg } from '../cli/harness.js';
import { prng, tmpDir } from '../helpers/qemu.js';
import { qimgProbed } from './probe.js';

const MiB = 1024 * 1024;
const dir = tmpDir('qimg-convert-');

/** A raw source: random (incompressible) data, text-like (compressible) data, zeros and holes. */
function writeRawSource(file: string, size: number, seed: number): void {
  const buf = Buffer.alloc(size);
  const rnd = prng(seed);
  const fillRandom = (from: number, len: number): void => {
    for (let i = from; i < from + len; i++) buf[i] = (rnd() * 256) | 0;
  };
  const fillText = (from: number, len: number): void => {
    const words = ['qcow2 ', 'cluster ', 'refcount ', 'backing ', 'zero ', 'L2 ', '\n'];
    let i = from;
    while (i < from + len) {
      const w = words[(rnd() * words.length) | 0]!;
      buf.write(w.slice(0, from + len - i), i, 'latin1');
      i += w.length;
    }
  };
  fillRandom(0, 192 * 1024); // three incompressible clusters (stored uncompressed with -c)
  fillText(1 * MiB, 700 * 1024);
  fillText(3 * MiB + 4096, 3000); // a short run inside an otherwise zero region
  fillRandom(5 * MiB - 512, 1024); // crosses a 64 KiB and 2 MiB cluster boundary
  fillText(9 * MiB, 2 * MiB + 12345);
  writeFileSync(file, buf);
}

async function check(file: string): Promise<void> {
  const r = await qemuImg(['check', '--output=json', file], dir);
  const out = JSON.parse(r.stdout) as Record<string, unknown>;
  expect({ code: r.code, errors: out['check-errors'] ?? 0, leaks: out.leaks ?? 0, corruptions: out.corruptions ?? 0 }, `check ${file}`).toEqual({
    code: 0, errors: 0, leaks: 0, corruptions: 0,
  });
}

async function compare(a: string, fa: string, b: string, fb: string): Promise<void> {
  const r = await qemuImg(['compare', '-f', fa, '-F', fb, a, b], dir);
  expect(`${r.code} ${r.stdout}${r.stderr}`, `compare ${a} ${b}`).toBe('0 Images are identical.\n');
}

interface MapRun { start: number; length: number; depth: number; present: boolean; zero: boolean; data: boolean; offset?: number }

async function map(file: string, fmt: string): Promise<MapRun[]> {
  return JSON.parse((await qemuImgOk(['map', '--output=json', '-f', fmt, file], dir)).stdout) as MapRun[];
}

/** Map runs without host offsets, adjacent equal runs merged. */
function shape(runs: MapRun[]): string[] {
  const out: MapRun[] = [];
  for (const r of runs) {
    const { offset: _o, ...rest } = r;
    const last = out[out.length - 1];
    if (last && last.depth === rest.depth && last.present === rest.present && last.zero === rest.zero && last.data === rest.data) last.length += rest.length;
    else out.push({ ...rest });
  }
  return out.map((r) => JSON.stringify(r));
}

interface Case {
  name: string;
  args: string[];
  sources: string[];
  /** Source format for qemu-img compare (default: qcow2 for .qcow2 names, else raw). */
  srcFmt?: string;
  outFmt: 'qcow2' | 'raw';
  /** Compare the output with qemu-img's output instead of the source (snapshots). */
  compareWithQemu?: boolean;
  /** 'exact': map with host offsets; 'shape': data/zero/present runs only; 'none'. */
  map?: 'exact' | 'shape' | 'none';
  /** Prepare the target file (for -n) in both copies. */
  prepare?: (file: string) => Promise<void>;
}

const fmtOf = (name: string): string => (name.endsWith('.qcow2') ? 'qcow2' : 'raw');

const CASES: Case[] = [
  { name: 'raw to qcow2', args: ['-O', 'qcow2'], sources: ['src.raw'], outFmt: 'qcow2' },
  { name: 'qcow2 to qcow2', args: ['-O', 'qcow2'], sources: ['src.qcow2'], outFmt: 'qcow2' },
  { name: 'qcow2 to raw', args: ['-O', 'raw'], sources: ['src.qcow2'], outFmt: 'raw' },
  { name: 'raw to raw', args: [], sources: ['src.raw'], outFmt: 'raw' },
  { name: 'snapshot to qcow2 (-l)', args: ['-l', 'snap1', '-O', 'qcow2'], sources: ['snap.qcow2'], outFmt: 'qcow2', compareWithQemu: true },
  {
    name: 'snapshot to qcow2 (-l snapshot.name=)', args: ['-l', 'snapshot.name=snap1', '-O', 'qcow2'], sources: ['snap.qcow2'],
    outFmt: 'qcow2', compareWithQemu: true,
  },
  { name: 'chain flattened to qcow2', args: ['-O', 'qcow2'], sources: ['top.qcow2'], outFmt: 'qcow2' },
  { name: 'chain top with -B', args: ['-O', 'qcow2', '-B', 'base.qcow2', '-F', 'qcow2'], sources: ['top.qcow2'], outFmt: 'qcow2' },
  { name: 'chain top with -B -c', args: ['-c', '-O', 'qcow2', '-B', 'base.qcow2', '-F', 'qcow2'], sources: ['top.qcow2'], outFmt: 'qcow2' },
  {
    name: 'chain top with -o backing_file, backing_fmt', args: ['-O', 'qcow2', '-o', 'backing_file=base.qcow2,backing_fmt=qcow2'],
    sources: ['top.qcow2'], outFmt: 'qcow2',
  },
  { name: 'raw with -B (-S 0 not set) onto a shorter backing', args: ['-O', 'qcow2', '-B', 'short.qcow2', '-F', 'qcow2'], sources: ['top-short.qcow2'], outFmt: 'qcow2' },
  { name: '-c zlib', args: ['-c', '-O', 'qcow2'], sources: ['src.raw'], outFmt: 'qcow2' },
  { name: '-c zstd', args: ['-c', '-O', 'qcow2', '-o', 'compression_type=zstd'], sources: ['src.qcow2'], outFmt: 'qcow2' },
  { name: '-c zlib, 512-byte clusters', args: ['-c', '-O', 'qcow2', '-o', 'cluster_size=512'], sources: ['src.raw'], outFmt: 'qcow2' },
  { name: '-c, 2 MiB clusters, chain', args: ['-c', '-O', 'qcow2', '-o', 'cluster_size=2M'], sources: ['top.qcow2'], outFmt: 'qcow2' },
  { name: 'cluster_size=512', args: ['-O', 'qcow2', '-o', 'cluster_size=512'], sources: ['top.qcow2'], outFmt: 'qcow2' },
  { name: 'cluster_size=2M', args: ['-O', 'qcow2', '-o', 'cluster_size=2M'], sources: ['src.raw'], outFmt: 'qcow2' },
  { name: 'compat=0.10', args: ['-O', 'qcow2', '-o', 'compat=0.10'], sources: ['top.qcow2'], outFmt: 'qcow2' },
  { name: 'compat=0.10 with -B', args: ['-O', 'qcow2', '-o', 'compat=0.10', '-B', 'base.qcow2', '-F', 'qcow2'], sources: ['top.qcow2'], outFmt: 'qcow2' },
  // QEMU zeroes the untouched rest of a partly written subcluster with a host write-zeroes (a
  // hole in the file, which map then reports as zero); qimg's engine writes zero bytes.
  { name: 'extended_l2=on', args: ['-O', 'qcow2', '-o', 'extended_l2=on'], sources: ['src.raw'], outFmt: 'qcow2', map: 'shape' },
  { name: 'refcount_bits=1, lazy_refcounts', args: ['-O', 'qcow2', '-o', 'refcount_bits=1,lazy_refcounts=on'], sources: ['src.qcow2'], outFmt: 'qcow2' },
  { name: 'preallocation=metadata', args: ['-O', 'qcow2', '-o', 'preallocation=metadata'], sources: ['src.raw'], outFmt: 'qcow2', map: 'none' },
  { name: 'several sources concatenated to qcow2', args: ['-O', 'qcow2'], sources: ['src.raw', 'src.qcow2', 'top.qcow2'], outFmt: 'qcow2' },
  { name: 'several sources concatenated, -c', args: ['-c', '-O', 'qcow2'], sources: ['odd.raw', 'src.qcow2'], outFmt: 'qcow2' },
  { name: 'several sources concatenated to raw', args: [], sources: ['odd.raw', 'src.raw'], outFmt: 'raw' },
  { name: '-S 0', args: ['-S', '0', '-O', 'qcow2'], sources: ['top.qcow2'], outFmt: 'qcow2' },
  { name: '-S 64k', args: ['-S', '64k', '-O', 'qcow2'], sources: ['src.raw'], outFmt: 'qcow2' },
  { name: '-W -m 16', args: ['-W', '-m', '16', '-O', 'qcow2'], sources: ['src.raw'], outFmt: 'qcow2', map: 'shape' },
  {
    name: '-n onto an existing raw target with old data', args: ['-n'], sources: ['src.qcow2'], outFmt: 'raw',
    prepare: async (f) => {
      await qemuImgOk(['create', '-f', 'raw', f, '16M'], dir);
      await qemuIoOk(f, 'raw', ['write -P 0xee 0 16M'], dir);
    },
  },
  {
    // Shape only: QEMU's unmapping zero writes free the old clusters and its allocator reuses
    // them for the new data; qimg's engine allocates those at the file's end.
    name: '-n onto an existing qcow2 target with old data', args: ['-n', '-O', 'qcow2'], sources: ['src.raw'], outFmt: 'qcow2', map: 'shape',
    prepare: async (f) => {
      await qemuImgOk(['create', '-f', 'qcow2', f, '16M'], dir);
      await qemuIoOk(f, 'qcow2', ['write -P 0xee 0 6M', 'write -P 0xdd 10M 6M'], dir);
    },
  },
  {
    name: '-n --target-is-zero onto a fresh qcow2', args: ['-n', '--target-is-zero', '-O', 'qcow2'], sources: ['top.qcow2'], outFmt: 'qcow2',
    prepare: async (f) => {
      await qemuImgOk(['create', '-f', 'qcow2', '-o', 'cluster_size=4k', f, '16M'], dir);
    },
  },
];

beforeAll(async () => {
  writeRawSource(join(dir, 'src.raw'), 16 * MiB, 1);
  writeFileSync(join(dir, 'odd.raw'), Buffer.alloc(3 * MiB + 1536, 0x5a));
  // Four independent sources, made side by side.
  await Promise.all([
    (async () => {
      await qemuImgOk(['convert', '-f', 'raw', '-O', 'qcow2', 'src.raw', 'src.qcow2'], dir);
      await qemuIoOk('src.qcow2', 'qcow2', ['write -z 12M 1M', 'write -P 0 14M 128k', 'write -z -u 9M 64k'], dir);
    })(),
    (async () => {
      // A chain: base <- top with data, zero clusters, discards, partial clusters.
      await qemuImgOk(['convert', '-f', 'raw', '-O', 'qcow2', 'src.raw', 'base.qcow2'], dir);
      await qemuImgOk(['create', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', 'top.qcow2'], dir);
      await qemuIoOk('top.qcow2', 'qcow2', [
        'write -P 0x31 64k 64k', 'write -P 0x32 1100k 3k', 'write -z 1M 64k', 'write -z 9M 2M', 'write -P 0 2M 64k',
        'discard 10M 128k', 'write -P 0x33 15M 1M',
      ], dir);
    })(),
    (async () => {
      // A top larger than its backing file (the target's backing ends early: zeros past it stay unallocated).
      await qemuImgOk(['create', '-f', 'qcow2', 'short.qcow2', '4M'], dir);
      await qemuIoOk('short.qcow2', 'qcow2', ['write -P 0x41 0 4M'], dir);
      await qemuImgOk(['create', '-f', 'qcow2', '-b', 'short.qcow2', '-F', 'qcow2', 'top-short.qcow2', '16M'], dir);
      await qemuIoOk('top-short.qcow2', 'qcow2', ['write -P 0x42 1M 1M', 'write -z 2M 64k', 'write -z 6M 1M', 'write -P 0x43 7M 64k'], dir);
    })(),
    (async () => {
      // Internal snapshot: the image changes after it.
      await qemuImgOk(['convert', '-f', 'raw', '-O', 'qcow2', 'src.raw', 'snap.qcow2'], dir);
      await qemuImgOk(['snapshot', '-c', 'snap1', 'snap.qcow2'], dir);
      await qemuIoOk('snap.qcow2', 'qcow2', ['write -P 0x77 0 2M', 'write -z 9M 1M'], dir);
    })(),
  ]);
  await cliPath();
}, 60_000);

// Each case writes its own targets and only reads the shared sources: a few run at a time.
describe.concurrent('qimg convert matches qemu-img convert', () => {
  it.each(CASES.map((c, i) => [c.name, c, i] as const))('%s', async (_name, c, i) => {
    const ours = `ours-${i}.${c.outFmt}`;
    const theirs = `theirs-${i}.${c.outFmt}`;
    if (c.prepare) {
      await c.prepare(join(dir, ours));
      copyFileSync(join(dir, ours), join(dir, theirs));
    }
    // The two converts only read the sources (each writes its own target): side by side.
    const [q, r] = await Promise.all([
      qemuImg(['convert', ...c.args, ...c.sources, theirs], dir),
      qimg(['convert', ...c.args, ...c.sources, ours], dir),
    ]);
    expect(q.code, q.stderr).toBe(0);
    expect({ code: r.code, stdout: r.stdout, stderr: r.stderr }).toEqual({ code: 0, stdout: q.stdout, stderr: '' });
    // Same backing file name and format, same header options.
    const info = async (f: string): Promise<Record<string, unknown>> => {
      const j = JSON.parse((await qemuImgOk(['info', '--output=json', f], dir)).stdout) as Record<string, unknown>;
      const { filename: _f, 'actual-size': _a, 'dirty-flag': _d, ...rest } = j;
      return rest;
    };
    const mode = c.map ?? 'exact';
    // Everything after the converts only reads: all at once.
    await Promise.all([
      c.outFmt === 'qcow2' ? check(ours) : undefined,
      c.compareWithQemu || c.sources.length > 1
        ? compare(ours, c.outFmt, theirs, c.outFmt)
        : compare(c.sources[0]!, c.srcFmt ?? fmtOf(c.sources[0]!), ours, c.outFmt),
      mode === 'none'
        ? undefined
        : Promise.all([map(ours, c.outFmt), map(theirs, c.outFmt)]).then(([a, b]) => {
            if (mode === 'exact' && c.outFmt === 'qcow2') expect(a).toEqual(b);
            else expect(shape(a)).toEqual(shape(b));
          }),
      c.outFmt === 'qcow2' ? Promise.all([info(ours), info(theirs)]).then(([a, b]) => expect(a).toEqual(b)) : undefined,
    ]);
  });
});

interface ErrorCase {
  name: string;
  args: string[];
  prepare?: () => Promise<void>;
}

const ERRORS: ErrorCase[] = [
  { name: '-c with a raw target', args: ['-c', '-O', 'raw', 'src.raw', 'e1'] },
  { name: '-c with -n onto a raw target', args: ['-c', '-n', 'src.raw', 'src-copy.raw'] },
  { name: '-n with -o', args: ['-n', '-o', 'cluster_size=4k', '-O', 'qcow2', 'src.raw', 'e2'] },
  { name: '-B with a raw target', args: ['-B', 'base.qcow2', '-O', 'raw', 'src.raw', 'e3'] },
  { name: '-B without -F', args: ['-B', 'base.qcow2', '-O', 'qcow2', 'top.qcow2', 'e4'] },
  { name: '-o backing_file without backing_fmt', args: ['-O', 'qcow2', '-o', 'backing_file=base.qcow2', 'top.qcow2', 'e5'] },
  { name: '-B with several sources', args: ['-B', 'base.qcow2', '-F', 'qcow2', '-O', 'qcow2', 'src.raw', 'src.raw', 'e6'] },
  { name: '-B with --target-is-zero', args: ['-n', '--target-is-zero', '-B', 'base.qcow2', '-O', 'qcow2', 'src.raw', 'small.qcow2'] },
  { name: 'unknown -O format', args: ['-O', 'foo', 'src.raw', 'e7'] },
  { name: 'missing source', args: ['-O', 'qcow2', 'nope.raw', 'e8'] },
  { name: 'missing second source', args: ['-O', 'qcow2', 'src.raw', 'nope.qcow2', 'e9'] },
  { name: '-n onto a smaller qcow2 target', args: ['-n', '-O', 'qcow2', 'src.raw', 'small.qcow2'] },
  { name: '-n onto a smaller raw target', args: ['-n', 'src.raw', 'small.raw'] },
  { name: '-n onto a missing target', args: ['-n', '-O', 'qcow2', 'src.raw', 'e10'] },
  { name: '-c with preallocation', args: ['-c', '-O', 'qcow2', '-o', 'preallocation=metadata', 'src.raw', 'e11'] },
  { name: 'bad cluster size', args: ['-O', 'qcow2', '-o', 'cluster_size=3k', 'src.raw', 'e12'] },
  { name: 'unknown -o option', args: ['-O', 'qcow2', '-o', 'foo=1', 'src.raw', 'e13'] },
  { name: 'bad compression_type', args: ['-O', 'qcow2', '-o', 'compression_type=lz', 'src.raw', 'e14'] },
  { name: 'bad -m', args: ['-m', '17', '-O', 'qcow2', 'src.raw', 'e15'] },
  { name: 'bad -S', args: ['-S', '100', '-O', 'qcow2', 'src.raw', 'e16'] },
  { name: '--target-is-zero without -n', args: ['--target-is-zero', '-O', 'qcow2', 'src.raw', 'e17'] },
  { name: 'missing -B file', args: ['-B', 'nope.qcow2', '-F', 'qcow2', '-O', 'qcow2', 'top.qcow2', 'e18'] },
  { name: 'target is the source', args: ['-O', 'qcow2', 'src.qcow2', 'src.qcow2'] },
];

describe('qimg convert errors as qemu-img prints them', () => {
  beforeAll(async () => {
    await qemuImgOk(['create', '-f', 'qcow2', 'small.qcow2', '1M'], dir);
    await qemuImgOk(['create', '-f', 'raw', 'small.raw', '1M'], dir);
    copyFileSync(join(dir, 'src.raw'), join(dir, 'src-copy.raw'));
  });
  it.each(ERRORS.map((c) => [c.name, c] as const))('%s', async (_name, c) => {
    const q = await qemuImg(['convert', ...c.args], dir);
    const r = await qimg(['convert', ...c.args], dir);
    expect({ code: r.code, stdout: r.stdout, stderr: r.stderr }).toEqual({ code: q.code, stdout: q.stdout, stderr: asQimg(q.stderr) });
  });
});

describe('qimg convert --progress=json and SIGINT', () => {
  it('prints JSON progress lines ending at 100% and a done line', async () => {
    const r = await qimg(['convert', '--progress=json', '-O', 'qcow2', 'top.qcow2', 'progress.qcow2'], dir);
    expect(r.code, r.stderr).toBe(0);
    expect(r.stdout).toBe('');
    const events = r.stderr.trim().split('\n').map((l) => JSON.parse(l) as { type: string; done?: number; total?: number; percent?: number });
    expect(events.at(-1)).toEqual({ type: 'done' });
    const progress = events.slice(0, -1);
    expect(progress.length).toBeGreaterThan(0);
    const total = progress[0]!.total!;
    let last = -1;
    for (const e of progress) {
      expect(e.type).toBe('progress');
      expect(e.total).toBe(total);
      expect(e.done!).toBeGreaterThan(last);
      expect(e.percent).toBeCloseTo((100 * e.done!) / total, 1);
      last = e.done!;
    }
    expect(progress.at(-1)).toMatchObject({ done: total, percent: 100 });
    // qemu-img's -p counts the same bytes: 100% is the data of the flattened chain, not the disk.
    expect(total).toBeGreaterThan(0);
    expect(total).toBeLessThan(16 * MiB);
  });

  it('-p prints qemu-img progress lines', async () => {
    const q = await qemuImg(['convert', '-p', '-O', 'qcow2', 'src.raw', 'p-theirs.qcow2'], dir);
    const r = await qimg(['convert', '-p', '-O', 'qcow2', 'src.raw', 'p-ours.qcow2'], dir);
    expect(r.stdout.split('\r').at(-1)).toBe(q.stdout.split('\r').at(-1));
    expect(r.stdout).toMatch(/^ {4}\(0\.00\/100%\)\r/);
  });

  it('stops on SIGINT with the target check-clean and exit status 130', async () => {
    // A copy that cannot finish before the signal: at -r 1k the first 2 MiB request is written at
    // once and the second waits ~34 minutes. The signal goes when the program has started that
    // wait (seen by a timer probe, test/convert/probe.ts), so what the target holds is fixed:
    // exactly the first request (a qcow2 target takes requests in guest order).
    const src = Buffer.alloc(4 * MiB);
    const rnd = prng(7);
    for (let i = 0; i < src.length; i += 4) src.writeUInt32LE((rnd() * 0x100000000) >>> 0, i);
    writeFileSync(join(dir, 'int-src.raw'), src);
    const run = await qimgProbed(['convert', '-r', '1k', '-O', 'qcow2', 'int-src.raw', 'int.qcow2'], dir);
    await run.timer(1_000_000);
    run.signal('SIGINT');
    const exit = await run.exit;
    expect(exit).toEqual({
      code: 130, signal: null, stdout: '',
      stderr: 'qimg: convert interrupted by SIGINT; the target was flushed and closed but is incomplete\n',
    });
    await check('int.qcow2');
    // The request in flight finished; none after it started.
    expect(shape(await map('int.qcow2', 'qcow2'))).toEqual(shape([
      { start: 0, length: 2 * MiB, depth: 0, present: true, zero: false, data: true },
      { start: 2 * MiB, length: 2 * MiB, depth: 0, present: false, zero: true, data: false },
    ]));
    const r = await qemuImg(['convert', '-O', 'raw', 'int.qcow2', 'int.raw'], dir);
    expect(r.code, r.stderr).toBe(0);
    const copied = readFileSync(join(dir, 'int.raw'));
    expect(copied.subarray(0, 2 * MiB).equals(src.subarray(0, 2 * MiB))).toBe(true);
    expect(copied.subarray(2 * MiB).equals(Buffer.alloc(2 * MiB))).toBe(true);
  }, 30_000);
});
