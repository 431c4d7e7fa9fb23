// Internal snapshots: create, apply (QEMU's "goto") and delete, each committed by one header write.
//
// QEMU changes refcounts, L2 tables and the active L1 table in place, in several steps. A kill
// between two of them leaves an OFLAG_COPIED flag that disagrees with a refcount (a data cluster
// whose refcount went 1 -> 2 while its L2 entry still says "copied", or the reverse), which
// qemu-img check counts as corruption; no order of in-place writes avoids that window. Here
// nothing that the image's header reaches is written in place: the refcount blocks that change,
// a new refcount table, a new active L1 table, copies of the active L2 tables whose COPIED flags
// change and the new snapshot table all go to clusters that are free on disk, and then one write
// of the header's first 72 bytes (96 on v3, with the autoclear bits: the L1, refcount table and
// snapshot table fields together, within one sector) switches the image over. A kill before that
// write leaves the old image untouched (the new clusters are unreferenced and their refcounts
// still 0: not even a leak); after it the new image is complete, and its refcounts already count
// the replaced clusters as free. The price: the placement differs from QEMU's (the active image
// gets a new L1 table and copies of some L2 tables, where QEMU rewrites them in place), so the
// files are not byte-identical to qemu-img's; what they hold is.
//
// Refcounts follow QEMU's rule for snapshots: a data or L2 cluster's refcount is the number of L1
// tables (active and snapshots) that reach it, compressed clusters counting once for every host
// cluster their bytes touch.

import type { Storage } from '../io/storage.js';
import type { CreateSnapshotOptions } from '../image.js';
import { readFullZeroFill } from '../io/storage.js';
import { FormatError, QimgError } from '../errors.js';
import { validateTable, type Qcow2Header } from './header.js';
import {
  AUTOCLEAR_BITMAPS, AUTOCLEAR_DATA_FILE_RAW, COMPRESSED_HI, COPIED_HI, MAX_L1_BYTES, MAX_REFTABLE_BYTES,
  MAX_SNAPSHOTS, TWO_POW_32, entryOffset, hex,
} from './layout.js';
import { decodeCompressed, standardHostOffset, type L2Geometry } from './l2-entry.js';
import { refcountGetter, refcountMax, refcountSetter, type RefcountGetter, type RefcountSetter } from './refcount.js';
import {
  newSnapshotId, serializeSnapshotTable, snapshotTableSize, storedSnapshotTableSize, type Qcow2Snapshot, SNAPSHOT_EXTRA_DATA_SIZE,
} from './snapshots.js';

/** Old refcount blocks kept in memory while a transaction reads them (they are re-read when evicted). */
const OLD_BLOCK_CACHE = 64;
/** Normal host offsets stay below 2^53 here (QEMU's limit is 2^56; a JS number stops first). */
const MAX_HOST_OFFSET = 2 ** 53;
/** Freed clusters remembered for giving their space back; past this many the rest keep their space (only space is at stake). */
const MAX_TRACKED_FREES = 1 << 20;
/** QEMU's snapshot names live in a 256-byte buffer with its NUL (pstrcpy). */
const MAX_NAME_BYTES = 255;

/** errno values QEMU reports for snapshot failures (`-errno (strerror)` in qemu-img's messages). */
export const ERRNO = { EBUSY: 16, EFBIG: 27, ERANGE: 34, ENOENT: 2, ENOTSUP: 95, EIO: 5, EINVAL: 22 } as const;

/** A snapshot operation QEMU would refuse or fail with errno `data.errno`. */
export class SnapshotError extends QimgError {
  constructor(code: 'UNSUPPORTED' | 'NOT_FOUND' | 'USAGE' | 'FORMAT', message: string, errno: number) {
    super(code, message, { errno });
    this.name = 'SnapshotError';
  }
}

/** What an operation reads of the driver: its state with every change written out. */
export interface SnapshotHost {
  readonly storage: Storage;
  readonly header: Qcow2Header;
  readonly geometry: L2Geometry;
  readonly clusterSize: number;
  /** The active L1 table as on disk: `l1Size` entries. */
  readonly l1Bytes: Uint8Array;
  readonly snapshots: readonly Qcow2Snapshot[];
  readonly virtualSize: number;
}

/** The state the header now names (the driver takes it over). */
export interface SnapshotCommit {
  size: number;
  l1Offset: number;
  l1Size: number;
  l1Bytes: Uint8Array;
  refcountTableOffset: number;
  refcountTableClusters: number;
  snapshots: Qcow2Snapshot[];
  snapshotsOffset: number;
  autoclearFeatures: bigint;
}


interface NewBlock {
  bytes: Uint8Array;
  view: DataView;
  /** Where the copy goes (a cluster free on disk). */
  offset: number;
}

/**
 * The refcounts as they will be after the commit, over the refcounts on disk: changed blocks are
 * copies bound for new clusters. Allocation takes only clusters free both on disk and in the new
 * state, first fit from cluster 0 (as QEMU's allocator starts after an open), never going back.
 */
class RefcountTransaction {
  private readonly cs: number;
  private readonly epb: number;
  private readonly get: RefcountGetter;
  private readonly set: RefcountSetter;
  private readonly max: number;
  private readonly oldBlocks = new Map<number, DataView>();
  readonly newBlocks = new Map<number, NewBlock>();
  private hint = 0;
  /** Clusters whose refcount reached 0 (their space goes back to the host after the commit). */
  readonly freed: number[] = [];
  private readonly one = new Float64Array(1);

  private constructor(
    private readonly storage: Storage, clusterSize: number, order: number,
    private readonly oldTable: DataView, private readonly oldTableOffset: number, private readonly oldTableClusters: number,
  ) {
    this.cs = clusterSize;
    this.epb = (clusterSize * 8) / 2 ** order;
    this.get = refcountGetter(order);
    this.set = refcountSetter(order);
    this.max = refcountMax(order);
  }

  static async begin(storage: Storage, h: Qcow2Header, clusterSize: number): Promise<RefcountTransaction> {
    // Bounded by QEMU's 8 MiB limit (checked when the header was parsed).
    const bytes = new Uint8Array(h.refcountTableClusters * clusterSize);
    await readFullZeroFill(storage, bytes, h.refcountTableOffset);
    return new RefcountTransaction(storage, clusterSize, h.refcountOrder, new DataView(bytes.buffer), h.refcountTableOffset, h.refcountTableClusters);
  }

  private get oldEntries(): number {
    return this.oldTable.byteLength / 8;
  }

  private oldBlockOffset(t: number): number {
    if (t >= this.oldEntries) return 0;
    const off = entryOffset(this.oldTable.getUint32(t * 8), this.oldTable.getUint32(t * 8 + 4));
    if (off < 0 || off % this.cs !== 0) throw new FormatError(`Refblock offset ${hex(off)} unaligned (reftable index: ${hex(t)})`);
    return off;
  }

  private async oldBlock(t: number): Promise<DataView | null> {
    const off = this.oldBlockOffset(t);
    if (off === 0) return null;
    const hit = this.oldBlocks.get(t);
    if (hit) return hit;
    const bytes = new Uint8Array(this.cs);
    await readFullZeroFill(this.storage, bytes, off);
    const view = new DataView(bytes.buffer);
    if (this.oldBlocks.size >= OLD_BLOCK_CACHE) this.oldBlocks.delete(this.oldBlocks.keys().next().value as number);
    this.oldBlocks.set(t, view);
    return view;
  }

  private async readView(t: number): Promise<DataView | null> {
    return this.newBlocks.get(t)?.view ?? (await this.oldBlock(t));
  }

  /** The new copy of block t, made on first change: the old block's cluster is given up, the copy gets one. */
  private async writeView(t: number): Promise<DataView> {
    const have = this.newBlocks.get(t);
    if (have) return have.view;
    const old = await this.oldBlock(t);
    const oldOffset = this.oldBlockOffset(t);
    const bytes = new Uint8Array(this.cs);
    if (old) bytes.set(new Uint8Array(old.buffer, old.byteOffset, this.cs));
    const block: NewBlock = { bytes, view: new DataView(bytes.buffer), offset: 0 };
    // Registered before the allocations below, which may land in this very block.
    this.newBlocks.set(t, block);
    if (oldOffset !== 0) await this.add(oldOffset / this.cs, -1);
    block.offset = (await this.alloc(1)) * this.cs;
    return block.view;
  }

  /**
   * Adds delta to the refcount of clusters list[0..n) in order (delta 0 only reads); `out[k]`
   * receives each new value. Awaits only when the list moves to another refcount block.
   */
  async addMany(list: ArrayLike<number>, n: number, delta: number, out?: Float64Array): Promise<void> {
    const epb = this.epb;
    let t = -1;
    let view: DataView | null = null;
    let base = 0;
    for (let k = 0; k < n; k++) {
      const ci = list[k]!;
      const tk = Math.floor(ci / epb);
      if (tk !== t) {
        view = delta === 0 ? await this.readView(tk) : await this.writeView(tk);
        t = tk;
        base = tk * epb;
      }
      let v = view ? this.get(view, ci - base) : 0;
      if (delta !== 0) {
        v += delta;
        if (v > this.max) {
          // update_refcount's answer to a refcount past refcount_max.
          throw new SnapshotError('USAGE', `Refcount of cluster ${hex(ci * this.cs)} would overflow (maximum ${this.max})`, ERRNO.EINVAL);
        }
        if (v < 0) throw new FormatError(`Refcount of cluster ${hex(ci * this.cs)} would become negative`);
        this.set(view!, ci - base, v);
        if (v === 0 && this.freed.length < MAX_TRACKED_FREES) this.freed.push(ci);
      }
      if (out) out[k] = v;
    }
  }

  async add(ci: number, delta: number): Promise<number> {
    this.one[0] = ci;
    const out = new Float64Array(1);
    await this.addMany(this.one, 1, delta, out);
    return out[0]!;
  }

  /** n contiguous clusters free on disk and here, refcount 1 each; returns the first cluster index. */
  async alloc(n: number): Promise<number> {
    const epb = this.epb;
    let start = this.hint;
    let i = start;
    let run = 0;
    let t = -1;
    let oldView: DataView | null = null;
    let newView: DataView | null = null;
    while (run < n) {
      const tk = Math.floor(i / epb);
      if (tk !== t) {
        t = tk;
        oldView = await this.oldBlock(tk);
        newView = this.newBlocks.get(tk)?.view ?? null;
      }
      const idx = i - t * epb;
      if ((oldView === null || this.get(oldView, idx) === 0) && (newView === null || this.get(newView, idx) === 0)) {
        run++;
      } else {
        run = 0;
        start = i + 1;
      }
      i++;
    }
    if ((start + n) * this.cs > MAX_HOST_OFFSET) throw new SnapshotError('USAGE', 'Could not allocate a cluster: File too large', ERRNO.EFBIG);
    // The hint moves first: blocks allocated while counting the run never land inside it.
    this.hint = start + n;
    const list = new Float64Array(n);
    for (let k = 0; k < n; k++) list[k] = start + k;
    await this.addMany(list, n, 1);
    return start;
  }

  /** Drops one reference from every cluster [offset, offset + bytes) touches. */
  async freeBytes(offset: number, bytes: number): Promise<void> {
    if (bytes <= 0) return;
    const first = Math.floor(offset / this.cs);
    const last = Math.floor((offset + bytes - 1) / this.cs);
    const list = new Float64Array(last - first + 1);
    for (let k = 0; k < list.length; k++) list[k] = first + k;
    await this.addMany(list, list.length, -1);
  }

  /**
   * Places the new refcount table (the old one given up, as large as needed for the new blocks, never
   * smaller) and returns it with every block to write. Nothing is written here.
   */
  async finish(): Promise<{ tableOffset: number; tableClusters: number; table: Uint8Array; blocks: NewBlock[] }> {
    await this.freeBytes(this.oldTableOffset, this.oldTableClusters * this.cs);
    const perCluster = this.cs / 8;
    let placed: { start: number; clusters: number } | null = null;
    for (;;) {
      let need = this.oldEntries;
      for (const t of this.newBlocks.keys()) need = Math.max(need, t + 1);
      const clusters = Math.max(this.oldTableClusters, Math.ceil(need / perCluster));
      if (placed && placed.clusters >= clusters) break;
      if (clusters * this.cs > MAX_REFTABLE_BYTES) throw new SnapshotError('USAGE', 'Could not grow the refcount table: File too large', ERRNO.EFBIG);
      if (placed) await this.freeBytes(placed.start * this.cs, placed.clusters * this.cs);
      placed = { start: await this.alloc(clusters), clusters };
    }
    const table = new Uint8Array(placed.clusters * this.cs);
    table.set(new Uint8Array(this.oldTable.buffer, this.oldTable.byteOffset, this.oldTable.byteLength));
    const view = new DataView(table.buffer);
    for (const [t, b] of this.newBlocks) {
      view.setUint32(t * 8, Math.floor(b.offset / TWO_POW_32));
      view.setUint32(t * 8 + 4, b.offset >>> 0);
    }
    return { tableOffset: placed.start * this.cs, tableClusters: placed.clusters, table, blocks: [...this.newBlocks.values()] };
  }

  /** The freed clusters still free at the end (one may have been allocated again), as runs. */
  async freeRuns(): Promise<[number, number][]> {
    const sorted = Float64Array.from(this.freed).sort();
    const values = new Float64Array(sorted.length);
    await this.addMany(sorted, sorted.length, 0, values);
    const runs: [number, number][] = [];
    for (let k = 0; k < sorted.length; k++) {
      if (values[k] !== 0) continue;
      const c = sorted[k]!;
      const last = runs[runs.length - 1];
      if (last && last[1] === c) last[1] = c + 1;
      else if (!last || last[1] < c) runs.push([c, c + 1]);
    }
    return runs;
  }
}

/** One operation: the refcount transaction, L2 reads, the new clusters written, and the commit. */
class SnapshotTransaction {
  readonly rc: RefcountTransaction;
  private readonly cs: number;
  private readonly g: L2Geometry;
  /** Clusters an L2 table's entries reference (compressed ones may touch two). */
  private readonly refs: Float64Array;
  private readonly refValues: Float64Array;
  /** Entry index of each normal/zero-allocated entry's item in `refs` (-1: none). */
  private readonly refAt: Int32Array;

  private constructor(private readonly host: SnapshotHost, rc: RefcountTransaction) {
    this.rc = rc;
    this.cs = host.clusterSize;
    this.g = host.geometry;
    this.refs = new Float64Array(this.g.l2Entries * 2);
    this.refValues = new Float64Array(this.g.l2Entries * 2);
    this.refAt = new Int32Array(this.g.l2Entries);
  }

  static async begin(host: SnapshotHost): Promise<SnapshotTransaction> {
    return new SnapshotTransaction(host, await RefcountTransaction.begin(host.storage, host.header, host.clusterSize));
  }

  /** The L2 offset of L1 entry i of `l1` (0 = none), checked as QEMU checks it. */
  l2Offset(l1: DataView, i: number): number {
    const off = entryOffset(l1.getUint32(i * 8), l1.getUint32(i * 8 + 4));
    if (off < 0 || off % this.cs !== 0) throw new FormatError(`L2 table offset ${hex(off)} unaligned (L1 index: ${hex(i)})`);
    return off;
  }

  async readL2(offset: number): Promise<Uint8Array> {
    const bytes = new Uint8Array(this.cs);
    await readFullZeroFill(this.host.storage, bytes, offset);
    return bytes;
  }

  /** Fills `refs` with the clusters the table's entries reference, in entry order; returns how many. */
  private collect(table: DataView, l2Offset: number): number {
    const g = this.g;
    const cs = this.cs;
    let n = 0;
    for (let j = 0; j < g.l2Entries; j++) {
      const at = j * g.entryBytes;
      const hi = table.getUint32(at);
      const lo = table.getUint32(at + 4);
      this.refAt[j] = -1;
      if (hi & COMPRESSED_HI) {
        const d = decodeCompressed(g, hi, lo);
        if (!d) throw new FormatError(`Compressed cluster offset out of range (L2 offset: ${hex(l2Offset)}, L2 index: ${hex(j)})`);
        const last = Math.floor((d.hostOffset + d.length - 1) / cs);
        for (let c = Math.floor(d.hostOffset / cs); c <= last; c++) this.refs[n++] = c;
        continue;
      }
      const host = standardHostOffset(hi, lo);
      if (host === 0) continue; // unallocated or a plain zero cluster: nothing referenced
      if (host < 0 || host % cs !== 0) {
        throw new FormatError(`Cluster allocation offset ${hex(host)} unaligned (L2 offset: ${hex(l2Offset)}, L2 index: ${hex(j)})`);
      }
      this.refAt[j] = n;
      this.refs[n++] = host / cs;
    }
    return n;
  }

  /** One more (delta 1) or one less (-1) reference from an L1 table to everything it reaches. */
  async reach(l1: DataView, l1Size: number, delta: 1 | -1): Promise<void> {
    for (let i = 0; i < l1Size; i++) {
      const l2 = this.l2Offset(l1, i);
      if (l2 === 0) continue;
      const table = await this.readL2(l2);
      const n = this.collect(new DataView(table.buffer), l2);
      await this.rc.addMany(this.refs, n, delta);
      await this.rc.add(l2 / this.cs, delta);
    }
  }

  /**
   * The entry the new active L1 gets for L2 table `l2` (refcounts final): the table itself when
   * its entries' COPIED flags already say "refcount 1" exactly where it is; otherwise a copy with
   * the flags set right (the active table then holds its own reference to the copy instead).
   */
  async activeEntry(l2: number): Promise<number> {
    // The result is the table's offset, negated when the entry gets the COPIED flag (see l1Bytes).
    const g = this.g;
    const table = await this.readL2(l2);
    const view = new DataView(table.buffer);
    const n = this.collect(view, l2);
    await this.rc.addMany(this.refs, n, 0, this.refValues);
    let changed = false;
    for (let j = 0; j < g.l2Entries; j++) {
      const at = j * g.entryBytes;
      const hi = view.getUint32(at);
      const k = this.refAt[j]!;
      const copied = k >= 0 && this.refValues[k] === 1;
      const want = copied ? (hi | COPIED_HI) >>> 0 : (hi & ~COPIED_HI) >>> 0;
      if (want !== hi) {
        view.setUint32(at, want);
        changed = true;
      }
    }
    if (!changed) {
      const rc = await this.rc.add(l2 / this.cs, 0);
      return rc === 1 ? -l2 : l2;
    }
    const copy = (await this.rc.alloc(1)) * this.cs;
    await this.rc.add(l2 / this.cs, -1);
    // Written at once (a free cluster nothing names before the commit): memory stays one table.
    await this.host.storage.write(table, copy);
    return -copy;
  }

  /** A new cluster-aligned home for `bytes`, written there now (nothing names it before the commit). */
  async place(bytes: Uint8Array): Promise<number> {
    if (bytes.length === 0) return 0;
    const offset = (await this.rc.alloc(Math.ceil(bytes.length / this.cs))) * this.cs;
    await this.host.storage.write(bytes, offset);
    return offset;
  }

  /** Writes the new refcount structures, then the header fields in one write, then gives freed space back. */
  async commit(next: Omit<SnapshotCommit, 'refcountTableOffset' | 'refcountTableClusters' | 'autoclearFeatures'>): Promise<SnapshotCommit> {
    const storage = this.host.storage;
    const h = this.host.header;
    const reftable = await this.rc.finish();
    const writes = [...reftable.blocks.map((b) => ({ offset: b.offset, bytes: b.bytes })), { offset: reftable.tableOffset, bytes: reftable.table }];
    writes.sort((a, b) => a.offset - b.offset);
    for (const w of writes) await storage.write(w.bytes, w.offset);
    await storage.flush();
    // A writer clears the autoclear bits it does not know (the spec); bitmaps and data-file-raw are known.
    const autoclearFeatures = h.version >= 3 ? h.autoclearFeatures & (AUTOCLEAR_BITMAPS | AUTOCLEAR_DATA_FILE_RAW) : h.autoclearFeatures;
    const head = new Uint8Array(h.version >= 3 ? 96 : 72);
    await readFullZeroFill(storage, head, 0);
    const v = new DataView(head.buffer);
    const u64 = (at: number, x: number): void => {
      v.setUint32(at, Math.floor(x / TWO_POW_32));
      v.setUint32(at + 4, x >>> 0);
    };
    u64(24, next.size);
    v.setUint32(36, next.l1Size);
    u64(40, next.l1Offset);
    u64(48, reftable.tableOffset);
    v.setUint32(56, reftable.tableClusters);
    v.setUint32(60, next.snapshots.length);
    u64(64, next.snapshotsOffset);
    if (h.version >= 3) v.setBigUint64(88, autoclearFeatures);
    // The commit: one write inside the first sector.
    await storage.write(head, 0);
    await storage.flush();
    if (storage.discard) {
      // As QEMU's discard of clusters snapshots free (pass-discard-snapshot): only clusters now free.
      for (const [a, b] of await this.rc.freeRuns()) await storage.discard(a * this.cs, (b - a) * this.cs).catch(() => undefined);
    }
    return { ...next, refcountTableOffset: reftable.tableOffset, refcountTableClusters: reftable.tableClusters, autoclearFeatures };
  }
}

/**
 * Serialises L1 entries as u64 big-endian: each is an L2 table offset (0: none), negated when the
 * entry has the COPIED flag (an L2 table is never at offset 0, so the sign is free).
 */
function l1Bytes(entries: Float64Array): Uint8Array {
  const out = new Uint8Array(entries.length * 8);
  const v = new DataView(out.buffer);
  for (let i = 0; i < entries.length; i++) {
    const e = Math.abs(entries[i]!);
    const hi = entries[i]! < 0 ? COPIED_HI : 0;
    v.setUint32(i * 8, (hi | Math.floor(e / TWO_POW_32)) >>> 0);
    v.setUint32(i * 8 + 4, e >>> 0);
  }
  return out;
}

function refuseDataFile(host: SnapshotHost): void {
  if (host.geometry.hasDataFile) {
    throw new SnapshotError('UNSUPPORTED', 'Internal snapshots are not supported with an external data file', ERRNO.ENOTSUP);
  }
}

function l1View(bytes: Uint8Array): DataView {
  return new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
}

/** A name as QEMU keeps it: at most 255 bytes. */
function nameBytes(name: string): Uint8Array {
  const b = new TextEncoder().encode(name);
  return b.length <= MAX_NAME_BYTES ? b : b.slice(0, MAX_NAME_BYTES);
}

/**
 * qcow2_snapshot_create: the active L1 table becomes the snapshot's (it stays where it is), the
 * active image gets a new L1 table reaching the same L2 tables (or copies of those whose COPIED
 * flags must drop), every cluster reached gets one more reference, the table gains the entry.
 */
export async function createSnapshot(host: SnapshotHost, name: string, options: CreateSnapshotOptions = {}): Promise<{ commit: SnapshotCommit; snapshot: Qcow2Snapshot }> {
  if (host.snapshots.length >= MAX_SNAPSHOTS) throw new SnapshotError('USAGE', 'Too many snapshots', ERRNO.EFBIG);
  refuseDataFile(host);
  const h = host.header;
  const l1Size = h.l1Size;
  const nowUs = Date.now() * 1000;
  const id = newSnapshotId(host.snapshots);
  const nb = nameBytes(name);
  const snapshot: Qcow2Snapshot = {
    l1TableOffset: h.l1TableOffset,
    l1Size,
    id,
    name: new TextDecoder().decode(nb),
    idBytes: new TextEncoder().encode(id),
    nameBytes: nb,
    dateSec: options.dateSec ?? Math.floor(nowUs / 1e6),
    dateNsec: options.dateNsec ?? (nowUs % 1e6) * 1000,
    vmClockNsec: options.vmClockNsec ?? 0,
    vmStateSize: 0,
    diskSize: host.virtualSize,
    icount: options.icount ?? 0,
    unknownExtraData: new Uint8Array(0),
    extraDataSize: SNAPSHOT_EXTRA_DATA_SIZE,
  };
  const snapshots = [...host.snapshots, snapshot];
  if (snapshotTableSize(snapshots) < 0) throw new SnapshotError('USAGE', 'Snapshot table is too big', ERRNO.EFBIG);
  const tx = await SnapshotTransaction.begin(host);
  const active = l1View(host.l1Bytes);
  await tx.reach(active, l1Size, 1);
  // The old L1 table (where it is) becomes the snapshot's; the new active one reaches the same
  // tables, or copies of those whose COPIED flags must drop now that everything is shared.
  const entries = new Float64Array(l1Size);
  for (let i = 0; i < l1Size; i++) {
    const l2 = tx.l2Offset(active, i);
    if (l2 !== 0) entries[i] = await tx.activeEntry(l2);
  }
  const l1 = l1Bytes(entries);
  const l1Offset = await tx.place(l1);
  const table = serializeSnapshotTable(snapshots);
  const snapshotsOffset = await tx.place(table);
  if (h.nbSnapshots > 0) await tx.rc.freeBytes(h.snapshotsOffset, storedSnapshotTableSize(host.snapshots));
  const commit = await tx.commit({ size: host.virtualSize, l1Offset: l1Size > 0 ? l1Offset : h.l1TableOffset, l1Size, l1Bytes: l1, snapshots, snapshotsOffset });
  return { commit, snapshot };
}

/**
 * qcow2_snapshot_goto: the snapshot's L2 tables become the active image's (shared, or copied where
 * COPIED flags must change), everything the old active L1 reached loses a reference, the disk takes
 * the snapshot's size. Refused as QEMU refuses it: bitmaps in the image, an external data file.
 */
export async function applySnapshot(host: SnapshotHost, index: number): Promise<SnapshotCommit> {
  const h = host.header;
  if (h.bitmaps && h.bitmaps.nbBitmaps > 0) throw new SnapshotError('USAGE', 'Device has active dirty bitmaps', ERRNO.EBUSY);
  refuseDataFile(host);
  const sn = host.snapshots[index];
  if (!sn) throw new SnapshotError('NOT_FOUND', "Can't find the snapshot", ERRNO.ENOENT);
  validateTable(sn.l1TableOffset, sn.l1Size, 8, MAX_L1_BYTES, host.clusterSize, 'Snapshot L1 table');
  const cs = host.clusterSize;
  const span = cs * host.geometry.l2Entries;
  const l1Size = Math.max(h.l1Size, sn.l1Size, Math.ceil(sn.diskSize / span));
  if (l1Size * 8 > MAX_L1_BYTES) throw new FormatError('Active L1 table too large');
  const snL1 = new Uint8Array(sn.l1Size * 8);
  await readFullZeroFill(host.storage, snL1, sn.l1TableOffset);
  const tx = await SnapshotTransaction.begin(host);
  const snView = l1View(snL1);
  await tx.reach(snView, sn.l1Size, 1);
  await tx.reach(l1View(host.l1Bytes), h.l1Size, -1);
  await tx.rc.freeBytes(h.l1TableOffset, h.l1Size * 8);
  const entries = new Float64Array(l1Size);
  for (let i = 0; i < sn.l1Size; i++) {
    const l2 = tx.l2Offset(snView, i);
    if (l2 !== 0) entries[i] = await tx.activeEntry(l2);
  }
  const l1 = l1Bytes(entries);
  const l1Offset = await tx.place(l1);
  return tx.commit({ size: sn.diskSize, l1Offset, l1Size, l1Bytes: l1, snapshots: [...host.snapshots], snapshotsOffset: h.snapshotsOffset });
}

/**
 * qcow2_snapshot_delete: the entry leaves the table, everything its L1 table reached loses a
 * reference (clusters reaching 0 are freed and reused), and the active tables' COPIED flags follow
 * the new refcounts (tables whose flags change are copied).
 */
export async function deleteSnapshot(host: SnapshotHost, index: number): Promise<SnapshotCommit> {
  refuseDataFile(host);
  const h = host.header;
  const sn = host.snapshots[index];
  if (!sn) throw new SnapshotError('NOT_FOUND', "Can't find the snapshot", ERRNO.ENOENT);
  validateTable(sn.l1TableOffset, sn.l1Size, 8, MAX_L1_BYTES, host.clusterSize, 'Snapshot L1 table');
  const snL1 = new Uint8Array(sn.l1Size * 8);
  await readFullZeroFill(host.storage, snL1, sn.l1TableOffset);
  const tx = await SnapshotTransaction.begin(host);
  await tx.reach(l1View(snL1), sn.l1Size, -1);
  await tx.rc.freeBytes(sn.l1TableOffset, sn.l1Size * 8);
  const snapshots = host.snapshots.filter((_, i) => i !== index);
  const snapshotsOffset = await tx.place(serializeSnapshotTable(snapshots));
  await tx.rc.freeBytes(h.snapshotsOffset, storedSnapshotTableSize(host.snapshots));
  const active = l1View(host.l1Bytes);
  const entries = new Float64Array(h.l1Size);
  for (let i = 0; i < h.l1Size; i++) {
    const l2 = tx.l2Offset(active, i);
    if (l2 !== 0) entries[i] = await tx.activeEntry(l2);
  }
  const l1 = l1Bytes(entries);
  // The active L1 moves only when an entry changes.
  const same = l1.every((b, k) => b === host.l1Bytes[k]);
  let l1Offset = h.l1TableOffset;
  if (!same) {
    l1Offset = await tx.place(l1);
    await tx.rc.freeBytes(h.l1TableOffset, h.l1Size * 8);
  }
  return tx.commit({ size: host.virtualSize, l1Offset, l1Size: h.l1Size, l1Bytes: l1, snapshots, snapshotsOffset });
}
