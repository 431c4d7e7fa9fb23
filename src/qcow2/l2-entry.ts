// L2 entries: classification into QEMU's subcluster types and decoding of descriptors, as pure functions.

import { COMPRESSED_HI, COPIED_HI, TWO_POW_32 } from './layout.js';

/** QEMU's QCow2SubclusterType. */
export const enum SubclusterType {
  UnallocatedPlain = 0,
  UnallocatedAlloc = 1,
  ZeroPlain = 2,
  ZeroAlloc = 3,
  Normal = 4,
  Compressed = 5,
  Invalid = 6,
}

/** Geometry needed to decode entries, fixed when the image is opened. */
export interface L2Geometry {
  clusterBits: number;
  clusterSize: number;
  extendedL2: boolean;
  /** Bytes per L2 entry: 8, or 16 with extended L2. */
  entryBytes: number;
  /** Entries per L2 table. */
  l2Entries: number;
  hasDataFile: boolean;
}

/** Bits 62 (compressed) and 0 (zero flag) of the entry's high/low halves. */

/**
 * Classifies one (sub)cluster, QEMU's qcow2_get_subcluster_type. `bitmapHi`/`bitmapLo` are the
 * extended-L2 bitmap halves (zero bitmap in hi, allocation bitmap in lo); `scIndex` the subcluster.
 */
export function subclusterType(
  g: L2Geometry, hi: number, lo: number, bitmapHi: number, bitmapLo: number, scIndex: number,
): SubclusterType {
  if (hi & COMPRESSED_HI) return SubclusterType.Compressed;
  const hasOffset = (hi & 0x00ffffff) !== 0 || (lo & 0xfffffe00) !== 0;
  if (!g.extendedL2) {
    if (lo & 1) return hasOffset ? SubclusterType.ZeroAlloc : SubclusterType.ZeroPlain;
    if (!hasOffset) {
      // Offset 0 is valid in an external data file; the COPIED bit tells it apart from unallocated.
      return g.hasDataFile && hi & COPIED_HI ? SubclusterType.Normal : SubclusterType.UnallocatedPlain;
    }
    return SubclusterType.Normal;
  }
  const normal = hasOffset || (g.hasDataFile && (hi & COPIED_HI) !== 0);
  const bit = 1 << scIndex;
  if (normal) {
    if ((bitmapHi & bitmapLo) !== 0) return SubclusterType.Invalid;
    if (bitmapHi & bit) return SubclusterType.ZeroAlloc;
    if (bitmapLo & bit) return SubclusterType.Normal;
    return SubclusterType.UnallocatedAlloc;
  }
  if (bitmapLo !== 0) return SubclusterType.Invalid;
  if (bitmapHi & bit) return SubclusterType.ZeroPlain;
  return SubclusterType.UnallocatedPlain;
}

/** Host cluster offset of a standard entry (bits 9..55); -1 when it cannot be a real file offset. */
export function standardHostOffset(hi: number, lo: number): number {
  const high = hi & 0x00ffffff;
  if (high >= 0x200000) return -1;
  return high * TWO_POW_32 + ((lo & 0xfffffe00) >>> 0);
}

export interface CompressedDescriptor {
  /** Byte offset of the compressed data in the image file. */
  hostOffset: number;
  /** Bytes to read: whole 512-byte sectors spanned, less the offset into the first. */
  length: number;
}

/**
 * Decodes a compressed cluster descriptor (bits 0..61): the offset takes the low 62-(cluster_bits-8)
 * bits, the count of additional 512-byte sectors the rest. Returns null for offsets past 2^53.
 */
export function decodeCompressed(g: L2Geometry, hi: number, lo: number): CompressedDescriptor | null {
  const shift = 62 - (g.clusterBits - 8); // bit where the sector count starts (49..61)
  const hiShift = shift - 32; // within the high half
  const offsetHi = hi & ((1 << hiShift) - 1);
  if (offsetHi >= 0x200000) return null;
  const hostOffset = offsetHi * TWO_POW_32 + (lo >>> 0);
  const sectorMask = (1 << (g.clusterBits - 8)) - 1;
  const nbSectors = ((hi >>> hiShift) & sectorMask) + 1;
  return { hostOffset, length: nbSectors * 512 - (hostOffset % 512) };
}
