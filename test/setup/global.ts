// Vitest global setup: bundles the programs that tests run as child processes once for the whole
// run (the qimg CLI, its test server and the crash test's writer, each with the zstd worker beside it, as tsup lays
// out dist/), and removes them when the run ends. Test files get the paths with
// `inject('bundles')`. The folder is under node_modules/.cache so that the bundles' package imports
// (koffi, @bokuweb/zstd-wasm) resolve from this repository's node_modules.

import { mkdtempSync, mkdirSync, rmSync } from 'node:fs';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { build } from 'esbuild';
import type { TestProject } from 'vitest/node';

const ROOT = fileURLToPath(new URL('../..', import.meta.url));

export interface Bundles {
  /** The qimg command line (src/cli/bin.ts). */
  cli: string;
  /** A long-lived qimg CLI that runs command lines sent to it (test/setup/cli-server.ts). */
  cliServer: string;
  /** The crash test's child writer (test/crash/writer.ts). */
  crashWriter: string;
  /** The folder holding them (zstd-worker.js beside them). */
  dir: string;
}

declare module 'vitest' {
  export interface ProvidedContext {
    bundles: Bundles;
  }
}

export default async function setup(project: TestProject): Promise<() => void> {
  const cache = join(ROOT, 'node_modules', '.cache');
  mkdirSync(cache, { recursive: true });
  const dir = mkdtempSync(join(cache, 'qimg-test-'));
  const teardown = (): void => rmSync(dir, { recursive: true, force: true });
  try {
    await build({
      entryPoints: {
        cli: join(ROOT, 'src/cli/bin.ts'),
        'cli-server': join(ROOT, 'test/setup/cli-server.ts'),
        'crash-writer': join(ROOT, 'test/crash/writer.ts'),
        'zstd-worker': join(ROOT, 'src/qcow2/zstd-worker.ts'),
      },
      outdir: dir,
      bundle: true,
      format: 'esm',
      platform: 'node',
      target: 'node20',
      packages: 'external',
      logLevel: 'error',
    });
  } catch (e) {
    teardown();
    throw e;
  }
  project.provide('bundles', { cli: join(dir, 'cli.js'), cliServer: join(dir, 'cli-server.js'), crashWriter: join(dir, 'crash-writer.js'), dir });
  return teardown;
}
