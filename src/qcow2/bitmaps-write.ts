// Persistent dirty bitmaps kept consistent by the writer. The spec allows either keeping enabled
// (`auto`) bitmaps up to date or clearing the autoclear bit; clearing it makes QEMU ignore the
// bitmap extension, so `qemu-img check` reports every bitmap cluster as leaked and the bitmaps are
// lost. So, as QEMU does while it has an image open: enabled bitmaps are marked in_use on the first
// write, every written/zeroed/discarded guest range is recorded, and flush/close set those bits in
// the bitmap data (allocating a data cluster for an all-zeros table entry), then close clears
// in_use. A crash leaves in_use set: QEMU then treats the bitmap as inconsistent (as after its own
// crash), and check stays clean because every cluster stays referenced. Disabled bitmaps and
// bitmaps already in_use are left untouched. A resize stores every bitmap afresh for the new size
// (src/qcow2/bitmaps-resize.ts) and the tracker then follows the new directory.

import type { Storage } from '../io/storage.js';
import { readFullZeroFill } from '../io/storage.js';
import type { BitmapsExtension } from './header.js';
import type { Refcounts } from './allocator.js';
import { BITMAP_FLAG_AUTO, BITMAP_FLAG_IN_USE, TWO_POW_32, entryOffset } from './layout.js';
import {
  listDirectory, markAllInUse, resizeRefusal, storeResized, validateDirectory, validateTables,
  type BitmapStoreHost, type DirBitmap,
} from './bitmaps-resize.js';

interface TrackedBitmap {
  /** Byte position of the entry in the directory. */
  at: number;
  tableOffset: number;
  tableSize: number;
  granularity: number;
}

export class BitmapTracker {
  private tracked: TrackedBitmap[] = [];
  private dirty: [number, number][] = [];
  private inUse = false;
  /** Per directory entry: in_use when the image was opened (QEMU: inconsistent, never resized or stored). */
  private inUseAtOpen: boolean[] = [];

  private constructor(private readonly storage: Storage, private ext: BitmapsExtension | undefined,
    private dir: Uint8Array, private readonly cs: number) {}

  static async load(storage: Storage, ext: BitmapsExtension | undefined, clusterSize: number): Promise<BitmapTracker> {
    if (!ext || ext.nbBitmaps === 0) return new BitmapTracker(storage, undefined, new Uint8Array(0), clusterSize);
    const dir = new Uint8Array(ext.directorySize);
    await readFullZeroFill(storage, dir, ext.directoryOffset);
    const t = new BitmapTracker(storage, ext, dir, clusterSize);
    t.follow(ext, dir);
    return t;
  }

  /** Tracks the bitmaps of `dir` (enabled and not in_use). */
  private follow(ext: BitmapsExtension, dir: Uint8Array): void {
    this.ext = ext;
    this.dir = dir;
    const entries = listDirectory(dir, ext.nbBitmaps);
    this.inUseAtOpen = entries.map((e) => (e.flags & BITMAP_FLAG_IN_USE) !== 0);
    this.tracked = entries
      .filter((e) => (e.flags & BITMAP_FLAG_AUTO) !== 0 && (e.flags & BITMAP_FLAG_IN_USE) === 0)
      .map((e) => ({ at: e.at, tableOffset: e.tableOffset, tableSize: e.tableSize, granularity: 2 ** e.granularityBits }));
    this.dirty = [];
    this.inUse = false;
  }

  get active(): boolean {
    return this.tracked.length > 0;
  }

  get hasBitmaps(): boolean {
    return this.ext !== undefined;
  }

  /** Marks the tracked bitmaps in_use on disk before the first guest write. */
  async begin(): Promise<void> {
    if (!this.active || this.inUse) return;
    await this.setInUse(true);
    await this.storage.flush();
  }

  note(offset: number, length: number): void {
    if (!this.active || length <= 0) return;
    const last = this.dirty[this.dirty.length - 1];
    if (last && last[1] === offset) last[1] = offset + length;
    else this.dirty.push([offset, offset + length]);
  }

  /**
   * Sets the recorded bits in the bitmap data (new data clusters are allocated and written here).
   * Returns the table writes, to be issued once the refcount blocks naming new clusters are written.
   */
  async sync(refcounts: Refcounts): Promise<() => Promise<void>> {
    if (!this.active || this.dirty.length === 0) return async () => undefined;
    const ranges = this.dirty;
    this.dirty = [];
    const cs = this.cs;
    const bitsPerCluster = cs * 8;
    const tableWrites: [Uint8Array, number][] = [];
    for (const bm of this.tracked) {
      const table = new Uint8Array(bm.tableSize * 8);
      await readFullZeroFill(this.storage, table, bm.tableOffset);
      const tv = new DataView(table.buffer);
      const clusters = new Map<number, Uint8Array>();
      let tableChanged = false;
      const cluster = async (k: number): Promise<Uint8Array | null> => {
        let data = clusters.get(k);
        if (data) return data;
        const hi = tv.getUint32(k * 8);
        const lo = tv.getUint32(k * 8 + 4);
        const off = entryOffset(hi, lo);
        if (off === 0 && (lo & 1) === 1) return null; // all ones already
        data = new Uint8Array(cs);
        if (off > 0) await readFullZeroFill(this.storage, data, off);
        clusters.set(k, data);
        return data;
      };
      for (const [start, end] of ranges) {
        const b0 = Math.floor(start / bm.granularity);
        const b1 = Math.floor((end - 1) / bm.granularity) + 1;
        for (let b = b0; b < b1;) {
          const k = Math.floor(b / bitsPerCluster);
          if (k >= bm.tableSize) break;
          const stop = Math.min(b1, (k + 1) * bitsPerCluster);
          const data = await cluster(k);
          if (data) {
            for (let i = b - k * bitsPerCluster; i < stop - k * bitsPerCluster; i++) data[i >>> 3]! |= 1 << (i & 7);
          }
          b = stop;
        }
      }
      const writes: Promise<void>[] = [];
      for (const [k, data] of clusters) {
        let off = entryOffset(tv.getUint32(k * 8), tv.getUint32(k * 8 + 4));
        if (off === 0) {
          off = await refcounts.allocClusters(1);
          tv.setUint32(k * 8, Math.floor(off / TWO_POW_32));
          tv.setUint32(k * 8 + 4, off >>> 0);
          tableChanged = true;
        }
        writes.push(this.storage.write(data, off));
      }
      await Promise.all(writes);
      if (tableChanged) tableWrites.push([table, bm.tableOffset]);
    }
    return async () => {
      await Promise.all(tableWrites.map(([t, off]) => this.storage.write(t, off)));
    };
  }

  /** After a clean final sync: the bitmaps are consistent again. */
  async end(): Promise<void> {
    if (!this.inUse) return;
    await this.setInUse(false);
  }

  private async setInUse(on: boolean): Promise<void> {
    const view = new DataView(this.dir.buffer);
    for (const bm of this.tracked) {
      const flags = view.getUint32(bm.at + 12);
      view.setUint32(bm.at + 12, on ? flags | BITMAP_FLAG_IN_USE : flags & ~BITMAP_FLAG_IN_USE);
    }
    await this.storage.write(this.dir, this.ext!.directoryOffset);
    this.inUse = on;
  }

  // ---------------------------------------------------------------- resize

  /**
   * Before a resize (the image's size is `size`): the directory as QEMU checks it on open, and
   * QEMU's refusal when a bitmap was in_use then. Nothing is written.
   */
  async checkResize(size: number): Promise<DirBitmap[]> {
    if (!this.ext) return [];
    const bitmaps = validateDirectory(this.dir, this.ext.nbBitmaps, this.cs, size, this.inUseAtOpen);
    await validateTables(this.storage, bitmaps, this.inUseAtOpen, this.cs, size);
    const refusal = resizeRefusal(bitmaps, this.inUseAtOpen);
    if (refusal) throw refusal;
    return bitmaps;
  }

  /** Marks every bitmap in_use on disk before the size changes (the caller has synced recorded writes). */
  async beginResize(host: BitmapStoreHost, bitmaps: readonly DirBitmap[]): Promise<void> {
    if (!this.ext) return;
    this.dir = await markAllInUse(host, this.ext, this.dir, bitmaps);
    // Tracked bitmaps are in_use already: no second directory write on the first write.
    this.inUse = true;
  }

  /**
   * After the resize from `oldSize` to `newSize` is on disk: every bitmap stored afresh, tracked
   * from its new place. Returns QEMU's warning when the bitmaps could not be stored (they stay in_use).
   */
  async finishResize(host: BitmapStoreHost, bitmaps: readonly DirBitmap[], oldSize: number, newSize: number): Promise<string | null> {
    if (!this.ext) return null;
    let stored;
    try {
      stored = await storeResized(host, this.ext, bitmaps, oldSize, newSize);
    } catch (e) {
      this.abandon();
      throw e;
    }
    if ('lost' in stored) {
      this.abandon();
      return stored.lost;
    }
    this.follow(stored.ext, stored.dir);
    return null;
  }

  /** The bitmaps stay in_use on disk (inconsistent): nothing is tracked, close does not clear in_use. */
  abandon(): void {
    this.tracked = [];
    this.dirty = [];
    this.inUse = false;
    this.inUseAtOpen = this.inUseAtOpen.map(() => true);
  }
}
