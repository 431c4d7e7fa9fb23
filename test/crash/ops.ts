// The crash writer's operation stream: a pure function of (seed, disk shape), so the test can
// regenerate exactly what the killed child did from the seed and the op numbers it logged.

import { closeSync, openSync, readSync } from 'node:fs';
import { type DiskOp, prng, randInt } from '../helpers/model.js';

export interface CrashDisk {
  virtualSize: number;
  clusterSize: number;
  /**
   * Whether the stream has compressed writes. Each comes right after a discard of its clusters, so
   * that they are unallocated whatever earlier ops and rounds left there (compression never
   * overwrites an allocated cluster); that discard frees them on every image but a v2 one with a
   * backing file, which therefore gets none.
   */
  compressed: boolean;
}

/** Whether a qcow2 image of this version, with or without a backing file, gets compressed writes (see CrashDisk). */
export function compressedWrites(version: number, hasBacking: boolean): boolean {
  return version >= 3 || !hasBacking;
}

/** The shape of the qcow2 image in `file`, from its header (so that the writer and the test agree). */
export function readCrashDisk(file: string): CrashDisk {
  const fd = openSync(file, 'r');
  try {
    const h = Buffer.alloc(32);
    readSync(fd, h, 0, h.length, 0);
    const hasBacking = h.readBigUInt64BE(8) !== 0n;
    return {
      virtualSize: Number(h.readBigUInt64BE(24)),
      clusterSize: 2 ** h.readUInt32BE(20),
      compressed: compressedWrites(h.readUInt32BE(4), hasBacking),
    };
  } finally {
    closeSync(fd);
  }
}

/**
 * Endless ops: mixed-size writes (random, constant and all-zero data), writeZeroes, discards,
 * compressed writes of whole clusters (constant data, which compresses, or random data, which is
 * stored uncompressed), flushes.
 */
export function* crashOps(seed: number, disk: CrashDisk): Generator<DiskOp> {
  const rand = prng(seed);
  const size = disk.virtualSize;
  const cs = disk.clusterSize;
  const clusters = Math.ceil(size / cs);
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
  for (;;) {
    const r = rand();
    if (r >= 0.78 && r < 0.86 && disk.compressed) {
      const first = randInt(rand, 0, clusters - 1);
      const n = Math.min(clusters - first, randInt(rand, 1, Math.max(1, Math.floor(maxLen / cs))));
      const off = first * cs;
      const len = Math.min(n * cs, size - off);
      const fill = rand() < 0.8 ? randInt(rand, 1, 255) : 256 + Math.floor(rand() * 0x7fffff00);
      yield { k: 'discard', off, len };
      yield { k: 'compressed', off, len, fill };
      continue;
    }
    if (r >= 0.86) {
      yield { k: 'flush' };
      continue;
    }
    const off = offset();
    const len = length(off);
    if (r < 0.46) yield { k: 'write', off, len, fill: 256 + Math.floor(rand() * 0x7fffff00) };
    else if (r < 0.52) yield { k: 'write', off, len, fill: 0 };
    else if (r < 0.58) yield { k: 'write', off, len, fill: randInt(rand, 1, 255) };
    else if (r < 0.68) yield { k: 'zero', off, len, unmap: rand() < 0.5 };
    else yield { k: 'discard', off, len };
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
