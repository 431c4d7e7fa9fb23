// Persistent dirty bitmaps across a resize, as qemu-img 7.2 leaves them. QEMU loads every bitmap
// into memory when it opens an image writable and marks the consistent ones in_use on disk
// (block/qcow2-bitmap.c: qcow2_load_dirty_bitmaps, rewriting the directory in place with the
// autoclear bit dropped around the write); qcow2_co_truncate refuses if a bitmap was already
// in_use (inconsistent); the in-memory bitmaps are truncated (hbitmap_truncate: bits past the new
// end are cleared, new bits start clear; the resize itself dirties nothing); and on close every
// bitmap is stored afresh (qcow2_store_persistent_dirty_bitmaps): a new data cluster for each part
// of the table with a bit set, a new table, a new directory, refcounts flushed, the header naming
// the new directory, then the old directory, tables and data clusters freed (the data clusters
// also discarded). qimg keeps the bits on disk instead of in memory: each new data cluster is made
// from the old one (the serialised layout of bit i does not depend on the disk size), so memory
// stays at one cluster whatever the size.
//
// Crash safety: in_use is set (and flushed) before the size changes, so a crash in between leaves
// inconsistent bitmaps, never a consistent one whose table does not fit the disk (QEMU would then
// refuse to open the image); the new clusters are referenced by refcounts before the header names
// them, and the old ones are freed only after: at worst leaked clusters.

import type { Storage } from '../io/storage.js';
import { readFullZeroFill } from '../io/storage.js';
import { FormatError, UnsupportedError } from '../errors.js';
import type { BitmapsExtension, Qcow2Header } from './header.js';
import type { Refcounts } from './allocator.js';
import {
  AUTOCLEAR_BITMAPS, BITMAP_DIR_ENTRY_HEADER, BITMAP_ENTRY_ALL_ONES, BITMAP_FLAG_AUTO, BITMAP_FLAG_IN_USE, TWO_POW_32,
} from './layout.js';

/** Flag bits QEMU refuses (BME_RESERVED_FLAGS). */
const RESERVED_FLAGS = 0xfffffffc;
const TYPE_DIRTY_TRACKING = 1;
/** QEMU's BME_MAX_TABLE_SIZE, BME_MAX_PHYS_SIZE, BME_{MIN,MAX}_GRANULARITY_BITS, BME_MAX_NAME_SIZE. */
const MAX_TABLE_SIZE = 0x8000000;
const MAX_PHYS_SIZE = 0x20000000;
const MIN_GRANULARITY_BITS = 9;
const MAX_GRANULARITY_BITS = 31;
const MAX_NAME_SIZE = 1023;
/** Table entry: bits that must be zero (BME_TABLE_ENTRY_RESERVED_MASK). */
const ENTRY_RESERVED_HI = 0xff000000;
const ENTRY_RESERVED_LO = 0x1fe;
const decoder = new TextDecoder();

/** One entry of a bitmap directory. */
export interface DirBitmap {
  /** Byte position of the entry in the directory. */
  at: number;
  name: string;
  /** The name as stored (QEMU keeps it up to the first NUL byte, g_strndup). */
  nameBytes: Uint8Array;
  flags: number;
  granularityBits: number;
  tableOffset: number;
  tableSize: number;
}

/** The directory entries, leniently: what a writer needs to keep enabled bitmaps up to date. */
export function listDirectory(dir: Uint8Array, count: number): DirBitmap[] {
  const view = new DataView(dir.buffer, dir.byteOffset, dir.byteLength);
  const out: DirBitmap[] = [];
  let pos = 0;
  for (let i = 0; i < count && pos + BITMAP_DIR_ENTRY_HEADER <= dir.length; i++) {
    const nameSize = view.getUint16(pos + 18);
    const extraSize = view.getUint32(pos + 20);
    const size = BITMAP_DIR_ENTRY_HEADER + extraSize + nameSize;
    const hi = view.getUint32(pos);
    let nameBytes = dir.slice(pos + BITMAP_DIR_ENTRY_HEADER + extraSize, Math.min(dir.length, pos + size));
    const nul = nameBytes.indexOf(0);
    if (nul >= 0) nameBytes = nameBytes.subarray(0, nul);
    out.push({
      at: pos,
      name: decoder.decode(nameBytes),
      nameBytes,
      flags: view.getUint32(pos + 12),
      granularityBits: view.getUint8(pos + 17),
      // An offset past 2^53 cannot be in a file; -1 fails validation.
      tableOffset: hi >= 0x200000 ? -1 : hi * TWO_POW_32 + view.getUint32(pos + 4),
      tableSize: view.getUint32(pos + 8),
    });
    pos += Math.ceil(size / 8) * 8;
  }
  return out;
}

/**
 * The directory checked as QEMU checks it when it loads the bitmaps (bitmap_list_load,
 * check_dir_entry) for a disk of `size` bytes; `inUse[i]` says whether entry i was in_use when
 * the image was opened (an in_use bitmap's table may be too small: a resize it missed).
 */
export function validateDirectory(dir: Uint8Array, count: number, cs: number, size: number, inUse: readonly boolean[]): DirBitmap[] {
  const view = new DataView(dir.buffer, dir.byteOffset, dir.byteLength);
  if (dir.length === 0) throw new FormatError('Requested bitmap directory size is zero');
  const out = listDirectory(dir, count);
  let pos = 0;
  let n = 0;
  while (pos < dir.length) {
    if (pos + BITMAP_DIR_ENTRY_HEADER > dir.length) throw new FormatError('Broken bitmap directory');
    if (++n > count) throw new FormatError('More bitmaps found than specified in header extension');
    const nameSize = view.getUint16(pos + 18);
    const extraSize = view.getUint32(pos + 20);
    const size8 = Math.ceil((BITMAP_DIR_ENTRY_HEADER + extraSize + nameSize) / 8) * 8;
    if (pos + size8 > dir.length) throw new FormatError('Broken bitmap directory');
    if (extraSize !== 0) throw new FormatError('Bitmap extra data is not supported');
    const bm = out[n - 1]!;
    const type = view.getUint8(pos + 16);
    const phys = bm.tableSize * cs;
    const fail = bm.tableSize === 0 || bm.tableOffset <= 0 || bm.tableOffset % cs !== 0 || bm.tableSize > MAX_TABLE_SIZE ||
      bm.granularityBits > MAX_GRANULARITY_BITS || bm.granularityBits < MIN_GRANULARITY_BITS || (bm.flags & RESERVED_FLAGS) !== 0 ||
      nameSize > MAX_NAME_SIZE || type !== TYPE_DIRTY_TRACKING || phys > MAX_PHYS_SIZE ||
      (!inUse[n - 1] && size > phys * 8 * 2 ** bm.granularityBits);
    if (fail) throw new FormatError(`Bitmap '${bm.name}' doesn't satisfy the constraints`);
    pos += size8;
  }
  if (n !== count) throw new FormatError('Less bitmaps found than specified in header extension');
  return out;
}

/** Serialised bytes of a bitmap over `size` bytes: whole 64-bit words, as QEMU's hbitmap serialises. */
function serialBytes(size: number, granularityBits: number): number {
  return Math.ceil(Math.ceil(size / 2 ** granularityBits) / 64) * 8;
}

/**
 * The tables of the bitmaps QEMU loads (those not in_use) checked as it checks them when it opens
 * the image (bitmap_table_load, load_bitmap_data): a resize finds a broken one before it changes anything.
 */
export async function validateTables(storage: Storage, bitmaps: readonly DirBitmap[], inUse: readonly boolean[], cs: number, size: number): Promise<void> {
  for (const [i, bm] of bitmaps.entries()) if (!inUse[i]) await readTable(storage, bm, cs, size);
}

/** QEMU's qcow2_truncate_bitmaps_check: the first bitmap (directory order) that was in_use at open. */
export function resizeRefusal(bitmaps: readonly DirBitmap[], inUse: readonly boolean[]): UnsupportedError | null {
  const i = inUse.findIndex((u) => u);
  if (i < 0) return null;
  const name = bitmaps[i]!.name;
  return new UnsupportedError(`Bitmap '${name}' is inconsistent and cannot be used`, {
    bitmap: name,
    hint: 'Try block-dirty-bitmap-remove to delete this bitmap from disk\n',
  });
}

/** What storing bitmaps needs of the open image. */
export interface BitmapStoreHost {
  readonly storage: Storage;
  readonly header: Qcow2Header;
  readonly clusterSize: number;
  readonly refcounts: Refcounts;
  /** Writes cluster 0 from `header`. */
  writeHeader(): Promise<void>;
}

/**
 * QEMU's update_ext_header_and_dir_in_place with every bitmap marked in_use: the autoclear bit is
 * dropped while the directory is rewritten in place, so a torn directory write is never trusted.
 * Returns the directory as written.
 */
export async function markAllInUse(host: BitmapStoreHost, ext: BitmapsExtension, dir: Uint8Array, bitmaps: readonly DirBitmap[]): Promise<Uint8Array> {
  const next = dir.slice();
  const view = new DataView(next.buffer);
  for (const bm of bitmaps) view.setUint32(bm.at + 12, bm.flags | BITMAP_FLAG_IN_USE);
  const h = host.header;
  h.autoclearFeatures &= ~AUTOCLEAR_BITMAPS;
  await host.writeHeader();
  await host.storage.flush();
  await host.storage.write(next, ext.directoryOffset);
  await host.storage.flush();
  h.autoclearFeatures |= AUTOCLEAR_BITMAPS;
  await host.writeHeader();
  await host.storage.flush();
  return next;
}

/** QEMU's check_constraints_on_bitmap and store_bitmap_data limits for a disk of `size` bytes. */
function storeRefusal(bitmaps: readonly DirBitmap[], cs: number, size: number): string | null {
  // QEMU checks its in-memory list, which holds the bitmaps newest (last loaded) first.
  for (const bm of [...bitmaps].reverse()) {
    const bytes = Math.ceil(Math.ceil(size / 2 ** bm.granularityBits) / 8);
    if (bytes > MAX_PHYS_SIZE || bytes > MAX_TABLE_SIZE * cs) {
      return `Bitmap '${bm.name}' doesn't satisfy the constraints: Too much space will be occupied by the bitmap. Use larger granularity`;
    }
  }
  for (const bm of bitmaps) {
    const tableSize = Math.ceil(serialBytes(size, bm.granularityBits) / cs);
    if (tableSize > MAX_TABLE_SIZE || tableSize * cs > MAX_PHYS_SIZE) return `Bitmap '${bm.name}' is too big`;
  }
  return null;
}

/** The stored result: the new extension and directory, or why the bitmaps could not be stored. */
export type StoreResult = { ext: BitmapsExtension; dir: Uint8Array } | { lost: string };

/**
 * Stores `bitmaps` (all of the directory, marked in_use by markAllInUse, tables sized for
 * `oldSize`) for a disk now `newSize` bytes, as QEMU stores its truncated in-memory bitmaps on
 * close. If QEMU could not store them (too large for the new size) nothing is written and they
 * stay in_use, lost, as QEMU leaves them.
 */
export async function storeResized(
  host: BitmapStoreHost, ext: BitmapsExtension, bitmaps: readonly DirBitmap[], oldSize: number, newSize: number,
): Promise<StoreResult> {
  const { storage, refcounts } = host;
  const cs = host.clusterSize;
  const lost = storeRefusal(bitmaps, cs, newSize);
  if (lost) return { lost };

  const oldTables: { table: DataView; bm: DirBitmap }[] = [];
  const entries: Uint8Array[] = [];
  for (const bm of bitmaps) {
    const table = await readTable(storage, bm, cs, oldSize);
    oldTables.push({ table, bm });
    const newTable = await storeData(host, bm, table, oldSize, newSize);
    const tableOffset = await refcounts.allocClusters(Math.ceil(newTable.length / cs));
    await storage.write(newTable, tableOffset);
    entries.push(dirEntry(bm, tableOffset, newTable.length / 8));
  }
  const dirSize = entries.reduce((n, e) => n + e.length, 0);
  const dir = new Uint8Array(dirSize);
  let pos = 0;
  for (const e of entries) {
    dir.set(e, pos);
    pos += e.length;
  }
  const dirOffset = await refcounts.allocClusters(Math.ceil(dirSize / cs));
  await storage.write(dir, dirOffset);

  // qcow2_flush_caches: the refcounts of the new clusters reach the disk before the header names them.
  const h = host.header;
  await refcounts.blocks.writeDirty();
  await refcounts.writeTable(async (offset, clusters) => {
    h.refcountTableOffset = offset;
    h.refcountTableClusters = clusters;
    await host.writeHeader();
  });
  await storage.flush();
  const next: BitmapsExtension = { nbBitmaps: bitmaps.length, directorySize: dirSize, directoryOffset: dirOffset };
  h.bitmaps = next;
  h.autoclearFeatures |= AUTOCLEAR_BITMAPS;
  await host.writeHeader();
  await storage.flush();

  // Now unreferenced: the old directory, then each old table's data clusters and the table.
  const discards: number[] = [];
  await freeRange(refcounts, ext.directoryOffset, ext.directorySize, cs);
  for (const { table, bm } of oldTables) {
    for (let k = 0; k < bm.tableSize; k++) {
      const off = tableEntryOffset(table, k);
      if (off === 0) continue;
      await refcounts.update(off / cs, -1);
      // QCOW2_DISCARD_ALWAYS: the host file gives the space back.
      if ((await refcounts.refcount(off / cs)) === 0) discards.push(off);
    }
    await freeRange(refcounts, bm.tableOffset, bm.tableSize * 8, cs);
  }
  await refcounts.blocks.writeDirty();
  await refcounts.writeTable(async (offset, clusters) => {
    h.refcountTableOffset = offset;
    h.refcountTableClusters = clusters;
    await host.writeHeader();
  });
  if (storage.discard) {
    for (const off of discards) await storage.discard(off, cs).catch(() => undefined);
  }
  return { ext: next, dir };
}

async function freeRange(refcounts: Refcounts, offset: number, length: number, cs: number): Promise<void> {
  for (let ci = Math.floor(offset / cs); ci <= Math.floor((offset + length - 1) / cs); ci++) await refcounts.update(ci, -1);
}

/** The bitmap's table, its entries checked as QEMU's bitmap_table_load and load_bitmap_data check them. */
async function readTable(storage: Storage, bm: DirBitmap, cs: number, size: number): Promise<DataView> {
  if (bm.tableSize !== Math.ceil(serialBytes(size, bm.granularityBits) / cs)) {
    throw new FormatError(`Could not read bitmap '${bm.name}' from image: Invalid argument`);
  }
  const bytes = new Uint8Array(bm.tableSize * 8);
  await readFullZeroFill(storage, bytes, bm.tableOffset);
  const table = new DataView(bytes.buffer);
  for (let k = 0; k < bm.tableSize; k++) {
    const hi = table.getUint32(k * 8);
    const lo = table.getUint32(k * 8 + 4);
    const off = tableEntryOffset(table, k);
    const bad = (hi & ENTRY_RESERVED_HI) !== 0 || (lo & ENTRY_RESERVED_LO) !== 0 || off < 0 ||
      (off !== 0 && ((lo & BITMAP_ENTRY_ALL_ONES) !== 0 || off % cs !== 0));
    if (bad) throw new FormatError(`Could not read bitmap_table table from image for bitmap '${bm.name}': Invalid argument`);
  }
  return table;
}

/** The data offset of table entry k (bits 9..55); -1 past 2^53. */
function tableEntryOffset(table: DataView, k: number): number {
  const hi = table.getUint32(k * 8) & 0x00ffffff;
  if (hi >= 0x200000) return -1;
  return hi * TWO_POW_32 + ((table.getUint32(k * 8 + 4) & 0xfffffe00) >>> 0);
}

/**
 * QEMU's store_bitmap_data for the bitmap truncated to `newSize`: a new cluster for each part of
 * the table holding a bit set below the new end, made from the old part. Returns the new table.
 */
async function storeData(host: BitmapStoreHost, bm: DirBitmap, oldTable: DataView, oldSize: number, newSize: number): Promise<Uint8Array> {
  const cs = host.clusterSize;
  const gran = 2 ** bm.granularityBits;
  const oldBits = Math.ceil(oldSize / gran);
  const newBits = Math.ceil(newSize / gran);
  const oldSerial = serialBytes(oldSize, bm.granularityBits);
  const newSerial = serialBytes(newSize, bm.granularityBits);
  const table = new Uint8Array(Math.ceil(newSerial / cs) * 8);
  const tv = new DataView(table.buffer);
  const bitsPerCluster = cs * 8;
  // Parts past the old table read as zeros: only the old table's parts can hold a bit.
  const parts = Math.min(bm.tableSize, table.length / 8);
  for (let k = 0; k < parts; k++) {
    const off = tableEntryOffset(oldTable, k);
    const allOnes = off === 0 && (oldTable.getUint32(k * 8 + 4) & BITMAP_ENTRY_ALL_ONES) !== 0;
    if (off === 0 && !allOnes) continue;
    // The part's serialised bytes, in the old size and in the new one.
    const keep = Math.min(cs, oldSerial - k * cs, newSerial - k * cs);
    const data = new Uint8Array(cs);
    if (allOnes) {
      data.fill(0xff, 0, keep);
    } else {
      await readFullZeroFill(host.storage, data, off);
      data.fill(0, keep);
    }
    // hbitmap_truncate clears the bits from the new end to the old end (bits past the old end, in
    // its last 64-bit word, are kept as loaded).
    const base = k * bitsPerCluster;
    if (newBits < oldBits) clearBits(data, Math.max(0, newBits - base), Math.min(bitsPerCluster, oldBits - base, keep * 8));
    // QEMU writes a part only if it holds a bit for a granule that starts before the disk's end.
    if (!anyBit(data, Math.max(0, Math.min(bitsPerCluster, newBits - base)))) continue;
    const at = await host.refcounts.allocClusters(1);
    await host.storage.write(data, at);
    tv.setUint32(k * 8, Math.floor(at / TWO_POW_32));
    tv.setUint32(k * 8 + 4, at >>> 0);
  }
  return table;
}

/** Clears bits [from, to) (bit i is bit i%8 of byte i/8). */
function clearBits(data: Uint8Array, from: number, to: number): void {
  let i = from;
  for (; i < to && i % 8 !== 0; i++) data[i >>> 3]! &= ~(1 << (i & 7));
  const wholeEnd = to - (to % 8);
  if (i < wholeEnd) {
    data.fill(0, i >>> 3, wholeEnd >>> 3);
    i = wholeEnd;
  }
  for (; i < to; i++) data[i >>> 3]! &= ~(1 << (i & 7));
}

/** Whether any of bits [0, n) is set. */
function anyBit(data: Uint8Array, n: number): boolean {
  const whole = n >>> 3;
  for (let i = 0; i < whole; i++) if (data[i] !== 0) return true;
  return n % 8 !== 0 && (data[whole]! & ((1 << (n % 8)) - 1)) !== 0;
}

/** A directory entry as QEMU's bitmap_list_store writes it: flags reduced to `auto`, no extra data. */
function dirEntry(bm: DirBitmap, tableOffset: number, tableSize: number): Uint8Array {
  const name = bm.nameBytes;
  const entry = new Uint8Array((BITMAP_DIR_ENTRY_HEADER + name.length + 7) & ~7);
  const ev = new DataView(entry.buffer);
  ev.setUint32(0, Math.floor(tableOffset / TWO_POW_32));
  ev.setUint32(4, tableOffset >>> 0);
  ev.setUint32(8, tableSize);
  ev.setUint32(12, bm.flags & BITMAP_FLAG_AUTO);
  entry[16] = TYPE_DIRTY_TRACKING;
  entry[17] = bm.granularityBits;
  ev.setUint16(18, name.length);
  entry.set(name, BITMAP_DIR_ENTRY_HEADER);
  return entry;
}
