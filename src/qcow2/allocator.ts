// Refcount writer and cluster allocator: the refcount table and blocks (write-back through
// MetaCache), first-fit allocation from a moving hint (QEMU's free_cluster_index), byte allocation
// for packed compressed clusters (qcow2_alloc_bytes), refcount-table growth, deferred frees.

import type { Storage } from '../io/storage.js';
import { readFullZeroFill } from '../io/storage.js';
import { FormatError, QimgError } from '../errors.js';
import { MetaCache } from './cache.js';
import { MAX_REFTABLE_BYTES, TWO_POW_32, entryOffset, hex } from './layout.js';
import { refcountGetter, refcountMax, refcountSetter, type RefcountGetter, type RefcountSetter } from './refcount.js';

/** Normal host offsets must stay below 2^56 (QCOW_MAX_CLUSTER_OFFSET); JS numbers stop at 2^53 first. */
const MAX_HOST_OFFSET = 2 ** 53;
const REFBLOCK_CACHE_BYTES = 4 * 1024 * 1024;

export class Refcounts {
  readonly blocks: MetaCache;
  readonly entriesPerBlock: number;
  readonly max: number;
  private readonly get: RefcountGetter;
  private readonly set: RefcountSetter;
  private readonly cs: number;
  private table: Uint8Array;
  private tableView: DataView;
  /** Where the table lives (once `relocated` is written: where it will live). */
  tableOffset: number;
  tableClusters: number;
  /** A grown table not yet written (the header still names the old one). */
  private relocated = false;
  private dirtyLo = Infinity;
  private dirtyHi = -1;
  /** First cluster index that may be free (QEMU's free_cluster_index). */
  private freeClusterIndex = 0;
  /** Where the next compressed cluster may start (QEMU's free_byte_offset); 0 = none. */
  private freeByteOffset = 0;
  /** Byte ranges whose references are gone from the in-memory L2/L1 tables; decremented after those are written. */
  private pending: [number, number][] = [];
  /** Called for every cluster whose refcount drops to 0 (caches forget tables there). */
  onFreed: (hostOffset: number) => void = () => undefined;

  private constructor(private readonly storage: Storage, clusterSize: number, order: number, tableOffset: number,
    tableClusters: number, table: Uint8Array) {
    this.cs = clusterSize;
    this.get = refcountGetter(order);
    this.set = refcountSetter(order);
    this.max = refcountMax(order);
    this.entriesPerBlock = (clusterSize * 8) / 2 ** order;
    this.blocks = new MetaCache(storage, clusterSize, REFBLOCK_CACHE_BYTES);
    this.tableOffset = tableOffset;
    this.tableClusters = tableClusters;
    this.table = table;
    this.tableView = new DataView(table.buffer);
  }

  static async load(storage: Storage, clusterSize: number, order: number, tableOffset: number, tableClusters: number): Promise<Refcounts> {
    const table = new Uint8Array(tableClusters * clusterSize);
    await readFullZeroFill(storage, table, tableOffset);
    return new Refcounts(storage, clusterSize, order, tableOffset, tableClusters, table);
  }

  private get tableEntries(): number {
    return this.table.length / 8;
  }

  private blockOffset(tableIndex: number): number {
    if (tableIndex >= this.tableEntries) return 0;
    const off = entryOffset(this.tableView.getUint32(tableIndex * 8), this.tableView.getUint32(tableIndex * 8 + 4));
    if (off < 0 || off % this.cs !== 0) {
      throw new FormatError(`Refblock offset ${hex(off)} unaligned (reftable index: ${hex(tableIndex)})`);
    }
    return off;
  }

  private setBlockOffset(tableIndex: number, offset: number): void {
    this.tableView.setUint32(tableIndex * 8, Math.floor(offset / TWO_POW_32));
    this.tableView.setUint32(tableIndex * 8 + 4, offset >>> 0);
    this.dirtyLo = Math.min(this.dirtyLo, tableIndex);
    this.dirtyHi = Math.max(this.dirtyHi, tableIndex + 1);
  }

  /** The refcount of host cluster `ci`. */
  async refcount(ci: number): Promise<number> {
    const t = Math.floor(ci / this.entriesPerBlock);
    const off = this.blockOffset(t);
    if (off === 0) return 0;
    return this.get(await this.blocks.get(off), ci - t * this.entriesPerBlock);
  }

  /** First run of n free clusters at or after the hint; the hint moves past it. Returns the first cluster index. */
  private async findFree(n: number): Promise<number> {
    const epb = this.entriesPerBlock;
    let start = this.freeClusterIndex;
    let i = start;
    let run = 0;
    while (run < n) {
      const t = Math.floor(i / epb);
      const blockEnd = (t + 1) * epb;
      const off = this.blockOffset(t);
      if (off === 0) {
        const take = Math.min(n - run, blockEnd - i);
        run += take;
        i += take;
        continue;
      }
      const view = await this.blocks.get(off);
      const base = t * epb;
      while (i < blockEnd && run < n) {
        if (this.get(view, i - base) !== 0) {
          run = 0;
          start = i + 1;
        } else {
          run++;
        }
        i++;
      }
    }
    if ((start + n) * this.cs > MAX_HOST_OFFSET) throw new QimgError('IO', 'Could not allocate a cluster: File too large');
    this.freeClusterIndex = start + n;
    return start;
  }

  /** Allocates n contiguous clusters (refcount 1 each); returns the host offset of the first. */
  async allocClusters(n: number): Promise<number> {
    const start = await this.findFree(n);
    await this.increment(start, n);
    return start * this.cs;
  }

  /**
   * One more reference to each of n clusters from ci: update(c, 1) for each, but one refcount block
   * at a time (a convert allocates ~20,000 clusters per GB; awaiting each one cost a few promises).
   */
  private async increment(ci: number, n: number): Promise<void> {
    const epb = this.entriesPerBlock;
    for (let c = ci; c < ci + n; ) {
      const t = Math.floor(c / epb);
      const { offset, view } = await this.ensureBlock(t);
      const end = Math.min(ci + n, (t + 1) * epb);
      for (; c < end; c++) {
        const idx = c - t * epb;
        const v = this.get(view, idx) + 1;
        if (v > this.max) throw new FormatError(`Refcount of cluster ${hex(c * this.cs)} would become ${v} (out of range 0..${this.max})`);
        this.set(view, idx, v);
      }
      this.blocks.markDirty(offset, view);
    }
  }

  /**
   * Allocates `size` bytes (< one cluster) for a compressed cluster, packed after the previous one
   * (QEMU's qcow2_alloc_bytes): every host cluster the bytes touch gets one more reference; a host
   * cluster whose refcount already reached the maximum is not appended to.
   */
  async allocBytes(size: number): Promise<number> {
    const cs = this.cs;
    let offset = this.freeByteOffset;
    if (offset) {
      const rc = await this.refcount(Math.floor(offset / cs));
      if (rc === 0 || rc >= this.max) offset = 0;
    }
    const freeInCluster = offset ? cs - (offset % cs) : 0;
    if (!offset || freeInCluster < size) {
      const next = (await this.findFree(1)) * cs;
      if (!offset || Math.ceil(offset / cs) * cs !== next) offset = next;
    }
    for (let ci = Math.floor(offset / cs); ci <= Math.floor((offset + size - 1) / cs); ci++) await this.update(ci, 1);
    this.freeByteOffset = (offset + size) % cs === 0 ? 0 : offset + size;
    return offset;
  }

  /** Adds delta to the refcount of cluster ci, allocating refcount blocks (and growing the table) as needed. */
  async update(ci: number, delta: number): Promise<void> {
    const t = Math.floor(ci / this.entriesPerBlock);
    const { offset, view } = await this.ensureBlock(t);
    const idx = ci - t * this.entriesPerBlock;
    const v = this.get(view, idx) + delta;
    if (v < 0 || v > this.max) {
      throw new FormatError(`Refcount of cluster ${hex(ci * this.cs)} would become ${v} (out of range 0..${this.max})`);
    }
    this.set(view, idx, v);
    this.blocks.markDirty(offset, view);
    if (v === 0) {
      if (ci < this.freeClusterIndex) this.freeClusterIndex = ci;
      if (this.freeByteOffset && Math.floor(this.freeByteOffset / this.cs) === ci) this.freeByteOffset = 0;
      this.onFreed(ci * this.cs);
    }
  }

  private async ensureBlock(t: number): Promise<{ offset: number; view: DataView }> {
    if (t >= this.tableEntries) await this.growTable(t);
    const existing = this.blockOffset(t);
    if (existing !== 0) return { offset: existing, view: await this.blocks.get(existing) };
    const c = await this.findFree(1);
    const offset = c * this.cs;
    const view = this.blocks.install(offset);
    this.setBlockOffset(t, offset);
    if (Math.floor(c / this.entriesPerBlock) === t) {
      // The new block covers itself (QEMU's self-describing refcount block).
      this.set(view, c - t * this.entriesPerBlock, 1);
    } else {
      await this.update(c, 1);
    }
    return { offset, view: (await this.blocks.get(offset)) };
  }

  /**
   * Grows the refcount table to cover table index t: a larger copy in new clusters (refcounted
   * through itself), written and named in the header by writeTable; the old clusters are freed after.
   */
  private async growTable(t: number): Promise<void> {
    const perCluster = this.cs / 8;
    let entries = Math.max(t + 1, Math.ceil((this.tableEntries * 3) / 2));
    entries = Math.ceil(entries / perCluster) * perCluster;
    if (entries * 8 > MAX_REFTABLE_BYTES) throw new QimgError('IO', 'Could not grow the refcount table: File too large');
    const clusters = entries / perCluster;
    const old = { offset: this.tableOffset, clusters: this.tableClusters, onDisk: !this.relocated };
    const table = new Uint8Array(entries * 8);
    table.set(this.table);
    this.table = table;
    this.tableView = new DataView(table.buffer);
    const start = await this.findFree(clusters);
    this.tableOffset = start * this.cs;
    this.tableClusters = clusters;
    this.relocated = true;
    await this.increment(start, clusters);
    if (old.onDisk) this.freeLater(old.offset, old.clusters * this.cs);
    else for (let k = 0; k < old.clusters; k++) await this.update(old.offset / this.cs + k, -1);
  }

  /** Writes the table (all of it when relocated, then the header through writeHeader; else the dirty entries). */
  async writeTable(commit: (offset: number, clusters: number) => Promise<void>): Promise<void> {
    if (this.relocated) {
      await this.storage.write(this.table, this.tableOffset);
      this.relocated = false;
      await commit(this.tableOffset, this.tableClusters);
    } else if (this.dirtyHi > this.dirtyLo) {
      // Whole 512-byte sectors, as QEMU writes table entries.
      const lo = Math.floor((this.dirtyLo * 8) / 512) * 512;
      const hi = Math.min(this.table.length, Math.ceil((this.dirtyHi * 8) / 512) * 512);
      await this.storage.write(this.table.subarray(lo, hi), this.tableOffset + lo);
    }
    this.dirtyLo = Infinity;
    this.dirtyHi = -1;
  }

  /**
   * qcow2_alloc_clusters_at: as many of n clusters from cluster `ci` as are free (stopping at the
   * first used one), refcounted 1; returns how many (0 when `ci` is taken). The hint does not move.
   */
  async allocClustersAt(ci: number, n: number): Promise<number> {
    if (n === 0) return 0;
    for (;;) {
      let free = 0;
      while (free < n && (await this.refcount(ci + free)) === 0) free++;
      if (free === 0) return 0;
      // Refcount blocks first (one may land inside the run), then count again.
      const t0 = Math.floor(ci / this.entriesPerBlock);
      const t1 = Math.floor((ci + free - 1) / this.entriesPerBlock);
      let changed = false;
      for (let t = t0; t <= t1; t++) {
        if (t >= this.tableEntries || this.blockOffset(t) === 0) {
          await this.ensureBlock(t);
          changed = true;
        }
      }
      if (changed) continue;
      await this.increment(ci, free);
      return free;
    }
  }

  /** qcow2_get_last_cluster: the last cluster below fileSize with a nonzero refcount, or -1. */
  async lastUsedCluster(fileSize: number): Promise<number> {
    for (let ci = Math.ceil(fileSize / this.cs) - 1; ci >= 0; ci--) {
      if ((await this.refcount(ci)) > 0) return ci;
    }
    return -1;
  }

  /** qcow2_refcount_metadata_size's refcount block count for `clusters` clusters (exact size). */
  private refblockCount(clusters: number): number {
    const perTableCluster = this.cs / 8;
    let table = 0;
    let blocks = 0;
    let n = 0;
    let last: number;
    do {
      last = n;
      blocks = Math.ceil((clusters + table + blocks) / this.entriesPerBlock);
      table = Math.ceil(blocks / perTableCluster);
      n = clusters + blocks + table;
    } while (n !== last);
    return blocks;
  }

  /**
   * QEMU's qcow2_refcount_area (exact size): new refcount blocks from cluster `start`, then a new
   * refcount table after them, so that `additional` clusters from `start` on are covered; the new
   * structures are refcounted by themselves. The table is written (and the header switched) by
   * writeTable; the old table is freed after. Returns the first cluster past the new structures.
   */
  async refcountArea(start: number, additional: number): Promise<number> {
    const total = this.refblockCount(start + additional);
    const perCluster = this.cs / 8;
    const tableSize = Math.ceil(total / perCluster) * perCluster;
    if (tableSize * 8 > MAX_REFTABLE_BYTES) throw new QimgError('IO', 'Failed to resize refcount structures: File too large');
    const areaIndex = Math.floor(start / this.entriesPerBlock);
    const table = new Uint8Array(tableSize * 8);
    table.set(this.table.subarray(0, Math.min(this.table.length, table.length)));
    const view = new DataView(table.buffer);
    const entry = (i: number): number => entryOffset(view.getUint32(i * 8), view.getUint32(i * 8 + 4));
    let additionalBlocks = 0;
    for (let i = areaIndex; i < total; i++) if (entry(i) === 0) additionalBlocks++;
    const tableStart = start + additionalBlocks;
    const end = tableStart + tableSize / perCluster;
    let block = start;
    for (let i = areaIndex; i < total; i++) {
      let off = entry(i);
      let rb: DataView;
      if (off === 0) {
        off = block++ * this.cs;
        rb = this.blocks.install(off);
        view.setUint32(i * 8, Math.floor(off / TWO_POW_32));
        view.setUint32(i * 8 + 4, off >>> 0);
      } else {
        rb = await this.blocks.get(off);
      }
      const first = i * this.entriesPerBlock;
      if (first < end) {
        const j0 = first < start ? start - first : 0;
        const j1 = Math.min(end - first, this.entriesPerBlock);
        for (let j = j0; j < j1; j++) {
          if (this.get(rb, j) !== 0) throw new FormatError(`Refcount area at cluster ${start} is not free (cluster ${first + j})`);
          this.set(rb, j, 1);
        }
        this.blocks.markDirty(off, rb);
      }
    }
    const old = { offset: this.tableOffset, clusters: this.tableClusters, onDisk: !this.relocated };
    this.table = table;
    this.tableView = view;
    this.tableOffset = tableStart * this.cs;
    this.tableClusters = tableSize / perCluster;
    this.relocated = true;
    if (old.onDisk) this.freeLater(old.offset, old.clusters * this.cs);
    else for (let k = 0; k < old.clusters; k++) await this.update(old.offset / this.cs + k, -1);
    return end;
  }

  /**
   * Forgets every cached block and reads the refcount table at tableOffset again: the metadata was
   * committed behind this writer (internal snapshots, snapshot-write.ts) while it had nothing pending.
   */
  async reload(tableOffset: number, tableClusters: number): Promise<void> {
    if (this.pending.length > 0 || this.blocks.hasDirty || this.relocated) {
      throw new QimgError('USAGE', 'Refcounts cannot be reloaded with changes pending');
    }
    const table = new Uint8Array(tableClusters * this.cs);
    await readFullZeroFill(this.storage, table, tableOffset);
    this.table = table;
    this.tableView = new DataView(table.buffer);
    this.tableOffset = tableOffset;
    this.tableClusters = tableClusters;
    this.blocks.clear();
    this.dirtyLo = Infinity;
    this.dirtyHi = -1;
    this.freeClusterIndex = 0;
    this.freeByteOffset = 0;
  }

  /** Drops one reference from every host cluster [offset, offset+length) touches, once the referrers are written. */
  freeLater(offset: number, length: number): void {
    this.pending.push([offset, length]);
  }

  get pendingFrees(): number {
    return this.pending.length;
  }

  /** Applies the deferred frees (call only after the tables that dropped the references are written). */
  async applyFrees(): Promise<void> {
    while (this.pending.length > 0) {
      const list = this.pending;
      this.pending = [];
      for (const [offset, length] of list) {
        const first = Math.floor(offset / this.cs);
        const last = Math.floor((offset + length - 1) / this.cs);
        for (let ci = first; ci <= last; ci++) await this.update(ci, -1);
      }
    }
  }
}
