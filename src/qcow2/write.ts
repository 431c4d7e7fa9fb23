// The qcow2 write engine: guest writes with allocation and copy-on-write, zero writes, discards,
// compressed writes, flush (the one routine that owns the metadata write order), resize.
//
// Order on storage (QEMU's cache dependencies, enforced by writeOut): data before the L2 entries
// naming it; refcount blocks (increments) before the refcount table, the L2 tables and the L1;
// L2 tables before the L1 entries naming them; a relocated table before the header naming it;
// references dropped (L2/L1 written) before the refcounts are decremented.

import { readFullZeroFill, type Storage } from '../io/storage.js';
import type { WriteIo } from '../image.js';
import { settleAll } from '../async.js';
import { QimgError, UnsupportedError, UsageError } from '../errors.js';
import type { Qcow2Header } from './header.js';
import { serializeHeader } from './header-write.js';
import {
  AUTOCLEAR_BITMAPS, AUTOCLEAR_DATA_FILE_RAW, COMPAT_LAZY_REFCOUNTS, COMPRESSED_HI, COPIED_HI, INCOMPAT_DIRTY,
  SUBCLUSTERS_PER_CLUSTER, TWO_POW_32,
} from './layout.js';
import { decodeCompressed, standardHostOffset, type L2Geometry } from './l2-entry.js';
import type { MetaCache } from './cache.js';
import type { L1Table } from './l1.js';
import type { Refcounts } from './allocator.js';
import { getCodec } from './compression.js';
import { writeZeroesRange } from '../sparse/extents.js';
import { isZero, zeroBuffer } from '../io/zero.js';
import { clusterKind, ClusterKind, cowSpan, type ClusterPlan } from './cow.js';
import type { BitmapTracker } from './bitmaps-write.js';
import type { BitmapStoreHost } from './bitmaps-resize.js';

/** Extended L2: all 32 subclusters read as zeros (zero bits are the bitmap's high word). */
const ALL_ONES = 0xffffffff;
/** Deferred frees above this many ranges are applied at the end of the operation. */
const MAX_PENDING_FREES = 4096;
/** QEMU's INT_MAX: preallocate_co handles at most this many bytes (cluster aligned) per allocation request. */
const INT_MAX = 2 ** 31 - 1;
/** QCOW2 request limit per allocation (QEMU's BDRV_REQUEST_MAX_BYTES). */
const REQUEST_MAX_BYTES = Math.floor(INT_MAX / 512) * 512 - 4096 + 512;

export type Preallocation = 'off' | 'metadata' | 'falloc' | 'full';

/** What the generic layer gives a write (its own read for copy-on-write, the chain's zero status): src/image.ts. */
export type { WriteIo };

/** The driver state the writer works on (Qcow2Driver implements it). */
export interface WriterHost {
  readonly storage: Storage;
  readonly header: Qcow2Header;
  readonly geometry: L2Geometry;
  readonly clusterSize: number;
  readonly l1: L1Table;
  readonly l2Cache: MetaCache;
  virtualSize: number;
  dataFile(): Promise<Storage>;
  /** Forgets decompressed clusters (the guest data changed). */
  invalidateReadCaches(): void;
}

interface Entry {
  hi: number;
  lo: number;
  bHi: number;
  bLo: number;
}

/** A data write issued and not yet finished: its host range on the data file, settled never rejecting. */
interface Inflight {
  start: number;
  end: number;
  settled: Promise<void>;
}

export class Qcow2Writer {
  private readonly d: WriterHost;
  private readonly refcounts: Refcounts;
  private readonly cs: number;
  private readonly sc: number;
  private readonly g: L2Geometry;
  private lock: Promise<unknown> = Promise.resolve();
  /**
   * Guest data writes run outside the lock: a write plans, allocates, issues its data writes and
   * links the clusters in the in-memory L2 table, then the next queued operation starts while the
   * data is still being written (the file system gets the next write without a gap; convert keeps
   * guest order because calls are queued in call order). Metadata never reaches the disk before
   * the data it names: every write-out first waits for these (drain), and so does every other
   * operation (zeroing, discards, compression, resize, flush, close may free or reuse clusters).
   * A data write that fails after its clusters were linked poisons the writer (`failed`): nothing
   * naming it is ever written out, so the file keeps its last consistent metadata.
   */
  private readonly inflight = new Set<Inflight>();
  private started = false;
  /** This writer set the dirty bit (lazy refcounts) and clears it on a clean close. */
  private dirtySetHere = false;
  private headerDirty = false;
  private failed: unknown = null;

  private readonly bitmaps: BitmapTracker | null;

  constructor(host: WriterHost, refcounts: Refcounts, bitmaps: BitmapTracker | null = null) {
    this.d = host;
    this.refcounts = refcounts;
    this.bitmaps = bitmaps;
    this.g = host.geometry;
    this.cs = host.clusterSize;
    this.sc = this.g.extendedL2 ? this.cs / SUBCLUSTERS_PER_CLUSTER : this.cs;
    refcounts.onFreed = (off) => host.l2Cache.discard(off);
  }

  /** Runs fn alone (writes are serialised; reads are not). */
  private exclusive<T>(fn: () => Promise<T>): Promise<T> {
    const run = this.lock.then(fn, fn);
    this.lock = run.catch(() => undefined);
    return run;
  }

  /** Runs fn alone with no data write in flight before or after it. */
  private exclusiveDrained<T>(fn: () => Promise<T>): Promise<T> {
    return this.exclusive(async () => {
      await this.drain();
      try {
        return await fn();
      } finally {
        await this.drain();
      }
    });
  }

  /** Waits until no data write is in flight; throws if one of them failed (see `inflight`). */
  private async drain(): Promise<void> {
    while (this.inflight.size > 0) await Promise.all([...this.inflight].map((w) => w.settled));
    if (this.failed) throw this.failed;
  }

  /**
   * Issues one data write at host (after any in-flight write it overlaps, so the later one wins)
   * and tracks it until it finishes. Several buffers go out with one pwritev where the storage
   * has it, else joined into one.
   */
  private async issue(storage: Storage, buf: Uint8Array | Uint8Array[], host: number): Promise<{ done: Promise<void> }> {
    const end = host + byteLength(buf);
    for (const w of this.inflight) if (w.start < end && host < w.end) await w.settled;
    const p = !Array.isArray(buf) ? storage.write(buf, host) : storage.writev ? storage.writev(buf, host) : storage.write(concat(buf), host);
    const w: Inflight = {
      start: host,
      end,
      settled: p.then(
        () => {
          this.inflight.delete(w);
        },
        (e: unknown) => {
          this.failed ??= e;
          this.inflight.delete(w);
        },
      ),
    };
    this.inflight.add(w);
    // Wrapped: an async function's result would adopt (wait for) a bare promise.
    return { done: p };
  }

  // ------------------------------------------------------------------ public operations

  write(offset: number, data: Uint8Array, io: WriteIo): Promise<void> {
    let own: Promise<void>[] = [];
    return this.exclusive(async () => {
      await this.begin();
      this.bitmaps?.note(offset, data.length);
      own = await this.writeRange(offset, data, io);
      await this.afterOp();
    }).then(() => settleAll(own));
  }

  writeZeroes(offset: number, length: number, mayUnmap: boolean, io: WriteIo): Promise<void> {
    return this.exclusiveDrained(async () => {
      await this.begin();
      this.bitmaps?.note(offset, length);
      await this.zeroRange(offset, length, mayUnmap, io);
      await this.afterOp();
    });
  }

  discard(offset: number, length: number, io: WriteIo): Promise<void> {
    return this.exclusiveDrained(async () => {
      // Without the zero flag (v2), discarding would expose the backing file (qcow2_co_pdiscard).
      if (this.d.header.version < 3 && io.hasBacking) return;
      const cs = this.cs;
      const start = Math.ceil(offset / cs) * cs;
      let end = Math.floor((offset + length) / cs) * cs;
      // The partial last cluster counts when the range runs to the disk's end.
      if (offset + length === this.d.virtualSize) end = this.d.virtualSize;
      if (start >= end) return;
      await this.begin();
      this.bitmaps?.note(start, end - start);
      await this.forClustersPerL2(start, end, (c, n) => this.discardClusters(c, n, io, false));
      await this.afterOp();
    });
  }

  /**
   * Whole clusters compressed (the last may be partial at the disk's end); compression runs in
   * parallel outside the lock, but the call takes its place in the write queue at once (before
   * any await): calls write out in the order they were made, so a caller can issue the next
   * request's writeCompressed without waiting for the previous one (convert keeps every core
   * compressing while clusters still land in guest order).
   */
  writeCompressed(offset: number, data: Uint8Array, io: WriteIo): Promise<void> {
    const cs = this.cs;
    if (this.g.hasDataFile) return Promise.reject(new UnsupportedError('Compressed writes are not supported with an external data file'));
    if (offset % cs !== 0) return Promise.reject(new UsageError(`Compressed write at ${offset} is not cluster aligned`));
    if (data.length % cs !== 0 && offset + data.length !== this.d.virtualSize) {
      return Promise.reject(new UsageError(`Compressed write of ${data.length} bytes must cover whole clusters (or end at the disk's end)`));
    }
    const compressing = getCodec(this.d.header.compressionType === 1 ? 'zstd' : 'zlib').then((codec) => {
      const chunks: Uint8Array[] = [];
      for (let pos = 0; pos < data.length; pos += cs) {
        let chunk = data.subarray(pos, Math.min(data.length, pos + cs));
        if (chunk.length < cs) {
          const padded = new Uint8Array(cs);
          padded.set(chunk);
          chunk = padded;
        }
        chunks.push(chunk);
      }
      return codec.compressMany(chunks, cs - 1);
    });
    compressing.catch(() => undefined); // reported by the queued operation below
    let own: Promise<void>[] = [];
    return this.exclusive(async () => {
      const compressed = await compressing;
      await this.begin();
      this.bitmaps?.note(offset, data.length);
      let k = 0;
      while (k < compressed.length) {
        let j = k;
        while (j < compressed.length && compressed[j]) j++;
        if (j > k) {
          own.push(...(await this.writeCompressedClusters(offset + k * cs, compressed.slice(k, j) as Uint8Array[])));
          k = j;
        } else {
          // Does not fit in cluster_size - 1: stored uncompressed.
          const plain = data.subarray(k * cs, Math.min(data.length, (k + 1) * cs));
          own.push(...(await this.writeRange(offset + k * cs, plain, io)));
          k++;
        }
      }
      await this.afterOp();
    }).then(() => settleAll(own));
  }

  flush(): Promise<void> {
    return this.exclusiveDrained(async () => {
      if (!this.started) return;
      await this.syncAndWriteOut();
      await this.d.storage.flush();
      const data = await this.d.dataFile();
      if (data !== this.d.storage) await data.flush();
    });
  }

  /**
   * Runs fn alone with every change written out and flushed; fn commits metadata of its own
   * (internal snapshots, src/qcow2/snapshot-write.ts), after which the refcounts are read again
   * from the header fields it leaves in the driver's header.
   */
  offline<T>(fn: () => Promise<T>): Promise<T> {
    return this.exclusiveDrained(async () => {
      if (this.failed) throw this.failed;
      if (this.started) {
        await this.syncAndWriteOut();
        await this.d.storage.flush();
      }
      try {
        return await fn();
      } finally {
        const h = this.d.header;
        await this.refcounts.reload(h.refcountTableOffset, h.refcountTableClusters);
      }
    });
  }

  /** Flushes and, after a clean flush, clears the dirty bit this writer set (lazy refcounts). */
  close(): Promise<void> {
    return this.exclusiveDrained(async () => {
      if (!this.started) return;
      await this.syncAndWriteOut();
      const data = await this.d.dataFile();
      if (data !== this.d.storage) await data.flush();
      await this.d.storage.flush();
      if (this.bitmaps) {
        await this.bitmaps.end();
        await this.d.storage.flush();
      }
      if (this.dirtySetHere) {
        this.d.header.incompatibleFeatures &= ~INCOMPAT_DIRTY;
        await this.writeHeader();
        await this.d.storage.flush();
        this.dirtySetHere = false;
      }
    });
  }

  /**
   * Changes the virtual size. Persistent bitmaps are resized as qemu-img resizes them (see
   * src/qcow2/bitmaps-resize.ts), also when the size stays the same; a warning QEMU would print
   * on close (bitmaps it could not store) goes to onWarning.
   */
  resize(newSize: number, shrink: boolean, io: WriteIo, preallocation: Preallocation = 'off',
    onWarning: (message: string) => void = () => undefined): Promise<void> {
    return this.exclusiveDrained(async () => {
      const old = this.d.virtualSize;
      if (newSize % 512 !== 0) throw new UsageError('The new size must be a multiple of 512');
      const tracker = this.bitmaps?.hasBitmaps ? this.bitmaps : null;
      if (newSize === old && !tracker) return;
      if (newSize < old && !shrink) {
        throw new UsageError('Use the --shrink option to perform a shrink operation.');
      }
      // QEMU 7.2 qcow2_co_truncate: v2 snapshots carry no disk size.
      if (this.d.header.nbSnapshots > 0 && this.d.header.version < 3) {
        throw new UnsupportedError("Can't resize a v2 image which has snapshots");
      }
      const bitmaps = tracker ? await tracker.checkResize(old) : [];
      await this.begin();
      try {
        if (tracker) {
          // Bits of writes made earlier through this writer reach the bitmap data first.
          await this.syncAndWriteOut();
          await tracker.beginResize(this.bitmapHost(), bitmaps);
        }
        if (newSize !== old) await this.resizeImage(old, newSize, io, preallocation);
        if (tracker) {
          const lost = await tracker.finishResize(this.bitmapHost(), bitmaps, old, newSize);
          // QEMU's words when it closes the image; the file's name stands for the node's.
          if (lost) onWarning(`Lost persistent bitmaps during inactivation of node '${this.d.storage.name}': ${lost}`);
          // Frees left by a refcount table that grew for the new clusters.
          await this.writeOut();
          await this.d.storage.flush();
        }
      } catch (e) {
        // Bitmaps marked in_use above stay so: their tables may no longer fit the disk.
        tracker?.abandon();
        throw e;
      }
    });
  }

  private bitmapHost(): BitmapStoreHost {
    return { storage: this.d.storage, header: this.d.header, clusterSize: this.cs, refcounts: this.refcounts, writeHeader: () => this.writeHeader() };
  }

  /** qcow2_co_truncate's work on the L1/L2 tables, data clusters and header. */
  private async resizeImage(old: number, newSize: number, io: WriteIo, preallocation: Preallocation): Promise<void> {
    const g = this.g;
    const span = this.cs * g.l2Entries;
    if (newSize > old) {
      const need = Math.ceil(newSize / span);
      if (need > this.d.l1.size) await this.growL1(need);
      let mode = preallocation;
      // As QEMU: a raw external data file keeps its L2 tables fully allocated.
      if (mode === 'off' && g.hasDataFile && (this.d.header.autoclearFeatures & AUTOCLEAR_DATA_FILE_RAW) !== 0n) mode = 'metadata';
      // bdrv_co_truncate: a backing file reaching past the old end would show through the new
      // range (unallocated, or preallocated with no data yet), so QEMU asks for it to be zero-filled.
      // Unknown backing size: assume it reaches (zeros either way, at worst more zero clusters).
      const zeroFill = io.hasBacking && (io.backingSize ?? Infinity) > old;
      let zeroFillLeft = zeroFill;
      // qcow2_grow_l1_table writes the new table and frees the old one before anything else is
      // allocated (preallocation, or L2 tables for the zero-fill, may reuse its clusters).
      if (mode !== 'off' || zeroFill) await this.writeOut();
      if (mode !== 'off') {
        if (mode === 'metadata' || g.hasDataFile) await this.preallocateMetadata(old, newSize, mode, io);
        else {
          // The file part of the truncate zero-fills the new data clusters itself (a grown file reads
          // zeros), so their subclusters are linked as allocated instead of zeroed afterwards.
          await this.preallocateFile(old, newSize, mode, io, zeroFill);
          zeroFillLeft = false;
        }
      }
      if (mode === 'off' && g.hasDataFile) {
        // qcow2_co_truncate grows an external data file to the new size with the image.
        const data = await this.d.dataFile();
        if ((await data.size()) < newSize) await data.truncate(newSize);
      }
      if (zeroFillLeft) await this.zeroFillGrown(old, newSize, io);
      else if (!zeroFill) await this.zeroStaleTail(old, newSize, io);
      this.d.virtualSize = newSize;
      this.headerDirty = true;
    } else {
      const from = Math.ceil(newSize / this.cs) * this.cs;
      if (from < old) {
        await this.forClustersPerL2(from, old, (c, n) => this.discardClusters(c, n, io, true));
      }
      // L2 tables wholly past the end go too.
      const keep = Math.ceil(newSize / span);
      for (const l2 of this.d.l1.clearFrom(keep)) this.refcounts.freeLater(l2, this.cs);
      this.d.virtualSize = newSize;
      this.headerDirty = true;
    }
    this.d.invalidateReadCaches();
    await this.writeOut();
    await this.d.storage.flush();
    if (newSize < old) {
      // As qcow2_co_truncate: the file is cut after its last cluster still in use (with the frees
      // above written), so what the shrink freed at the end is given back to the host.
      const fileSize = await this.d.storage.size();
      const end = ((await this.refcounts.lastUsedCluster(fileSize)) + 1) * this.cs;
      if (end > 0 && end < fileSize) await this.d.storage.truncate(end);
    }
  }

  // ------------------------------------------------------------------ preallocation (resize)

  /**
   * QEMU's preallocate_co over guest [offset, end): allocate L2 tables and data clusters as a write
   * would (reusing COPIED clusters, new ones contiguous where free), copy-on-write the partial
   * clusters' other bytes, link them, and extend the data file to the last allocated byte.
   */
  private async preallocateMetadata(offset: number, end: number, mode: Preallocation, io: WriteIo): Promise<void> {
    const chunkMax = Math.floor(INT_MAX / this.cs) * this.cs;
    let bytes = end - offset;
    let hostOffset = 0;
    let curBytes = 0;
    while (bytes > 0) {
      curBytes = Math.min(bytes, chunkMax);
      const r = await this.allocHostOffset(offset, curBytes, io);
      hostOffset = r.hostOffset;
      curBytes = r.bytes;
      bytes -= curBytes;
      offset += curBytes;
    }
    const storage = await this.d.dataFile();
    if (hostOffset + curBytes > (await storage.size())) {
      await growFile(storage, hostOffset + curBytes, mode === 'metadata' ? 'off' : mode);
    }
  }

  /** qcow2_alloc_host_offset + qcow2_handle_l2meta for one preallocation request (no guest data). */
  private async allocHostOffset(offset: number, bytes: number, io: WriteIo): Promise<{ hostOffset: number; bytes: number }> {
    const cs = this.cs;
    const g = this.g;
    const INV = -1;
    let start = offset;
    let remaining = bytes;
    let clusterOffset = INV;
    let hostOffset = INV;
    let cur = 0;
    const metas: { guest: number; alloc: number; n: number; headFrom: number; headLen: number; cowFrom: number; cowTo: number }[] = [];
    for (;;) {
      if (hostOffset === INV && clusterOffset !== INV) hostOffset = clusterOffset;
      start += cur;
      remaining -= cur;
      if (clusterOffset !== INV) clusterOffset += cur;
      if (remaining === 0) break;
      cur = remaining;
      const guestCluster = Math.floor(start / cs);
      const inCluster = start % cs;
      const l1Index = Math.floor(guestCluster / g.l2Entries);
      // handle_copied: the L2 table (allocated or un-shared first), then a cluster that may be written in place.
      const { table } = await this.ensureL2(l1Index);
      const idx = guestCluster - l1Index * g.l2Entries;
      const e = this.readEntry(table, idx);
      const kind = clusterKind(g, e.hi, e.lo);
      const reusable = (kind === ClusterKind.Normal || kind === ClusterKind.ZeroAlloc) && (e.hi & COPIED_HI) !== 0;
      if (reusable) {
        const oldHost = g.hasDataFile ? guestCluster * cs : standardHostOffset(e.hi, e.lo);
        if (clusterOffset !== INV && oldHost + inCluster !== clusterOffset) break;
        clusterOffset = oldHost + inCluster;
        cur = Math.min(cur, cs - inCluster);
        continue;
      }
      // handle_alloc: up to the end of the L2 table, stopping before a cluster that can be reused.
      let nb = Math.ceil((inCluster + cur) / cs);
      nb = Math.min(nb, g.l2Entries - idx, Math.floor(REQUEST_MAX_BYTES / cs));
      for (let k = 1; k < nb; k++) {
        const ek = this.readEntry(table, idx + k);
        const kk = clusterKind(g, ek.hi, ek.lo);
        if ((kk === ClusterKind.Normal || kk === ClusterKind.ZeroAlloc) && (ek.hi & COPIED_HI) !== 0) {
          nb = k;
          break;
        }
      }
      let alloc: number;
      if (g.hasDataFile) {
        alloc = guestCluster;
      } else if (clusterOffset === INV) {
        alloc = (await this.refcounts.allocClusters(nb)) / cs;
      } else {
        alloc = Math.floor(clusterOffset / cs);
        nb = await this.refcounts.allocClustersAt(alloc, nb);
      }
      if (nb === 0) {
        cur = 0;
        break;
      }
      const nbBytes = Math.min(cur + inCluster, nb * cs);
      cur = Math.min(cur, nbBytes - inCluster);
      clusterOffset = alloc * cs + inCluster;
      const cowFrom = inCluster + cur;
      const sc = this.sc;
      // Copy-on-write regions: the head of the first cluster (what the guest reads there now) and the tail past the request.
      // QEMU's calculate_l2_meta: with subclusters the head copy starts at the subcluster holding
      // the request's start (or the first allocated one before it); the subclusters before it stay
      // as they were in the bitmap, so nothing of theirs is copied.
      let headFrom = 0;
      if (g.extendedL2 && kind !== ClusterKind.Compressed) {
        const scIndex = Math.floor(inCluster / sc);
        const firstAlloc = kind === ClusterKind.Normal && e.bLo !== 0 ? 31 - Math.clz32(e.bLo & -e.bLo) : 32;
        headFrom = Math.min(scIndex, firstAlloc) * sc;
      }
      metas.push({ guest: guestCluster, alloc, n: nb, headFrom, headLen: inCluster - headFrom, cowFrom, cowTo: Math.ceil(cowFrom / sc) * sc });
    }
    const storage = await this.d.dataFile();
    // Without subclusters the new clusters' bytes are the guest's at once: those reused from freed
    // space inside the file may hold old data (QEMU 7.2 shows it; qimg zeroes it, see scrubStale).
    const fileEnd = !g.extendedL2 && !g.hasDataFile ? await storage.size() : 0;
    for (const m of metas) {
      const headLen = m.headLen;
      const host = m.alloc * cs;
      await this.scrubStale(storage, host + m.headFrom + headLen, Math.min(host + m.n * cs, fileEnd));
      // perform_cow: the start region from the guest's current view, the end region (past the disk) as zeros.
      if (headLen > 0) {
        const head = new Uint8Array(headLen);
        await io.readGuest(head, m.guest * cs + m.headFrom);
        await storage.write(head, host + m.headFrom);
      }
      if (m.cowTo > m.cowFrom) await storage.write(zeroBuffer(m.cowTo - m.cowFrom), host + m.cowFrom);
      await this.linkClusters(m.guest, host, m.n);
    }
    return { hostOffset, bytes: bytes - remaining };
  }

  /**
   * qcow2_alloc_cluster_link_l2: entries name the new clusters; old references go. Preallocation
   * keeps the extended-L2 bitmaps (the subclusters still read as before: zeros, or the backing
   * file); `allocated` (clusters whose data reads as zeros already) marks every subcluster allocated.
   */
  private async linkClusters(guestCluster: number, host: number, n: number, allocated = false): Promise<void> {
    const g = this.g;
    const l1Index = Math.floor(guestCluster / g.l2Entries);
    const { offset: l2Offset, table } = await this.ensureL2(l1Index);
    for (let k = 0; k < n; k++) {
      const idx = guestCluster + k - l1Index * g.l2Entries;
      const old = this.readEntry(table, idx);
      const bHi = allocated ? 0 : old.bHi;
      const bLo = allocated && g.extendedL2 ? ALL_ONES : old.bLo;
      const next = this.normalEntry(g.hasDataFile ? (guestCluster + k) * this.cs : host + k * this.cs, bHi, bLo);
      this.writeEntry(table, idx, next);
      if (old.hi !== 0 || old.lo !== 0) {
        if (!(g.hasDataFile && standardHostOffset(old.hi, old.lo) === (guestCluster + k) * this.cs)) this.freeAny(old);
      }
    }
    this.d.l2Cache.markDirty(l2Offset, table);
    // QEMU frees the old clusters at once (the next allocation may reuse them): write the tables that dropped them first.
    if (this.refcounts.pendingFrees > 0) await this.writeOut();
  }

  /**
   * The falloc/full branch of qcow2_co_truncate (no data file): refcount structures for the new
   * area at the end of the used file, the data clusters right after them (also replacing the old
   * partial last cluster), the file grown with the mode, then the L2 entries linked.
   */
  private async preallocateFile(old: number, newSize: number, mode: 'falloc' | 'full', io: WriteIo, allocated: boolean): Promise<void> {
    const cs = this.cs;
    const g = this.g;
    const storage = this.d.storage;
    const fileSize = await storage.size();
    const last = await this.refcounts.lastUsedCluster(fileSize);
    const oldFileClusters = last >= 0 ? last + 1 : Math.ceil(fileSize / cs);
    const firstGuest = Math.floor(old / cs);
    const nbData = Math.ceil(newSize / cs) - firstGuest;
    const nbL2 = Math.ceil(nbData / g.l2Entries) + 1;
    const allocationStart = await this.refcounts.refcountArea(oldFileClusters, nbData + nbL2);
    // qcow2_refcount_area writes the new structures and switches the header at once; the old table is freed.
    await this.writeOut();
    const got = await this.refcounts.allocClustersAt(allocationStart, nbData);
    if (got !== nbData) throw new QimgError('IO', 'Failed to allocate data clusters');
    // Growing the file zeroes only past its old end; the data clusters below it are scrubbed when
    // the guest sees them (no subclusters, or linked as allocated).
    if (!g.extendedL2 || allocated) await this.scrubStale(storage, allocationStart * cs + (old % cs), Math.min((allocationStart + nbData) * cs, fileSize));
    await growFile(storage, (allocationStart + nbData) * cs, mode);
    let guest = firstGuest;
    let host = allocationStart * cs;
    let left = nbData;
    let headLen = old % cs;
    while (left > 0) {
      const n = Math.min(left, g.l2Entries - (guest % g.l2Entries));
      if (headLen > 0) {
        const head = new Uint8Array(headLen);
        await io.readGuest(head, guest * cs);
        await storage.write(head, host);
        headLen = 0;
      }
      await this.linkClusters(guest, host, n, allocated);
      guest += n;
      host += n * cs;
      left -= n;
    }
  }

  /**
   * Zeroes what host range [from, to) holds where it is not zero already: clusters a resize
   * preallocates from freed space may hold old data that would become guest data (QEMU 7.2 leaves
   * it; the rule here is that a grown range reads as zeros). Read and written a chunk at a time.
   */
  private async scrubStale(storage: Storage, from: number, to: number): Promise<void> {
    if (to <= from) return;
    const chunk = Math.min(to - from, 1 << 20);
    const buf = new Uint8Array(chunk);
    for (let pos = from; pos < to; pos += chunk) {
      const view = buf.subarray(0, Math.min(chunk, to - pos));
      await readFullZeroFill(storage, view, pos);
      if (!isZero(view)) await storage.write(zeroBuffer(view.length), pos);
    }
  }

  /**
   * The zero-fill of qcow2_co_truncate for a grown range the backing file reaches into: zero
   * (sub)clusters from the first subcluster boundary at or after the old end (zero flags even
   * on the clusters just preallocated, which keep their host clusters), then zeros written as
   * data into the rest of the subcluster holding the old end. Without the zero flag (v2) QEMU
   * refuses, after any preallocation, and the size stays.
   */
  private async zeroFillGrown(old: number, newSize: number, io: WriteIo): Promise<void> {
    const cs = this.cs;
    const zeroStart = Math.ceil(old / this.sc) * this.sc;
    if (newSize > zeroStart) {
      if (this.d.header.version < 3) throw new UnsupportedError('Failed to zero out new clusters: Operation not supported');
      const headEnd = Math.min(newSize, Math.ceil(zeroStart / cs) * cs);
      if (headEnd > zeroStart) await this.zeroSubclusters(zeroStart, headEnd);
      if (newSize > headEnd) await this.forClustersPerL2(headEnd, newSize, (c, n) => this.zeroClusters(c, n, false));
    }
    const headLen = Math.min(zeroStart, newSize) - old;
    if (headLen > 0) await settleAll(await this.writeRange(old, new Uint8Array(headLen), io));
  }

  /** QEMU's zero_l2_subclusters: zero bits for the subclusters of [from, to) inside one cluster; a compressed cluster cannot be split. */
  private async zeroSubclusters(from: number, to: number): Promise<void> {
    const cs = this.cs;
    const c = Math.floor(from / cs);
    const l1Index = Math.floor(c / this.g.l2Entries);
    const { offset: l2Offset, table } = await this.ensureL2(l1Index);
    const idx = c - l1Index * this.g.l2Entries;
    const e = this.readEntry(table, idx);
    if (clusterKind(this.g, e.hi, e.lo) === ClusterKind.Compressed) {
      throw new UnsupportedError('Failed to zero out new clusters: Operation not supported');
    }
    const s0 = (from - c * cs) / this.sc;
    const mask = rangeMask(s0, s0 + Math.ceil((to - from) / this.sc));
    const next = { ...e, bHi: (e.bHi | mask) >>> 0, bLo: (e.bLo & ~mask) >>> 0 };
    if (next.bHi === e.bHi && next.bLo === e.bLo) return;
    this.writeEntry(table, idx, next);
    this.d.l2Cache.markDirty(l2Offset, table);
  }

  /**
   * Bytes past the old end inside its last cluster that do not read as zeros (left there by a
   * shrink into the cluster) are zeroed before the image grows over them. QEMU 7.2 shows them
   * again; qimg keeps the rule that a grown range reads as zeros. Nothing changes when the tail
   * already reads as zeros, the usual case, so the metadata stays what qemu-img writes.
   */
  private async zeroStaleTail(old: number, newSize: number, io: WriteIo): Promise<void> {
    const end = Math.min(newSize, Math.ceil(old / this.cs) * this.cs);
    if (end <= old) return;
    const tail = new Uint8Array(end - old);
    // The guest's view of the tail, as it would read once grown (reads stop at the virtual size).
    this.d.virtualSize = end;
    try {
      await io.readGuest(tail, old);
      if (!isZero(tail)) await this.zeroRange(old, end - old, false, io);
    } finally {
      this.d.virtualSize = old;
    }
  }

  // ------------------------------------------------------------------ state and write-out

  /** First mutation: the header changes QEMU makes when it starts writing (lazy dirty bit, unknown autoclear bits). */
  private async begin(): Promise<void> {
    if (this.failed) throw this.failed;
    this.d.invalidateReadCaches();
    if (this.started) return;
    this.started = true;
    const h = this.d.header;
    let rewrite = false;
    if (h.version === 3) {
      const known = AUTOCLEAR_BITMAPS | AUTOCLEAR_DATA_FILE_RAW;
      if ((h.autoclearFeatures & ~known) !== 0n) {
        // The spec: a writer must clear the autoclear bits it does not know.
        h.autoclearFeatures &= known;
        rewrite = true;
      }
      if ((h.compatibleFeatures & COMPAT_LAZY_REFCOUNTS) !== 0n && (h.incompatibleFeatures & INCOMPAT_DIRTY) === 0n) {
        h.incompatibleFeatures |= INCOMPAT_DIRTY;
        this.dirtySetHere = true;
        rewrite = true;
      }
    }
    if (rewrite) {
      await this.writeHeader();
      await this.d.storage.flush();
    }
    await this.bitmaps?.begin();
  }

  /** Bitmap bits (their new data clusters), then the metadata write-out, then the bitmap tables naming the new clusters. */
  private async syncAndWriteOut(): Promise<void> {
    const writeTables = this.bitmaps ? await this.bitmaps.sync(this.refcounts) : null;
    await this.writeOut();
    if (writeTables) await writeTables();
  }

  private async afterOp(): Promise<void> {
    if (this.d.l2Cache.overBound || this.refcounts.blocks.overBound || this.refcounts.pendingFrees > MAX_PENDING_FREES) {
      await this.writeOut();
    }
  }

  private async writeHeader(): Promise<void> {
    const h = this.d.header;
    await this.d.storage.write(serializeHeader({ ...h, size: Math.floor(h.size / 512) * 512 }), 0);
  }

  /** The one routine that writes metadata, in dependency order. */
  private async writeOut(): Promise<void> {
    await this.drain();
    try {
      const h = this.d.header;
      await this.refcounts.blocks.writeDirty();
      await this.refcounts.writeTable(async (offset, clusters) => {
        h.refcountTableOffset = offset;
        h.refcountTableClusters = clusters;
        await this.writeHeader();
      });
      await this.d.l2Cache.writeDirty();
      await this.d.l1.writeOut(this.d.storage, async (offset, size) => {
        h.l1TableOffset = offset;
        h.l1Size = size;
        if (this.d.virtualSize > h.size) h.size = this.d.virtualSize;
        await this.writeHeader();
      });
      if (this.headerDirty || h.size !== this.d.virtualSize) {
        h.size = this.d.virtualSize;
        this.headerDirty = false;
        await this.writeHeader();
      }
      if (this.refcounts.pendingFrees > 0) {
        await this.refcounts.applyFrees();
        await this.refcounts.blocks.writeDirty();
      }
    } catch (e) {
      // Metadata in memory no longer matches the file in a known way: refuse further writes.
      this.failed = e;
      throw e;
    }
  }

  // ------------------------------------------------------------------ L1 / L2

  private async growL1(size: number): Promise<void> {
    const l1 = this.d.l1;
    const bytes = Math.ceil((size * 8) / this.cs) * this.cs;
    const oldOffset = l1.offset;
    const oldBytes = Math.ceil((l1.size * 8) / this.cs) * this.cs;
    const wasOnDisk = !l1.relocated;
    const newOffset = await this.refcounts.allocClusters(bytes / this.cs);
    l1.grow(size, newOffset, this.cs);
    if (oldBytes > 0 && oldOffset > 0) {
      if (wasOnDisk) this.refcounts.freeLater(oldOffset, oldBytes);
      else for (let k = 0; k < oldBytes / this.cs; k++) await this.refcounts.update(oldOffset / this.cs + k, -1);
    }
  }

  /** The L2 table for l1Index, ready to be changed: allocated, or copied when shared (QEMU's l2_allocate). */
  private async ensureL2(l1Index: number): Promise<{ offset: number; table: DataView }> {
    const l1 = this.d.l1;
    if (l1Index >= l1.size) throw new QimgError('FORMAT', `L1 index ${l1Index} is past the L1 table (${l1.size} entries)`);
    const old = l1.l2Offset(l1Index);
    if (old < 0 || old % this.cs !== 0) {
      throw new QimgError('FORMAT', `L2 table offset 0x${old.toString(16)} unaligned (L1 index: 0x${l1Index.toString(16)})`);
    }
    if (old !== 0 && l1.copied(l1Index)) return { offset: old, table: await this.d.l2Cache.get(old) };
    const offset = await this.refcounts.allocClusters(1);
    let content: Uint8Array | undefined;
    if (old !== 0) {
      const t = await this.d.l2Cache.get(old);
      content = new Uint8Array(t.buffer, t.byteOffset, this.cs).slice();
    }
    const table = this.d.l2Cache.install(offset, content);
    l1.set(l1Index, offset, true);
    if (old !== 0) this.refcounts.freeLater(old, this.cs);
    return { offset, table };
  }

  /** The L2 table for l1Index if it exists (no allocation). */
  private async peekL2(l1Index: number): Promise<DataView | null> {
    const off = this.d.l1.l2Offset(l1Index);
    return off > 0 ? this.d.l2Cache.get(off) : null;
  }

  private readEntry(table: DataView, idx: number): Entry {
    const at = idx * this.g.entryBytes;
    return {
      hi: table.getUint32(at),
      lo: table.getUint32(at + 4),
      bHi: this.g.extendedL2 ? table.getUint32(at + 8) : 0,
      bLo: this.g.extendedL2 ? table.getUint32(at + 12) : 0,
    };
  }

  private writeEntry(table: DataView, idx: number, e: Entry): void {
    const at = idx * this.g.entryBytes;
    table.setUint32(at, e.hi);
    table.setUint32(at + 4, e.lo);
    if (this.g.extendedL2) {
      table.setUint32(at + 8, e.bHi >>> 0);
      table.setUint32(at + 12, e.bLo >>> 0);
    }
  }

  /** A normal entry for host cluster `host` with COPIED set (refcount 1, or an external data file). */
  private normalEntry(host: number, bHi = 0, bLo = 0): Entry {
    return { hi: (Math.floor(host / TWO_POW_32) | COPIED_HI) >>> 0, lo: host >>> 0, bHi, bLo };
  }

  /** Drops the reference an old entry held (QEMU's qcow2_free_any_cluster), once the new entry is written. */
  private freeAny(e: Entry): void {
    if (e.hi & COMPRESSED_HI) {
      const desc = decodeCompressed(this.g, e.hi, e.lo);
      if (desc) {
        const start = desc.hostOffset - (desc.hostOffset % 512);
        this.refcounts.freeLater(start, desc.length + (desc.hostOffset % 512));
      }
      return;
    }
    if (this.g.hasDataFile) return; // data clusters of an external data file are not refcounted
    const host = standardHostOffset(e.hi, e.lo);
    if (host > 0) this.refcounts.freeLater(host, this.cs);
  }

  /** Calls fn(firstCluster, count) for each L2 table's share of the clusters in [start, end) (end may be the partial last cluster's end). */
  private async forClustersPerL2(start: number, end: number, fn: (cluster: number, n: number) => Promise<void>): Promise<void> {
    const cs = this.cs;
    const per = this.g.l2Entries;
    let c = Math.floor(start / cs);
    const last = Math.ceil(end / cs);
    while (c < last) {
      const n = Math.min(last - c, per - (c % per));
      await fn(c, n);
      c += n;
    }
  }

  // ------------------------------------------------------------------ data writes

  /** Plans, allocates, issues and links a guest write; returns the issued data writes (see `inflight`). */
  private async writeRange(offset: number, data: Uint8Array, io: WriteIo): Promise<Promise<void>[]> {
    const span = this.cs * this.g.l2Entries;
    const issued: Promise<void>[] = [];
    let pos = 0;
    while (pos < data.length) {
      const at = offset + pos;
      const end = Math.min(offset + data.length, (Math.floor(at / span) + 1) * span);
      issued.push(...(await this.writeInL2(at, data.subarray(pos, end - offset), io)));
      pos = end - offset;
    }
    return issued;
  }

  /** A write within one L2 table: plan each cluster, allocate new clusters contiguously, write data runs, link. */
  private async writeInL2(offset: number, data: Uint8Array, io: WriteIo): Promise<Promise<void>[]> {
    const cs = this.cs;
    const g = this.g;
    const l1Index = Math.floor(offset / (cs * g.l2Entries));
    const { offset: l2Offset, table } = await this.ensureL2(l1Index);
    const first = Math.floor(offset / cs);
    const last = Math.floor((offset + data.length - 1) / cs);
    const plans: ClusterPlan[] = [];
    let needAlloc = 0;
    for (let c = first; c <= last; c++) {
      const idx = c - l1Index * g.l2Entries;
      const e = this.readEntry(table, idx);
      const kind = clusterKind(g, e.hi, e.lo);
      const oldHost = kind === ClusterKind.Normal || kind === ClusterKind.ZeroAlloc ? standardHostOffset(e.hi, e.lo) : 0;
      const copied = (e.hi & COPIED_HI) !== 0;
      const a = Math.max(offset, c * cs) - c * cs;
      const b = Math.min(offset + data.length, (c + 1) * cs) - c * cs;
      let host = -1;
      if (g.hasDataFile) host = c * cs;
      else if (oldHost > 0 && copied) host = oldHost;
      else needAlloc++;
      plans.push({ cluster: c, idx, a, b, kind, entry: e, inPlace: host >= 0, host, ws: 0, we: 0, bHi: 0, bLo: 0 });
    }
    let allocated = -1;
    if (needAlloc > 0) {
      allocated = await this.refcounts.allocClusters(needAlloc);
      let next = allocated;
      for (const p of plans) {
        if (!p.inPlace) {
          p.host = next;
          next += cs;
        }
      }
    }
    let issued: Promise<void>[];
    try {
      for (const p of plans) cowSpan(p, g, this.sc, Math.min(cs, this.d.virtualSize - p.cluster * cs));
      issued = await this.writeData(plans, offset, data, io);
    } catch (e) {
      // Nothing was issued and nothing names the new clusters yet: give them back.
      if (allocated >= 0) for (let k = 0; k < needAlloc; k++) await this.refcounts.update(allocated / cs + k, -1);
      throw e;
    }
    for (const p of plans) {
      const entry = this.normalEntry(p.host, p.bHi, p.bLo);
      this.writeEntry(table, p.idx, entry);
      if (!p.inPlace) this.freeAny(p.entry);
    }
    this.d.l2Cache.markDirty(l2Offset, table);
    return issued;
  }

  /**
   * Writes the planned spans: clusters adjacent on the host with abutting spans go out as one
   * write. Every copy-on-write read finishes before the first write is issued (a failure then
   * leaves nothing in flight); returns the issued writes, not awaited.
   */
  private async writeData(plans: ClusterPlan[], offset: number, data: Uint8Array, io: WriteIo): Promise<Promise<void>[]> {
    const cs = this.cs;
    const storage = await this.d.dataFile();
    const out: { buf: Uint8Array | Uint8Array[]; host: number; fresh: boolean }[] = [];
    const reads: (() => Promise<void>)[] = [];
    let i = 0;
    while (i < plans.length) {
      let j = i + 1;
      while (j < plans.length && plans[j - 1]!.we === cs && plans[j]!.ws === 0 && plans[j]!.host === plans[j - 1]!.host + cs) j++;
      const run = plans.slice(i, j);
      const head = run[0]!;
      const hostStart = head.host + head.ws;
      const fresh = run.some((p) => !p.inPlace);
      // The run's bytes: the caller's data as views, and only the copy-on-write pieces (and any
      // tail past the image's end) in buffers of their own, so that a write covering whole
      // clusters but for its ends (a convert request not cluster-aligned, say) copies nothing.
      const parts: Uint8Array[] = [];
      const add = (b: Uint8Array): void => {
        const last = parts[parts.length - 1];
        if (last && last.buffer === b.buffer && last.byteOffset + last.length === b.byteOffset) {
          parts[parts.length - 1] = new Uint8Array(b.buffer, last.byteOffset, last.length + b.length);
        } else parts.push(b);
      };
      for (const p of run) {
        const vEnd = Math.min(cs, this.d.virtualSize - p.cluster * cs);
        // Copy-on-write: what the guest reads there now (old data, backing file, zeros, decompressed).
        if (p.ws < p.a) {
          const cow = new Uint8Array(p.a - p.ws);
          reads.push(() => io.readGuest(cow, p.cluster * cs + p.ws));
          add(cow);
        }
        const from = p.cluster * cs + p.a - offset;
        add(data.subarray(from, from + p.b - p.a));
        const tailEnd = Math.min(p.we, vEnd);
        if (p.b < p.we) {
          const cow = new Uint8Array(p.we - p.b);
          if (p.b < tailEnd) reads.push(() => io.readGuest(cow.subarray(0, tailEnd - p.b), p.cluster * cs + p.b));
          add(cow);
        }
      }
      out.push({ buf: parts.length === 1 ? parts[0]! : parts, host: hostStart, fresh });
      i = j;
    }
    // A copy-on-write read may read clusters whose data is still in flight (a compressed cluster
    // just written, say); it starts only when nothing is.
    if (reads.length > 0) {
      await this.drain();
      await settleAll(reads.map((read) => read()));
    }
    const issued: Promise<void>[] = [];
    for (const w of out) {
      // New clusters: reserve the host range first (see Storage.reserveHint; QEMU does the same).
      if (w.fresh) storage.reserveHint?.(w.host, byteLength(w.buf));
      issued.push((await this.issue(storage, w.buf, w.host)).done);
    }
    return issued;
  }

  // ------------------------------------------------------------------ compressed

  /**
   * Compressed clusters for consecutive guest clusters from `guest`: each gets its bytes from the
   * refcounts (packed, as QEMU packs them), the bytes that landed next to each other go out as one
   * write (pwritev where the storage has it), then the L2 entries name them. Returns the issued writes, not awaited.
   */
  private async writeCompressedClusters(guest: number, outs: Uint8Array[]): Promise<Promise<void>[]> {
    const g = this.g;
    const cs = this.cs;
    const placed: { table: DataView; l2Offset: number; idx: number; host: number; out: Uint8Array }[] = [];
    const giveBack = async (): Promise<void> => {
      for (const { host, out } of placed) {
        for (let ci = Math.floor(host / cs); ci <= Math.floor((host + out.length - 1) / cs); ci++) await this.refcounts.update(ci, -1);
      }
    };
    try {
      for (let k = 0; k < outs.length; k++) {
        const c = guest / cs + k;
        const l1Index = Math.floor(c / g.l2Entries);
        const { offset: l2Offset, table } = await this.ensureL2(l1Index);
        const idx = c - l1Index * g.l2Entries;
        const e = this.readEntry(table, idx);
        // As qcow2_alloc_compressed_cluster_offset: compression never overwrites an allocated cluster.
        if (standardHostOffset(e.hi, e.lo) !== 0 || (e.hi & COMPRESSED_HI) !== 0) {
          throw new QimgError('IO', `Could not write compressed cluster at ${c * cs}: Input/output error (the cluster is allocated)`);
        }
        const out = outs[k]!;
        placed.push({ table, l2Offset, idx, host: await this.refcounts.allocBytes(out.length), out });
      }
    } catch (err) {
      await giveBack();
      throw err;
    }
    const issued: Promise<void>[] = [];
    const storage = this.d.storage;
    let i = 0;
    while (i < placed.length) {
      let j = i + 1;
      let length = placed[i]!.out.length;
      while (j < placed.length && placed[j]!.host === placed[i]!.host + length) length += placed[j++]!.out.length;
      const bufs = placed.slice(i, j).map((x) => x.out);
      issued.push((await this.issue(storage, bufs.length > 1 ? bufs : bufs[0]!, placed[i]!.host)).done);
      i = j;
    }
    const shift = 62 - (g.clusterBits - 8);
    for (const { table, l2Offset, idx, host, out } of placed) {
      const sectors = Math.floor((host + out.length - 1) / 512) - Math.floor(host / 512);
      const v = (1n << 62n) | (BigInt(sectors) << BigInt(shift)) | BigInt(host);
      this.writeEntry(table, idx, { hi: Number(v >> 32n) >>> 0, lo: Number(v & 0xffffffffn) >>> 0, bHi: 0, bLo: 0 });
      this.d.l2Cache.markDirty(l2Offset, table);
    }
    return issued;
  }

  // ------------------------------------------------------------------ zeroes and discards

  private async zeroRange(offset: number, length: number, mayUnmap: boolean, io: WriteIo): Promise<void> {
    const cs = this.cs;
    if (this.g.hasDataFile && (this.d.header.autoclearFeatures & AUTOCLEAR_DATA_FILE_RAW) !== 0n) {
      // A raw data file must stay the disk's image: zero it too (QEMU's data_file_is_raw case).
      await writeZeroesRange(await this.d.dataFile(), offset, length);
    }
    const end = offset + length;
    const vsize = this.d.virtualSize;
    const v3 = this.d.header.version >= 3;
    let pos = offset;
    while (pos < end) {
      const c = Math.floor(pos / cs);
      const cStart = c * cs;
      const cEnd = Math.min(cStart + cs, vsize);
      if (pos === cStart && end >= cEnd) {
        // A run of whole clusters (the partial last cluster counts when the range reaches the end).
        let stop = Math.floor(end / cs) * cs;
        if (end >= vsize) stop = vsize;
        if (v3) await this.forClustersPerL2(cStart, stop, (k, n) => this.zeroClusters(k, n, mayUnmap));
        else if (!io.hasBacking) await this.forClustersPerL2(cStart, stop, (k, n) => this.discardClusters(k, n, io, false));
        else await this.writeZeroData(cStart, stop - cStart, io);
        pos = stop;
        continue;
      }
      const partEnd = Math.min(end, cEnd);
      await this.zeroPartial(c, pos - cStart, partEnd - cStart, io);
      pos = partEnd;
    }
  }

  private async writeZeroData(offset: number, length: number, io: WriteIo): Promise<void> {
    const chunk = Math.max(this.cs, 1024 * 1024);
    const zeros = new Uint8Array(Math.min(length, chunk));
    for (let pos = 0; pos < length; pos += zeros.length) {
      await this.writeRange(offset + pos, zeros.subarray(0, Math.min(zeros.length, length - pos)), io);
    }
  }

  /** Zeroes [a, b) of cluster c: whole subclusters get zero bits (extended L2), the rest zero data unless it already reads as zeros. */
  private async zeroPartial(c: number, a: number, b: number, io: WriteIo): Promise<void> {
    const cs = this.cs;
    const g = this.g;
    const l1Index = Math.floor(c / g.l2Entries);
    const idx = c - l1Index * g.l2Entries;
    const peek = await this.peekL2(l1Index);
    const e = peek ? this.readEntry(peek, idx) : { hi: 0, lo: 0, bHi: 0, bLo: 0 };
    const kind = clusterKind(g, e.hi, e.lo);
    const vEnd = Math.min(cs, this.d.virtualSize - c * cs);
    if (kind === ClusterKind.ZeroPlain || kind === ClusterKind.ZeroAlloc) return;
    // An unallocated cluster without a backing file reads as zeros already, but on v3 QEMU still
    // makes it a zero cluster (below): were a backing file named later (rebase), unallocated
    // would show that file's bytes where the guest wrote zeros. v2 has no zero flag.
    if (kind === ClusterKind.Unallocated && !io.hasBacking && this.d.header.version < 3) return;
    if (g.extendedL2 && this.d.header.version >= 3 && kind !== ClusterKind.Compressed) {
      const sc = this.sc;
      const s0 = Math.ceil(a / sc);
      const s1 = b >= vEnd ? Math.ceil(b / sc) : Math.floor(b / sc);
      if (s1 > s0) {
        const { offset: l2Offset, table } = await this.ensureL2(l1Index);
        const cur = this.readEntry(table, idx);
        const mask = rangeMask(s0, s1);
        const next = { ...cur, bHi: (cur.bHi | mask) >>> 0, bLo: (cur.bLo & ~mask) >>> 0 };
        if (next.bHi !== cur.bHi || next.bLo !== cur.bLo) {
          this.writeEntry(table, idx, next);
          this.d.l2Cache.markDirty(l2Offset, table);
        }
      }
      // The unaligned ends of [a, b) in subclusters that are not already zero.
      const cur = this.readEntry(await this.ensureL2(l1Index).then((t) => t.table), idx);
      const isZeroSc = (s: number): boolean => ((cur.bHi >>> s) & 1) === 1;
      const ranges: [number, number][] = s1 > s0 ? [[a, s0 * sc], [Math.min(b, s1 * sc), b]] : [[a, b]];
      for (const [x, y] of ranges) {
        if (y <= x) continue;
        const s = Math.floor(x / sc);
        if (isZeroSc(s) && s === Math.floor((y - 1) / sc)) continue;
        // QEMU's qcow2_co_pwrite_zeroes: an unallocated subcluster whose rest already reads as
        // zeros becomes a zero subcluster instead of zero data.
        const allocated = ((cur.bLo >>> s) & 1) === 1;
        if (s === Math.floor((y - 1) / sc) && !allocated && (s + 1) * sc <= vEnd &&
            (await io.readsAsZero(c * cs + s * sc, x - s * sc)) &&
            (await io.readsAsZero(c * cs + y, (s + 1) * sc - y))) {
          const { offset: l2Offset, table } = await this.ensureL2(l1Index);
          const now = this.readEntry(table, idx);
          const bit = (1 << s) >>> 0;
          this.writeEntry(table, idx, { ...now, bHi: (now.bHi | bit) >>> 0, bLo: (now.bLo & ~bit) >>> 0 });
          this.d.l2Cache.markDirty(l2Offset, table);
          continue;
        }
        await this.writeRange(c * cs + x, new Uint8Array(y - x), io);
      }
      return;
    }
    // QEMU's qcow2_co_pwrite_zeroes: on v3, an unallocated cluster whose rest already reads as
    // zeros (through the backing chain) becomes a zero cluster instead of zero data.
    if (this.d.header.version >= 3 && kind === ClusterKind.Unallocated && vEnd === cs &&
        (await io.readsAsZero(c * cs, a)) && (await io.readsAsZero(c * cs + b, cs - b))) {
      await this.zeroClusters(c, 1, false);
      return;
    }
    await this.writeRange(c * cs + a, new Uint8Array(b - a), io);
  }

  /**
   * Rewrites the entries of n clusters from c (within one L2 table) to next(old, kind) and returns
   * the ones that changed, with their old entries (what the caller may have to free).
   */
  private async rewriteEntries(
    c: number, n: number, next: (old: Entry, kind: ClusterKind) => Entry,
  ): Promise<{ cluster: number; old: Entry; kind: ClusterKind }[]> {
    const g = this.g;
    const l1Index = Math.floor(c / g.l2Entries);
    const { offset: l2Offset, table } = await this.ensureL2(l1Index);
    const changed: { cluster: number; old: Entry; kind: ClusterKind }[] = [];
    for (let k = 0; k < n; k++) {
      const idx = c + k - l1Index * g.l2Entries;
      const old = this.readEntry(table, idx);
      const kind = clusterKind(g, old.hi, old.lo);
      const e = next(old, kind);
      if (e.hi === old.hi && e.lo === old.lo && e.bHi === old.bHi && e.bLo === old.bLo) continue;
      this.writeEntry(table, idx, e);
      changed.push({ cluster: c + k, old, kind });
    }
    if (changed.length > 0) this.d.l2Cache.markDirty(l2Offset, table);
    return changed;
  }

  /** QEMU's zero_in_l2_slice for n clusters from c (one L2 table): zero flag, unmapping with mayUnmap (and always for compressed). */
  private async zeroClusters(c: number, n: number, mayUnmap: boolean): Promise<void> {
    const g = this.g;
    const unmaps = (kind: ClusterKind): boolean =>
      kind === ClusterKind.Compressed || (mayUnmap && (kind === ClusterKind.Normal || kind === ClusterKind.ZeroAlloc));
    const changed = await this.rewriteEntries(c, n, (old, kind) => {
      const next: Entry = unmaps(kind) ? { hi: 0, lo: 0, bHi: 0, bLo: 0 } : { ...old };
      if (g.extendedL2) {
        next.bHi = ALL_ONES;
        next.bLo = 0;
      } else {
        next.lo = (next.lo | 1) >>> 0;
      }
      return next;
    });
    for (const { old, kind } of changed) if (unmaps(kind)) this.freeAny(old);
  }

  /**
   * QEMU's discard_in_l2_slice for n clusters from c: with `full` (shrinking) entries become
   * unallocated; otherwise allocated clusters (or any, over a backing file) read as zeros after.
   */
  private async discardClusters(c: number, n: number, io: WriteIo, full: boolean): Promise<void> {
    const g = this.g;
    const cs = this.cs;
    if (this.d.l1.l2Offset(Math.floor(c / g.l2Entries)) === 0 && (full || !io.hasBacking)) return; // nothing allocated, nothing to hide
    const v3 = this.d.header.version >= 3;
    const changed = await this.rewriteEntries(c, n, (old, kind) => {
      const allocated = kind === ClusterKind.Normal || kind === ClusterKind.Compressed || kind === ClusterKind.ZeroAlloc;
      if (full) return { hi: 0, lo: 0, bHi: 0, bLo: 0 };
      if (!io.hasBacking && !allocated) return old;
      return g.extendedL2 ? { hi: 0, lo: 0, bHi: ALL_ONES, bLo: 0 } : { hi: 0, lo: v3 ? 1 : 0, bHi: 0, bLo: 0 };
    });
    for (const { old } of changed) this.freeAny(old);
    // An external data file gives back the discarded clusters' space too, one discard per run.
    const data = g.hasDataFile ? await this.d.dataFile() : null;
    if (!data?.discard) return;
    const runs: [number, number][] = [];
    for (const { cluster, kind } of changed) {
      if (kind !== ClusterKind.Normal) continue;
      const from = cluster * cs;
      const to = Math.min(from + cs, this.d.virtualSize);
      const last = runs[runs.length - 1];
      if (last && last[1] === from) last[1] = to;
      else runs.push([from, to]);
    }
    for (const [from, to] of runs) await data.discard(from, to - from).catch(() => undefined);
  }
}

/** file-posix's truncate growing a file: falloc reserves (or writes zeros), full writes zeros, off extends sparsely. */
async function growFile(storage: Storage, length: number, mode: Preallocation): Promise<void> {
  const current = await storage.size();
  if (length <= current) return;
  if (mode === 'falloc' && storage.allocate) {
    await storage.allocate(current, length - current);
    return;
  }
  if (mode === 'falloc' || mode === 'full') {
    for (let pos = current; pos < length; pos += 1 << 20) await storage.write(zeroBuffer(Math.min(1 << 20, length - pos)), pos);
    return;
  }
  await storage.truncate(length);
}

/** Bits s0..s1-1 of a 32-bit subcluster bitmap. */
export function rangeMask(s0: number, s1: number): number {
  if (s1 - s0 >= 32) return ALL_ONES;
  return (((1 << (s1 - s0)) - 1) << s0) >>> 0;
}

function byteLength(buf: Uint8Array | Uint8Array[]): number {
  if (!Array.isArray(buf)) return buf.length;
  let n = 0;
  for (const b of buf) n += b.length;
  return n;
}

function concat(bufs: Uint8Array[]): Uint8Array {
  const out = new Uint8Array(byteLength(bufs));
  let at = 0;
  for (const b of bufs) {
    out.set(b, at);
    at += b.length;
  }
  return out;
}
