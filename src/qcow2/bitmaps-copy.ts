// Copying persistent dirty bitmaps between qcow2 images (qemu-img convert --bitmaps): the source's
// bitmaps are read whole (directory, tables, data clusters) and stored into a closed target file
// the way QEMU stores new persistent bitmaps when it closes an image: data clusters only for table
// entries with a bit set, then the table, then a new directory (existing entries first, new ones
// appended), refcounts, and the header naming the directory with the bitmaps autoclear bit set.

import type { Storage } from '../io/storage.js';
import { readFullZeroFill } from '../io/storage.js';
import { FormatError, QimgError } from '../errors.js';
import { readHeader, type Qcow2Header } from './header.js';
import { serializeHeader } from './header-write.js';
import { Refcounts } from './allocator.js';
import {
  AUTOCLEAR_BITMAPS, BITMAP_DIR_ENTRY_HEADER, BITMAP_ENTRY_ALL_ONES, BITMAP_FLAG_AUTO, BITMAP_FLAG_IN_USE, TWO_POW_32, entryOffset,
} from './layout.js';

/** Table entry bits that must be zero (QEMU's BME_TABLE_ENTRY_RESERVED_MASK). */
const ENTRY_OFFSET_MASK_HI = 0x00ffffff;
const decoder = new TextDecoder();
const encoder = new TextEncoder();

/** One persistent bitmap as a qcow2 directory describes it. */
export interface PersistentBitmap {
  name: string;
  granularity: number;
  /** The `auto` flag: QEMU keeps the bitmap enabled (tracking writes). */
  enabled: boolean;
  /** The `in_use` flag: QEMU treats the bitmap as inconsistent. */
  inUse: boolean;
  tableOffset: number;
  tableSize: number;
}

/** What a qcow2 image must expose for its bitmaps to be read (Qcow2Driver has all of it). */
export interface BitmapSource {
  readonly storage: Storage;
  readonly header: Qcow2Header;
  readonly virtualSize: number;
}

/**
 * The persistent bitmaps QEMU loads from this image, in directory order: none when the header has
 * no bitmaps extension or its autoclear bit is clear (QEMU then ignores the extension).
 */
export async function listPersistentBitmaps(src: BitmapSource): Promise<PersistentBitmap[]> {
  const h = src.header;
  if (!h.bitmaps || h.bitmaps.nbBitmaps === 0 || (h.autoclearFeatures & AUTOCLEAR_BITMAPS) === 0n) return [];
  const dir = new Uint8Array(h.bitmaps.directorySize);
  await readFullZeroFill(src.storage, dir, h.bitmaps.directoryOffset);
  return parseDirectory(dir, h.bitmaps.nbBitmaps).map((e) => e.bitmap);
}

interface DirEntry {
  bitmap: PersistentBitmap;
  /** The entry's bytes as stored (kept verbatim when the directory is rewritten). */
  bytes: Uint8Array;
}

function parseDirectory(dir: Uint8Array, count: number): DirEntry[] {
  const view = new DataView(dir.buffer, dir.byteOffset, dir.byteLength);
  const out: DirEntry[] = [];
  let pos = 0;
  for (let i = 0; i < count; i++) {
    if (pos + BITMAP_DIR_ENTRY_HEADER > dir.length) throw new FormatError('Broken bitmap directory');
    const flags = view.getUint32(pos + 12);
    const nameSize = view.getUint16(pos + 18);
    const extraSize = view.getUint32(pos + 20);
    const size = BITMAP_DIR_ENTRY_HEADER + extraSize + nameSize;
    if (pos + size > dir.length) throw new FormatError('Broken bitmap directory');
    out.push({
      bitmap: {
        name: decoder.decode(dir.subarray(pos + BITMAP_DIR_ENTRY_HEADER + extraSize, pos + size)),
        granularity: 2 ** view.getUint8(pos + 17),
        enabled: (flags & BITMAP_FLAG_AUTO) !== 0,
        inUse: (flags & BITMAP_FLAG_IN_USE) !== 0,
        tableOffset: entryOffset(view.getUint32(pos), view.getUint32(pos + 4)),
        tableSize: view.getUint32(pos + 8),
      },
      bytes: dir.slice(pos, pos + ((size + 7) & ~7)),
    });
    pos += (size + 7) & ~7;
  }
  return out;
}

/** Bits a bitmap of `granularity` has over `size` bytes. */
export function bitmapBits(size: number, granularity: number): number {
  return Math.ceil(size / granularity);
}

/**
 * The bitmap's bits (bit i of the bitmap is bit i%8 of byte i/8, as the spec stores them), for a
 * disk of `size` bytes; bits past the disk's end are clear.
 */
export async function readBitmapBits(src: BitmapSource, bm: PersistentBitmap, size = src.virtualSize): Promise<Uint8Array> {
  const cs = 2 ** src.header.clusterBits;
  const nbits = bitmapBits(size, bm.granularity);
  const out = new Uint8Array(Math.ceil(nbits / 8));
  const table = new Uint8Array(bm.tableSize * 8);
  await readFullZeroFill(src.storage, table, bm.tableOffset);
  const tv = new DataView(table.buffer);
  for (let k = 0; k < bm.tableSize; k++) {
    const from = k * cs;
    if (from >= out.length) break;
    const hi = tv.getUint32(k * 8);
    const lo = tv.getUint32(k * 8 + 4);
    const off = entryOffset(hi & ENTRY_OFFSET_MASK_HI, lo & ~0x1ff);
    const part = out.subarray(from, Math.min(out.length, from + cs));
    if (off === 0) {
      if (lo & BITMAP_ENTRY_ALL_ONES) part.fill(0xff);
    } else {
      await readFullZeroFill(src.storage, part, off);
    }
  }
  // Bits past the disk's end are never set in QEMU's in-memory bitmap.
  if (nbits % 8 !== 0) out[out.length - 1]! &= (1 << (nbits % 8)) - 1;
  return out;
}

/** A bitmap to add to a target image. */
export interface NewBitmap {
  name: string;
  granularity: number;
  enabled: boolean;
  /** Its bits, as readBitmapBits returns them (for the target's size). */
  bits: Uint8Array;
}

/** Names of the persistent bitmaps stored in a closed qcow2 file (see listPersistentBitmaps). */
export async function storedBitmapNames(storage: Storage): Promise<string[]> {
  const header = await readHeader(storage);
  return (await listPersistentBitmaps({ storage, header, virtualSize: header.size })).map((b) => b.name);
}


/**
 * Stores `bitmaps` as new persistent bitmaps in the qcow2 image in `storage` (closed by every
 * other user, not dirty), after the bitmaps it already has. The caller has checked the names.
 */
export async function storeNewBitmaps(storage: Storage, bitmaps: NewBitmap[]): Promise<void> {
  if (bitmaps.length === 0) return;
  const h = await readHeader(storage);
  const cs = 2 ** h.clusterBits;
  if (h.version < 3) throw new QimgError('UNSUPPORTED', 'Cannot store dirty bitmaps in qcow2 v2 files');
  const refcounts = await Refcounts.load(storage, cs, h.refcountOrder, h.refcountTableOffset, h.refcountTableClusters);
  let existing: DirEntry[] = [];
  const hadDirectory = h.bitmaps && (h.autoclearFeatures & AUTOCLEAR_BITMAPS) !== 0n ? h.bitmaps : undefined;
  if (hadDirectory && hadDirectory.nbBitmaps > 0) {
    const dir = new Uint8Array(hadDirectory.directorySize);
    await readFullZeroFill(storage, dir, hadDirectory.directoryOffset);
    existing = parseDirectory(dir, hadDirectory.nbBitmaps);
  }

  const entries: Uint8Array[] = existing.map((e) => e.bytes);
  const bitsPerCluster = cs * 8;
  for (const bm of bitmaps) {
    const nbits = bm.bits.length * 8;
    const tableSize = Math.ceil(nbits / bitsPerCluster);
    const table = new Uint8Array(tableSize * 8);
    const tv = new DataView(table.buffer);
    for (let k = 0; k < tableSize; k++) {
      const part = bm.bits.subarray(k * cs, Math.min(bm.bits.length, (k + 1) * cs));
      if (part.every((b) => b === 0)) continue;
      const off = await refcounts.allocClusters(1);
      const cluster = new Uint8Array(cs);
      cluster.set(part);
      await storage.write(cluster, off);
      tv.setUint32(k * 8, Math.floor(off / TWO_POW_32));
      tv.setUint32(k * 8 + 4, off >>> 0);
    }
    const tableOffset = await refcounts.allocClusters(Math.ceil(table.length / cs));
    await storage.write(table, tableOffset);
    const name = encoder.encode(bm.name);
    const entry = new Uint8Array((BITMAP_DIR_ENTRY_HEADER + name.length + 7) & ~7);
    const ev = new DataView(entry.buffer);
    ev.setUint32(0, Math.floor(tableOffset / TWO_POW_32));
    ev.setUint32(4, tableOffset >>> 0);
    ev.setUint32(8, tableSize);
    ev.setUint32(12, bm.enabled ? BITMAP_FLAG_AUTO : 0);
    entry[16] = 1; // type: dirty tracking bitmap
    entry[17] = Math.log2(bm.granularity);
    ev.setUint16(18, name.length);
    ev.setUint32(20, 0);
    entry.set(name, BITMAP_DIR_ENTRY_HEADER);
    entries.push(entry);
  }
  // Entries are padded to 8 bytes, the last one included (QEMU's calc_dir_entry_size).
  const dir = new Uint8Array(entries.reduce((n, e) => n + e.length, 0));
  const dirSize = dir.length;
  let pos = 0;
  for (const e of entries) {
    dir.set(e, pos);
    pos += e.length;
  }
  const dirOffset = await refcounts.allocClusters(Math.ceil(dirSize / cs));
  await storage.write(dir.subarray(0, dirSize), dirOffset);

  await refcounts.blocks.writeDirty();
  await refcounts.writeTable(async (offset, clusters) => {
    h.refcountTableOffset = offset;
    h.refcountTableClusters = clusters;
  });
  await storage.flush();
  h.bitmaps = { nbBitmaps: entries.length, directorySize: dirSize, directoryOffset: dirOffset };
  h.autoclearFeatures |= AUTOCLEAR_BITMAPS;
  await storage.write(serializeHeader({ ...h, size: Math.floor(h.size / 512) * 512 }), 0);
  await storage.flush();
  // The old directory (and a refcount table moved by growth) is free once the header names the new ones.
  if (hadDirectory && hadDirectory.directorySize > 0) refcounts.freeLater(hadDirectory.directoryOffset, hadDirectory.directorySize);
  await refcounts.applyFrees();
  await refcounts.blocks.writeDirty();
  await refcounts.writeTable(async () => undefined);
}
