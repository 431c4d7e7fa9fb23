// The `qimg` executable as the package ships it: dist/cli.cjs running the CommonJS CLI bundle
// through the V8 code cache that scripts/code-cache.mjs makes (src/cli/launch.ts). Built here the
// way tsup builds it; every output is compared with qemu-img's.

import { LOCKING_UNAVAILABLE_NOTICE } from '../../src/cli/common.js';
import { execFile } from 'node:child_process';
import { mkdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { build } from 'esbuild';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { ROOT } from '../helpers/bundle.js';
import { tmpDir } from '../helpers/qemu.js';

interface Run {
  code: number;
  stdout: string;
  stderr: string;
}

function run(cmd: string, args: string[], cwd: string, env: NodeJS.ProcessEnv = {}): Promise<Run> {
  return new Promise((resolve) => {
    execFile(cmd, args, { cwd, encoding: 'utf8', env: { ...process.env, LC_ALL: 'C', ...env } }, (err, stdout, stderr) => {
      const code = err ? (typeof err.code === 'number' ? err.code : 1) : 0;
      resolve({ code, stdout, stderr });
    });
  });
}

const MARK = '\n//# qimg-build-id=';

describe('dist/cli.cjs with its code cache', () => {
  // Under node_modules/.cache so that the bundles' package imports (koffi, zstd-wasm) resolve.
  const dist = join(ROOT, 'node_modules', '.cache', `qimg-launch-${process.pid}`);
  const cli = join(dist, 'cli.cjs');
  const bundle = join(dist, 'cli-main.cjs');
  const cache = join(dist, 'cli-main.cache');
  const dir = tmpDir();
  let pristine: string;

  beforeAll(async () => {
    mkdirSync(dist, { recursive: true });
    const common = { bundle: true, platform: 'node', target: 'node20', packages: 'external', logLevel: 'error', outdir: dist } as const;
    await build({ ...common, entryPoints: { 'cli-main': join(ROOT, 'src/cli/bin.ts') }, format: 'cjs', outExtension: { '.js': '.cjs' } });
    await build({ ...common, entryPoints: { cli: join(ROOT, 'src/cli/cli.ts') }, format: 'cjs', outExtension: { '.js': '.cjs' } });
    await build({ ...common, entryPoints: { 'zstd-worker': join(ROOT, 'src/qcow2/zstd-worker.ts') }, format: 'esm' });
    const made = await run(process.execPath, [join(ROOT, 'scripts/code-cache.mjs'), dist], ROOT);
    expect(made.stderr).toBe('');
    expect(made.code).toBe(0);
    pristine = readFileSync(bundle, 'utf8');
    const q = await run('qemu-img', ['create', '-q', '-f', 'qcow2', 'a.qcow2', '64M'], dir);
    expect(q.code).toBe(0);
    const io = await run('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x5a 1M 3M', '-c', 'write -z 8M 1M', 'a.qcow2'], dir);
    expect(io.code).toBe(0);
  }, 60_000);

  afterAll(() => {
    rmSync(dist, { recursive: true, force: true });
  });

  async function infoMatchesQemu(expectCache: string): Promise<void> {
    const ours = await run(process.execPath, [cli, 'info', '--output=json', 'a.qcow2'], dir, { QIMG_CODE_CACHE_DEBUG: '1' });
    const ref = await run('qemu-img', ['info', '--output=json', 'a.qcow2'], dir);
    expect(ours.code).toBe(0);
    expect(ours.stderr).toBe(`qimg: code cache ${expectCache}\n`);
    expect(ours.stdout).toBe(ref.stdout);
  }

  it('the build ends the bundle with a build id and starts the cache with the same one', () => {
    const at = pristine.lastIndexOf(MARK);
    expect(at).toBeGreaterThan(0);
    const id = pristine.slice(at + MARK.length).trim();
    expect(id).toMatch(/^[0-9a-f]{32}$/);
    expect(readFileSync(cache).subarray(0, MARK.length + id.length + 1).toString('latin1')).toBe(`${MARK}${id}\n`);
  });

  it('a command runs from the cache and prints what qemu-img prints', async () => {
    await infoMatchesQemu('used');
  });

  it('a cache made for another build is not used (V8 would only check the length)', async () => {
    const other = pristine.replace(/qimg-build-id=([0-9a-f])/, (_, c: string) => `qimg-build-id=${c === '0' ? '1' : '0'}`);
    expect(other.length).toBe(pristine.length);
    writeFileSync(bundle, other);
    try {
      await infoMatchesQemu('absent');
    } finally {
      writeFileSync(bundle, pristine);
    }
  });

  it('a bundle without a build id runs the plain way', async () => {
    writeFileSync(bundle, pristine.slice(0, pristine.lastIndexOf(MARK)) + '\n');
    try {
      const ours = await run(process.execPath, [cli, 'info', 'a.qcow2'], dir, { QIMG_CODE_CACHE_DEBUG: '1' });
      const ref = await run('qemu-img', ['info', 'a.qcow2'], dir);
      expect(ours.stderr).toBe('');
      expect(ours.stdout).toBe(ref.stdout);
    } finally {
      writeFileSync(bundle, pristine);
    }
  });

  it('convert -c zstd and back through WebAssembly zstd (loaded by require inside the cached bundle)', async () => {
    // QIMG_NO_NATIVE=1: no libzstd, so the bundle must load the WebAssembly build itself.
    const env = { QIMG_NO_NATIVE: '1', QIMG_CODE_CACHE_DEBUG: '1' };
    const c = await run(process.execPath, [cli, 'convert', '-c', '-o', 'compression_type=zstd', '-O', 'qcow2', 'a.qcow2', 'z.qcow2'], dir, env);
    expect({ code: c.code, stderr: c.stderr }).toEqual({ code: 0, stderr: 'qimg: code cache used\n' + LOCKING_UNAVAILABLE_NOTICE });
    // QEMU judges what was written: a clean zstd image with compressed clusters, guest bytes equal to the source's.
    const check = await run('qemu-img', ['check', '--output=json', 'z.qcow2'], dir);
    const report = JSON.parse(check.stdout) as Record<string, unknown>;
    expect({ code: check.code, leaks: report.leaks ?? 0, corruptions: report.corruptions ?? 0, errors: report['check-errors'] ?? 0 })
      .toEqual({ code: 0, leaks: 0, corruptions: 0, errors: 0 });
    const info = JSON.parse((await run('qemu-img', ['info', '--output=json', 'z.qcow2'], dir)).stdout) as { 'format-specific': { data: Record<string, unknown> } };
    expect(info['format-specific'].data['compression-type']).toBe('zstd');
    const map = JSON.parse((await run('qemu-img', ['map', '--output=json', 'z.qcow2'], dir)).stdout) as { start: number; length: number; data: boolean; offset?: number }[];
    // The 3 MiB of 0x5a at 1 MiB, all in compressed clusters (qemu-img 7.2 maps those without an offset).
    expect(map.filter((e) => e.data && e.offset === undefined).reduce((n, e) => n + e.length, 0)).toBe(3 << 20);
    expect((await run('qemu-img', ['compare', '-f', 'qcow2', '-F', 'qcow2', 'a.qcow2', 'z.qcow2'], dir)).stdout).toBe('Images are identical.\n');
    // And back: qimg decompresses with the WebAssembly build; QEMU compares the raw result with the source.
    const back = await run(process.execPath, [cli, 'convert', '-O', 'raw', 'z.qcow2', 'z.raw'], dir, env);
    expect({ code: back.code, stderr: back.stderr }).toEqual({ code: 0, stderr: 'qimg: code cache used\n' + LOCKING_UNAVAILABLE_NOTICE });
    expect((await run('qemu-img', ['compare', '-f', 'qcow2', '-F', 'raw', 'a.qcow2', 'z.raw'], dir)).stdout).toBe('Images are identical.\n');
  }, 30_000);
});
