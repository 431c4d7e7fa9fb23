// The programs tests run as child processes, bundled once per test run by test/setup/global.ts
// (removed when the run ends), and the repository root.

import { fileURLToPath } from 'node:url';
import { inject } from 'vitest';
import type { Bundles } from '../setup/global.js';

export const ROOT = fileURLToPath(new URL('../..', import.meta.url));

/** Paths of the bundled qimg CLI and crash writer. */
export function bundles(): Bundles {
  const b = inject('bundles');
  if (!b) throw new Error('test/setup/global.ts did not run (vitest.config.ts globalSetup)');
  return b;
}
