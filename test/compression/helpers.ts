// Test helpers: deterministic cluster data, external tools, and compressed-cluster
// extraction from qcow2 files (header -> L1 -> L2, per docs/interop/qcow2.txt).

import { spawnSync } from 'node:child_process';
import { readFileSync } from 'node:fs';

export const CLUSTER = 65536;

/** xorshift32, so the data is the same on every run. */
function rng(seed: number): () => number {
  let x = seed >>> 0 || 1;
  return () => {
    x ^= x << 13;
    x >>>= 0;
    x ^= x >>> 17;
    x ^= x << 5;
    x >>>= 0;
    return x;
  };
}

const WORDS = 'disk image cluster qcow2 refcount table header snapshot backing file sector offset the of and to a in is it'.split(' ');

export type DataKind = 'pattern' | 'text' | 'mixed' | 'random';

export function makeData(kind: DataKind, length = CLUSTER, seed = 1): Uint8Array {
  const out = new Uint8Array(length);
  const r = rng(seed);
  if (kind === 'pattern') out.fill(0x5a);
  else if (kind === 'random') for (let i = 0; i < length; i++) out[i] = r() & 0xff;
  else if (kind === 'text') {
    let s = '';
    while (s.length < length) s += WORDS[r() % WORDS.length] + (r() % 13 === 0 ? '.\n' : ' ');
    out.set(new TextEncoder().encode(s.slice(0, length)));
  } else {
    // Binary-like: records with small integers and repeated fields, some noise.
    for (let i = 0; i < length; i += 16) {
      const v = r();
      out[i] = v & 0x0f;
      out[i + 4] = (i >> 4) & 0xff;
      out[i + 8] = (v >>> 8) & 0xff;
      if (v % 5 === 0) for (let j = 9; j < 16 && i + j < length; j++) out[i + j] = r() & 0xff;
    }
  }
  return out;
}

export function hasTool(name: string): boolean {
  return spawnSync(name, ['--version'], { stdio: 'ignore' }).status === 0;
}

export function run(cmd: string, args: string[], input?: Uint8Array): Buffer {
  const res = spawnSync(cmd, args, { input, maxBuffer: 64 << 20 });
  if (res.status !== 0) throw new Error(`${cmd} ${args.join(' ')} failed: ${res.stderr?.toString()}`);
  return res.stdout;
}

export interface CompressedCluster {
  guestOffset: number;
  hostOffset: number;
  /** The stored bytes: whole sectors, so the stream plus whatever follows it. */
  bytes: Uint8Array;
}

/** Every compressed cluster in a qcow2 file, with its compression_type. */
export function compressedClusters(file: string): { compressionType: number; clusterSize: number; clusters: CompressedCluster[] } {
  const f = readFileSync(file);
  const clusterBits = f.readUInt32BE(20);
  const clusterSize = 2 ** clusterBits;
  const l1Size = f.readUInt32BE(36);
  const l1Offset = Number(f.readBigUInt64BE(40));
  const version = f.readUInt32BE(4);
  const headerLength = version >= 3 ? f.readUInt32BE(100) : 72;
  const compressionType = headerLength > 104 ? f[104]! : 0;
  const x = 62 - (clusterBits - 8);
  const clusters: CompressedCluster[] = [];
  for (let i = 0; i < l1Size; i++) {
    const l2Offset = Number(f.readBigUInt64BE(l1Offset + 8 * i) & 0x00fffffffffffe00n);
    if (!l2Offset) continue;
    for (let j = 0; j < clusterSize / 8; j++) {
      const entry = f.readBigUInt64BE(l2Offset + 8 * j);
      if (!((entry >> 62n) & 1n)) continue;
      const hostOffset = Number(entry & ((1n << BigInt(x)) - 1n));
      const sectors = Number((entry >> BigInt(x)) & ((1n << BigInt(clusterBits - 8)) - 1n)) + 1;
      const size = sectors * 512 - (hostOffset & 511);
      // The last cluster's sectors may run past the end of the file: pad as a reader would see zeros.
      const bytes = new Uint8Array(size);
      bytes.set(f.subarray(hostOffset, Math.min(hostOffset + size, f.length)));
      clusters.push({ guestOffset: (i * (clusterSize / 8) + j) * clusterSize, hostOffset, bytes });
    }
  }
  return { compressionType, clusterSize, clusters };
}
