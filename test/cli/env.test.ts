// The environment variables the README documents, through the CLI: QIMG_ZSTD_THREADS=n (zstd
// workers), QIMG_ZSTD_INLINE=0 (the main thread stays out of compression), QIMG_NO_NATIVE=1 (native
// paths off). Each run's output is judged by qemu-img (compare with the source, check, map), and
// each setting's effect is observed without timing:
// - worker threads started: Node's own debug channel (NODE_DEBUG=worker prints one line per Worker
//   the main thread creates);
// - what the main thread does with koffi: a --require probe (via NODE_OPTIONS) that wraps koffi in
//   the main thread only, and reports at exit whether koffi was loaded at all and how many
//   ZSTD_compressCCtx calls the main thread made itself (sync) or handed to the libuv pool (async);
// - QIMG_NO_NATIVE=1 on a raw file: extents from the zero scan instead of SEEK_DATA, so written
//   zeros map as zero where qemu-img (and native qimg) map them as data.

import { LOCKING_UNAVAILABLE_NOTICE } from '../../src/cli/common.js';
import { closeSync, openSync, writeFileSync, writeSync } from 'node:fs';
import { join } from 'node:path';
import { beforeAll, describe, expect, it } from 'vitest';
import { loadNative } from '../../src/io/native.js';
import { availableParallelism } from '../../src/qcow2/zstd-pool.js';
import { loadZstdNative, loadZstdNativeCompressor } from '../../src/qcow2/zstd-native.js';
import { qemuImg, qemuImgOk, qimg } from './harness.js';
import { MiB, prng, tmpDir } from '../helpers/qemu.js';

const dir = tmpDir('qimg-env-');
const PROBE = join(dir, 'probe.cjs');

// Loaded with --require into the CLI's process (worker threads inherit it and skip it).
const PROBE_SOURCE = `
const { isMainThread } = require('node:worker_threads');
if (isMainThread) {
  const Module = require('node:module');
  const load = Module._load;
  const seen = new WeakSet();
  const stats = { koffi: false, sync: 0, async: 0 };
  const counting = (f) => {
    const w = (...a) => { stats.sync++; return f(...a); };
    w.async = (...a) => { stats.async++; return f.async(...a); };
    return w;
  };
  Module._load = function (request, ...rest) {
    const m = load.call(this, request, ...rest);
    if (request === 'koffi' && !seen.has(m)) {
      seen.add(m);
      stats.koffi = true;
      const open = m.load;
      // koffi's library objects ignore assignments: wrap them in a proxy.
      m.load = function (...a) {
        const lib = open.apply(this, a);
        return new Proxy(lib, {
          get(t, p) {
            const v = Reflect.get(t, p, t);
            if (p === 'func') return (...d) => (String(d[0]).includes('ZSTD_compressCCtx') ? counting(v.apply(t, d)) : v.apply(t, d));
            return typeof v === 'function' ? v.bind(t) : v;
          },
        });
      };
    }
    return m;
  };
  process.on('exit', () => process.stderr.write('probe: ' + JSON.stringify(stats) + '\\n'));
}
`;

/** What this machine's qimg compresses with (the child sees the same koffi, libzstd and QIMG_NO_NATIVE). */
const nativeZstd = loadZstdNative() !== null;
const inlineZstd = loadZstdNativeCompressor() !== null;
const nativeFiles = loadNative() !== null;
const cores = availableParallelism();

interface Observed {
  workers: number;
  koffi: boolean;
  /** ZSTD_compressCCtx calls made by the main thread itself. */
  mainSync: number;
  /** ZSTD_compressCCtx calls the main thread put on the libuv pool. */
  mainAsync: number;
  stdout: string;
}

async function observed(args: string[], env: NodeJS.ProcessEnv): Promise<Observed> {
  // The settings under test are always given: an empty value is the default, whatever the environment running the tests says.
  const r = await qimg(args, dir, {
    QIMG_ZSTD_THREADS: '', QIMG_ZSTD_INLINE: '', ...env, NODE_DEBUG: 'worker', NODE_OPTIONS: `--require ${JSON.stringify(PROBE)}`,
  });
  expect(r.code, r.stderr).toBe(0);
  // Without native helpers qimg says once that it cannot lock images; nothing else may be said.
  expect(r.stderr.replace(LOCKING_UNAVAILABLE_NOTICE, '')).not.toMatch(/^qimg:/m);
  const probe = /^probe: (.*)$/m.exec(r.stderr);
  expect(probe, r.stderr).not.toBeNull();
  const stats = JSON.parse(probe![1]!) as { koffi: boolean; sync: number; async: number };
  const workers = r.stderr.split('\n').filter((l) => /^WORKER \d+: \[0\] created Worker with ID \d+$/.test(l)).length;
  return { workers, koffi: stats.koffi, mainSync: stats.sync, mainAsync: stats.async, stdout: r.stdout };
}

/**
 * The pool starts workers as the first request's clusters queue (8: 512 KiB of 64 KiB clusters)
 * and more only while all are busy: up to 8, the count is exact; beyond (a machine with more than
 * 9 cores, by default), how many more start depends on timing, so only the bounds are.
 */
function expectWorkers(seen: Observed, expected: number): void {
  if (expected <= 8) expect(seen.workers).toBe(expected);
  else {
    expect(seen.workers).toBeGreaterThanOrEqual(8);
    expect(seen.workers).toBeLessThanOrEqual(expected);
  }
}

let outN = 0;
/** `qimg convert -c` with zstd of src.raw under env; QEMU must find the target clean, compressed and equal to the source. */
async function zstdConvert(env: NodeJS.ProcessEnv): Promise<Observed> {
  const out = `z${outN++}.qcow2`;
  const seen = await observed(['convert', '-c', '-o', 'compression_type=zstd', '-O', 'qcow2', 'src.raw', out], env);
  const [cmp, check, info, map] = await Promise.all([
    qemuImg(['compare', '-f', 'raw', '-F', 'qcow2', 'src.raw', out], dir),
    qemuImg(['check', out], dir),
    qemuImgOk(['info', '--output=json', out], dir),
    qemuImgOk(['map', '--output=json', out], dir),
  ]);
  expect(cmp.stdout + cmp.stderr).toBe('Images are identical.\n');
  expect(check.code, check.stdout).toBe(0);
  expect((JSON.parse(info.stdout) as { 'format-specific': { data: { 'compression-type': string } } })['format-specific'].data['compression-type']).toBe('zstd');
  // qemu-img 7.2 maps compressed clusters as data without a host offset: all the data is (4 MiB + 64 KiB).
  const compressed = (JSON.parse(map.stdout) as { length: number; data: boolean; offset?: number }[])
    .filter((e) => e.data && e.offset === undefined)
    .reduce((n, e) => n + e.length, 0);
  expect(compressed).toBe(4 * MiB + 64 * 1024);
  return seen;
}

beforeAll(() => {
  writeFileSync(PROBE, PROBE_SOURCE);
  // src.raw: 4 MiB of compressible data (64 clusters, several convert requests), then 1 MiB of
  // written zeros (allocated: data to SEEK_DATA, zero to a zero scan), a 1 MiB hole, and 64 KiB of data.
  const rnd = prng(11);
  const alphabet = Buffer.from('ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/');
  const data = Buffer.alloc(4 * MiB);
  for (let i = 0; i < data.length; i++) data[i] = alphabet[(rnd() * 64) | 0]!;
  const fd = openSync(join(dir, 'src.raw'), 'w');
  try {
    writeSync(fd, data, 0, data.length, 0);
    writeSync(fd, Buffer.alloc(MiB), 0, MiB, 4 * MiB);
    writeSync(fd, data, 0, 64 * 1024, 6 * MiB);
  } finally {
    closeSync(fd);
  }
});

describe('QIMG_ZSTD_THREADS', () => {
  it.each([
    ['1', 1, {}],
    ['3 (more than this machine may have cores)', 3, {}],
    ['0 (none)', 0, {}],
    ['2 with the WebAssembly build (QIMG_NO_NATIVE=1)', 2, { QIMG_NO_NATIVE: '1' }],
  ] as const)('QIMG_ZSTD_THREADS=%s starts that many zstd workers', async (_label, n, extra) => {
    const seen = await zstdConvert({ QIMG_ZSTD_THREADS: String(n), ...extra });
    expect(seen.workers).toBe(n);
  });

  it('unset: one worker per core but one with libzstd (the main thread helps), none with WebAssembly', async () => {
    const [native, wasm] = await Promise.all([zstdConvert({}), zstdConvert({ QIMG_NO_NATIVE: '1' })]);
    expectWorkers(native, !nativeZstd ? 0 : inlineZstd ? Math.max(1, cores - 1) : cores);
    expect(wasm.workers).toBe(0);
  });
});

describe.runIf(nativeZstd && inlineZstd)('QIMG_ZSTD_INLINE=0 (libzstd)', () => {
  it('the main thread compresses nothing itself (it does by default, while the workers are busy)', async () => {
    const [off, on] = await Promise.all([
      zstdConvert({ QIMG_ZSTD_THREADS: '1', QIMG_ZSTD_INLINE: '0' }),
      zstdConvert({ QIMG_ZSTD_THREADS: '1' }),
    ]);
    expect({ workers: off.workers, sync: off.mainSync, async: off.mainAsync }).toEqual({ workers: 1, sync: 0, async: 0 });
    // The control: the probe does see the main thread's compressions (the first clusters queue
    // while the one worker is still starting, and the main thread takes some: here most).
    expect(on.workers).toBe(1);
    expect(on.mainSync).toBeGreaterThan(0);
  });

  it('unset QIMG_ZSTD_THREADS: the worker the main thread stood in for is started', async () => {
    const seen = await zstdConvert({ QIMG_ZSTD_INLINE: '0' });
    expect(seen.mainSync).toBe(0);
    expectWorkers(seen, cores);
  });
});

describe('QIMG_NO_NATIVE=1', () => {
  type Run = { start: number; length: number; data: boolean; zero: boolean };
  const map = async (env: NodeJS.ProcessEnv): Promise<{ seen: Observed; runs: Run[] }> => {
    const seen = await observed(['map', '--output=json', '-f', 'raw', 'src.raw'], env);
    return { seen, runs: JSON.parse(seen.stdout) as Run[] };
  };
  const at = (runs: Run[], off: number): Run | undefined => runs.find((e) => e.start <= off && off < e.start + e.length);

  it('koffi is never loaded; a raw file\'s written zeros map as zero (zero scan), its data as data', async () => {
    const { seen, runs } = await map({ QIMG_NO_NATIVE: '1' });
    expect(seen.koffi).toBe(false);
    expect([0, 4 * MiB, 5 * MiB, 6 * MiB].map((o) => at(runs, o)).map((e) => e && { data: e.data, zero: e.zero })).toEqual([
      { data: true, zero: false }, { data: false, zero: true }, { data: false, zero: true }, { data: true, zero: false },
    ]);
    const zstd = await zstdConvert({ QIMG_NO_NATIVE: '1' });
    expect(zstd.koffi).toBe(false);
  });

  it.runIf(nativeFiles)('the control: natively, the written zeros are data (SEEK_DATA), as qemu-img maps them', async () => {
    const { seen, runs } = await map({ QIMG_NO_NATIVE: '' });
    expect(seen.koffi).toBe(true);
    expect(at(runs, 4 * MiB)).toMatchObject({ data: true, zero: false });
    const ref = await qemuImgOk(['map', '--output=json', '-f', 'raw', 'src.raw'], dir);
    expect(seen.stdout).toBe(ref.stdout);
  });

  it('convert gives the same target either way (qemu-img compare, map and check)', async () => {
    const [a, b, q] = await Promise.all([
      qimg(['convert', '-O', 'qcow2', 'src.raw', 'nn.qcow2'], dir, { QIMG_NO_NATIVE: '1' }),
      qimg(['convert', '-O', 'qcow2', 'src.raw', 'n.qcow2'], dir, { QIMG_NO_NATIVE: '' }),
      qemuImg(['convert', '-O', 'qcow2', 'src.raw', 'q.qcow2'], dir),
    ]);
    expect([a.code, b.code, q.code]).toEqual([0, 0, 0]);
    const maps = await Promise.all(['nn.qcow2', 'n.qcow2', 'q.qcow2'].map((f) => qemuImgOk(['map', '--output=json', f], dir)));
    expect(maps[0]!.stdout).toBe(maps[2]!.stdout);
    expect(maps[1]!.stdout).toBe(maps[2]!.stdout);
    for (const f of ['nn.qcow2', 'n.qcow2']) {
      expect((await qemuImg(['compare', '-f', 'raw', '-F', 'qcow2', 'src.raw', f], dir)).stdout).toBe('Images are identical.\n');
      expect((await qemuImg(['check', f], dir)).code).toBe(0);
    }
  });
});
