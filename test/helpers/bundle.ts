// Bundles a TypeScript entry point (with the zstd worker beside it, as tsup lays out dist/) for a
// test to run as a child process. The bundle lives under node_modules/.cache so that its package
// imports resolve; one directory per test process, removed after the file's tests.

import { mkdirSync, rmSync } from 'node:fs';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { build } from 'esbuild';
import { afterAll } from 'vitest';

export const ROOT = fileURLToPath(new URL('../..', import.meta.url));

/** Bundles `entry` (a path from the repository root) as `<name>.js`; returns that file's path. Call at file scope or in a hook. */
export async function bundleForTest(name: string, entry: string, tag: string): Promise<string> {
  const outdir = join(ROOT, 'node_modules', '.cache', `qimg-${tag}-${process.pid}`);
  mkdirSync(outdir, { recursive: true });
  afterAll(() => rmSync(outdir, { recursive: true, force: true }));
  await build({
    entryPoints: { [name]: join(ROOT, entry), 'zstd-worker': join(ROOT, 'src/qcow2/zstd-worker.ts') },
    outdir,
    bundle: true,
    format: 'esm',
    platform: 'node',
    target: 'node20',
    packages: 'external',
    logLevel: 'error',
  });
  return join(outdir, `${name}.js`);
}
