// Copy-on-write planning for one cluster of a write: which bytes of the (new or reused) host
// cluster get written, and the extended-L2 bitmap after it (QEMU's perform_cow regions at
// subcluster granularity).

import { standardHostOffset, type L2Geometry } from './l2-entry.js';
import { COMPRESSED_HI, COPIED_HI } from './layout.js';


/** QEMU's QCow2ClusterType (the cluster-level classification; extended L2 has no cluster-level zero types). */
export const enum ClusterKind {
  Unallocated,
  ZeroPlain,
  ZeroAlloc,
  Normal,
  Compressed,
}

export function clusterKind(g: L2Geometry, hi: number, lo: number): ClusterKind {
  if (hi & COMPRESSED_HI) return ClusterKind.Compressed;
  const hasOffset = standardHostOffset(hi, lo) !== 0 || (g.hasDataFile && (hi & COPIED_HI) !== 0);
  if (!g.extendedL2 && (lo & 1)) return hasOffset ? ClusterKind.ZeroAlloc : ClusterKind.ZeroPlain;
  return hasOffset ? ClusterKind.Normal : ClusterKind.Unallocated;
}

/** One cluster of a write. [a, b) is the written part, [ws, we) what goes to the host cluster. */
export interface ClusterPlan {
  cluster: number;
  /** Index in its L2 table. */
  idx: number;
  a: number;
  b: number;
  kind: ClusterKind;
  entry: { hi: number; lo: number; bHi: number; bLo: number };
  /** The old host cluster is reused (COPIED, or an external data file). */
  inPlace: boolean;
  host: number;
  ws: number;
  we: number;
  /** New extended-L2 bitmap: zero bits, allocation bits. */
  bHi: number;
  bLo: number;
}

function mask(s0: number, s1: number): number {
  if (s1 - s0 >= 32) return 0xffffffff;
  return (((1 << (s1 - s0)) - 1) << s0) >>> 0;
}

/** Fills ws/we/bHi/bLo of a plan. `vEnd` is where the virtual disk ends inside this cluster. */
export function cowSpan(p: ClusterPlan, g: L2Geometry, sc: number, vEnd: number): void {
  const cs = g.clusterSize;
  const full = g.hasDataFile ? Math.min(cs, Math.ceil(vEnd / 512) * 512) : cs;
  if (!g.extendedL2) {
    p.bHi = 0;
    p.bLo = 0;
    if (p.inPlace && p.kind === ClusterKind.Normal) {
      p.ws = p.a;
      p.we = p.b;
    } else {
      // A new cluster (or a preallocated zero cluster) gets all of it: the write plus what the guest read before.
      p.ws = 0;
      p.we = Math.max(full, p.b);
    }
    return;
  }
  const sa = Math.floor(p.a / sc);
  const sb = Math.ceil(p.b / sc);
  const touched = mask(sa, sb);
  const oldZero = p.entry.bHi >>> 0;
  const oldAlloc = p.entry.bLo >>> 0;
  if (p.kind === ClusterKind.Compressed) {
    p.ws = 0;
    p.we = cs;
    p.bHi = 0;
    p.bLo = 0xffffffff;
    return;
  }
  let alloc = touched;
  if (p.inPlace || p.kind === ClusterKind.Normal) alloc = (oldAlloc | touched) >>> 0;
  p.bLo = alloc;
  p.bHi = (oldZero & ~alloc) >>> 0;
  if (p.inPlace) {
    // Partial subclusters already holding data need no copy: the write lands among those bytes.
    p.ws = (oldAlloc >>> sa) & 1 ? p.a : sa * sc;
    p.we = (oldAlloc >>> (sb - 1)) & 1 ? p.b : Math.min(sb * sc, cs);
    return;
  }
  // A new cluster: the written subclusters, plus (when the old cluster was shared) its data subclusters.
  const all = alloc;
  const lo = Math.min(sa, 31 - Math.clz32(all & -all));
  const hi = Math.max(sb, 32 - Math.clz32(all));
  p.ws = lo * sc;
  p.we = Math.min(hi * sc, cs);
}
