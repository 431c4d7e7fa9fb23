// On-disk constants, masks and offset math of qcow2 (the role of QEMU's qcow2.h), shared by every file here.

import { FormatError } from '../errors.js';

export const QCOW2_MAGIC = 0x514649fb;
export const MIN_CLUSTER_BITS = 9;
export const MAX_CLUSTER_BITS = 21;
export const DEFAULT_CLUSTER_SIZE = 65536;
/** QEMU's limits on tables it reads into memory. */
export const MAX_L1_BYTES = 32 * 1024 * 1024;
export const MAX_REFTABLE_BYTES = 8 * 1024 * 1024;
export const MAX_SNAPSHOTS = 65536;
export const MAX_SNAPSHOTS_TABLE_BYTES = 1024 * 65536;
export const MAX_SNAPSHOT_EXTRA_DATA = 1024;
export const MAX_BITMAPS = 65535;
export const MAX_BITMAP_DIRECTORY_BYTES = 1024 * 65535;
export const MAX_BACKING_NAME = 1023;
export const SNAPSHOT_HEADER_SIZE = 40;
/** Extended L2 entries split a cluster into 32 subclusters. */
export const SUBCLUSTERS_PER_CLUSTER = 32;
export const COMPRESSED_SECTOR_SIZE = 512;

export const V2_HEADER_LENGTH = 72;
export const V3_MIN_HEADER_LENGTH = 104;
/** Byte offset of the compression_type additional field. */
export const COMPRESSION_TYPE_OFFSET = 104;

// Feature bits.
export const INCOMPAT_DIRTY = 1n << 0n;
export const INCOMPAT_CORRUPT = 1n << 1n;
export const INCOMPAT_DATA_FILE = 1n << 2n;
export const INCOMPAT_COMPRESSION = 1n << 3n;
export const INCOMPAT_EXTL2 = 1n << 4n;
export const INCOMPAT_MASK = 0x1fn;
export const COMPAT_LAZY_REFCOUNTS = 1n << 0n;
export const AUTOCLEAR_BITMAPS = 1n << 0n;
export const AUTOCLEAR_DATA_FILE_RAW = 1n << 1n;

// Header extension types.
export const EXT_END = 0x00000000;
export const EXT_BACKING_FORMAT = 0xe2792aca;
export const EXT_FEATURE_TABLE = 0x6803f857;
export const EXT_BITMAPS = 0x23852875;
export const EXT_CRYPTO = 0x0537be77;
export const EXT_DATA_FILE = 0x44415441;

// Persistent bitmaps (bitmaps extension): directory entry flags, entry header size, table entry flag.
export const BITMAP_FLAG_IN_USE = 1;
export const BITMAP_FLAG_AUTO = 2;
export const BITMAP_DIR_ENTRY_HEADER = 24;
/** A bitmap table entry with offset 0 and this bit: every bit of its range is set. */
export const BITMAP_ENTRY_ALL_ONES = 1;

export const TWO_POW_32 = 4294967296;

/**
 * The offset field (bits 9..55) of an L1, L2 or refcount-table entry given as two 32-bit halves.
 * Offsets past 2^53 cannot be held exactly in a JS number and cannot exist in a real file:
 * such entries return -1 so the caller reports corruption.
 */
export function entryOffset(hi: number, lo: number): number {
  const high = hi & 0x00ffffff;
  if (high >= 0x200000) return -1;
  return high * TWO_POW_32 + ((lo & 0xfffffe00) >>> 0);
}

/** Reads a big-endian u64 that must fit a JS number exactly; larger values are a FormatError naming `what`. */
export function readU64(view: DataView, at: number, what: string): number {
  const hi = view.getUint32(at);
  const lo = view.getUint32(at + 4);
  if (hi >= 0x200000) throw new FormatError(`${what} too large`);
  return hi * TWO_POW_32 + lo;
}

/** Reads a big-endian u64 for counters that may exceed 2^53 (clocks, sizes shown to users): precision may drop. */
export function readU64Lossy(view: DataView, at: number): number {
  return view.getUint32(at) * TWO_POW_32 + view.getUint32(at + 4);
}

export function isAligned(value: number, alignment: number): boolean {
  return value % alignment === 0;
}

export function hex(n: number): string {
  return '0x' + n.toString(16);
}

/**
 * The flags of an L1/L2 entry, as bits of its high 32-bit word: QCOW_OFLAG_COPIED (bit 63: the
 * cluster's refcount is exactly 1, it may be written in place) and QCOW_OFLAG_COMPRESSED (bit 62).
 */
export const COPIED_HI = 0x80000000;
export const COMPRESSED_HI = 0x40000000;
