import { defineConfig } from 'tsup';

export default defineConfig([
  {
    entry: { index: 'src/index.ts' },
    format: ['esm', 'cjs'],
    dts: true,
    sourcemap: true,
    clean: true,
    target: 'node20',
    platform: 'node',
  },
  {
    // The CLI: one CommonJS bundle (cli-main.cjs) that the `qimg` executable (cli.cjs, launch.ts)
    // runs through V8's code cache, made by scripts/code-cache.mjs after this build.
    entry: { 'cli-main': 'src/cli/bin.ts' },
    format: ['cjs'],
    sourcemap: true,
    target: 'node20',
    platform: 'node',
  },
  {
    entry: { cli: 'src/cli/cli.ts' },
    format: ['cjs'],
    target: 'node20',
    platform: 'node',
    banner: { js: '#!/usr/bin/env node' },
  },
  {
    // Worker threads' script, found next to the module that starts them (index.js, index.cjs, cli-main.cjs).
    entry: { 'zstd-worker': 'src/qcow2/zstd-worker.ts' },
    format: ['esm'],
    sourcemap: true,
    target: 'node20',
    platform: 'node',
  },
]);
