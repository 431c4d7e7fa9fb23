import { availableParallelism } from 'node:os';
import { defineConfig } from 'vitest/config';

export default defineConfig({
  test: {
    include: ['test/**/*.test.ts'],
    globalSetup: ['test/setup/global.ts'],
    testTimeout: 60_000,
    hookTimeout: 120_000,
    pool: 'forks',
    // Most tests wait on qemu-img and qimg subprocesses: one file per core, at least two (vitest's
    // default leaves one core idle, one file at a time on 2 cores: 6 min instead of 3.5). More
    // files than cores was slower (4 min 45 s with 3 on 2 cores).
    maxWorkers: Math.max(2, availableParallelism()),
    minWorkers: 1,
  },
});
