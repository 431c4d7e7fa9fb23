// The crash writer's operation stream: a pure function of (seed, disk shape), so the test can
// regenerate exactly what the killed child did from the seed and the op numbers it logged.

import { type DiskOp, prng, randInt } from '../helpers/model.js';

export interface CrashDisk {
  virtualSize: number;
  clusterSize: number;
}

/** Endless ops: mixed-size writes (random, constant and all-zero data), writeZeroes, discards, flushes. */
export function* crashOps(seed: number, disk: CrashDisk): Generator<DiskOp> {
  const rand = prng(seed);
  const size = disk.virtualSize;
  const cs = disk.clusterSize;
  const maxLen = Math.min(4 * cs, 4 * 1024 * 1024);
  const offset = (): number => {
    const r = rand();
    // Cluster-aligned, one byte either side of a cluster boundary, or anywhere.
    if (r < 0.35) return randInt(rand, 0, Math.floor((size - 1) / cs)) * cs;
    if (r < 0.5) return Math.max(0, Math.min(size - 1, randInt(rand, 1, Math.floor((size - 1) / cs)) * cs + (rand() < 0.5 ? -1 : 1)));
    return randInt(rand, 0, size - 1);
  };
  const length = (off: number): number => {
    const r = rand();
    let len: number;
    if (r < 0.45) len = randInt(rand, 1, 4096);
    else if (r < 0.8) len = randInt(rand, 1, maxLen);
    else len = randInt(rand, 1, Math.max(1, Math.floor(maxLen / cs))) * cs;
    return Math.min(len, size - off);
  };
  for (let k = 0; ; k++) {
    const r = rand();
    const off = offset();
    const len = length(off);
    if (r < 0.5) yield { k: 'write', off, len, fill: 256 + Math.floor(rand() * 0x7fffff00) };
    else if (r < 0.56) yield { k: 'write', off, len, fill: 0 };
    else if (r < 0.62) yield { k: 'write', off, len, fill: randInt(rand, 1, 255) };
    else if (r < 0.72) yield { k: 'zero', off, len, unmap: rand() < 0.5 };
    else if (r < 0.84) yield { k: 'discard', off, len };
    else yield { k: 'flush' };
  }
}

/** The first n ops of the stream. */
export function firstOps(seed: number, disk: CrashDisk, n: number): DiskOp[] {
  const out: DiskOp[] = [];
  if (n <= 0) return out;
  for (const op of crashOps(seed, disk)) {
    out.push(op);
    if (out.length >= n) break;
  }
  return out;
}
