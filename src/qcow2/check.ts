// Consistency check and repair of a qcow2 image, working directly on its storage: the expected
// refcount of every host cluster is computed from the metadata and compared with the stored
// refcounts, with QEMU 7.2's rules, counters and messages (qemu-img check), its repairs (leaks,
// corruptions, a rebuilt refcount structure, COPIED flags) and its statistics.
//
// Memory: one counter per host cluster of the FILE (plus what a rebuild appends), never sized by
// untrusted metadata; one L1 table (≤ 32 MiB, QEMU's limit), one L2 table, the refcount table
// (≤ 8 MiB) and a few refcount blocks at a time.

import { FormatError, QimgError } from '../errors.js';
import type { Storage } from '../io/storage.js';
import { readFullZeroFill } from '../io/storage.js';
import { parseHeader, type Qcow2Header } from './header.js';
import { serializeHeader } from './header-write.js';
import {
  COMPRESSED_HI, COPIED_HI, EXT_CRYPTO, INCOMPAT_CORRUPT, INCOMPAT_DATA_FILE, INCOMPAT_DIRTY, INCOMPAT_EXTL2,
  MAX_L1_BYTES, MAX_SNAPSHOTS, MAX_SNAPSHOTS_TABLE_BYTES, MAX_SNAPSHOT_EXTRA_DATA, SNAPSHOT_HEADER_SIZE, TWO_POW_32,
} from './layout.js';
import { refcountGetter, type RefcountGetter } from './refcount.js';

export type RepairMode = 'leaks' | 'all';

export interface CheckOptions {
  /** 'leaks': refcounts above the references drop to them; 'all': corruptions are fixed too. */
  repair?: RepairMode;
  /** Bound on the per-cluster counter array (default 1 GiB); larger files fail with ENOMEM. */
  maxMemoryBytes?: number;
  /**
   * Called with every message as QEMU prints it, in order: kind 'stderr' is a plain stderr line
   * (fprintf), 'error' a line QEMU prints through error_report (with the program name in front).
   */
  onMessage?: (text: string, kind: 'stderr' | 'error') => void;
}

/** QEMU's BdrvCheckResult (with its BlockFragInfo) plus the messages printed while checking. */
export interface CheckResult {
  corruptions: number;
  leaks: number;
  checkErrors: number;
  corruptionsFixed: number;
  leaksFixed: number;
  imageEndOffset: number;
  totalClusters: number;
  allocatedClusters: number;
  fragmentedClusters: number;
  compressedClusters: number;
  /** Every message, without a program-name prefix. */
  messages: string[];
  /**
   * Set when the check could not complete (QEMU's negative return: qemu-img prints
   * "Check failed: <message>" and exits 1). errno is the code name, message its strerror text.
   */
  failure?: { errno: string; message: string };
}

const STRERROR: Record<string, string> = {
  EIO: 'Input/output error',
  EFBIG: 'File too large',
  EINVAL: 'Invalid argument',
  ENOMEM: 'Cannot allocate memory',
};

/** A failure that ends the check (QEMU's "return -errno"). */
class CheckAbort extends Error {
  constructor(readonly errno: string) {
    super(STRERROR[errno] ?? errno);
  }
}

const DEFAULT_MAX_MEMORY = 1024 * 1024 * 1024;
/** QEMU refuses files of more than INT_MAX clusters. */
const INT_MAX = 0x7fffffff;

function emptyResult(): CheckResult {
  return {
    corruptions: 0, leaks: 0, checkErrors: 0, corruptionsFixed: 0, leaksFixed: 0, imageEndOffset: 0,
    totalClusters: 0, allocatedClusters: 0, fragmentedClusters: 0, compressedClusters: 0, messages: [],
  };
}

/** Lower-case hex of a u64 given as halves, as printf's PRIx64. */
function hex64(hi: number, lo: number): string {
  return hi ? (hi >>> 0).toString(16) + (lo >>> 0).toString(16).padStart(8, '0') : (lo >>> 0).toString(16);
}

function hexNum(n: number | bigint): string {
  return n.toString(16);
}

/** A byte offset from the masked halves: exact below 2^53, else a bigint (always beyond any file). */
function offsetOf(hi: number, lo: number): number | bigint {
  if (hi < 0x200000) return hi * TWO_POW_32 + (lo >>> 0);
  return (BigInt(hi >>> 0) << 32n) | BigInt(lo >>> 0);
}

function num(o: number | bigint): number {
  return typeof o === 'bigint' ? Number(o) : o;
}

/** The in-memory refcount table (QEMU's "IMRT"): one saturating counter per host cluster. */
class Imrt {
  arr: Uint8Array | Uint16Array | Uint32Array;
  size = 0;
  readonly max: number;
  /** 64-bit refcounts are held in 32-bit counters: they saturate silently instead of overflowing. */
  readonly saturate: boolean;
  private readonly bytesPer: number;

  constructor(order: number, private readonly maxBytes: number) {
    this.bytesPer = order <= 3 ? 1 : order === 4 ? 2 : 4;
    this.max = order <= 5 ? 2 ** (2 ** order) - 1 : 0xffffffff;
    this.saturate = order === 6;
    this.arr = this.alloc(0);
  }

  private alloc(n: number): Uint8Array | Uint16Array | Uint32Array {
    if (n * this.bytesPer > this.maxBytes) throw new CheckAbort('ENOMEM');
    return this.bytesPer === 1 ? new Uint8Array(n) : this.bytesPer === 2 ? new Uint16Array(n) : new Uint32Array(n);
  }

  /** Grows to n entries (new ones zero). */
  ensure(n: number): void {
    if (n <= this.size) return;
    if (n > this.arr.length) {
      const cap = Math.max(n, Math.min(Math.floor(this.arr.length * 1.25) + 16, Math.floor(this.maxBytes / this.bytesPer)));
      const next = this.alloc(cap);
      next.set(this.arr.subarray(0, this.size));
      this.arr = next;
    }
    this.size = n;
  }

  get(k: number): number {
    return k < this.size ? this.arr[k]! : 0;
  }

  set(k: number, v: number): void {
    this.arr[k] = v;
  }

  clear(): void {
    this.arr.fill(0, 0, this.size);
  }
}

type RefcountSetter = (block: DataView, index: number, value: number) => void;

function refcountSetter(order: number): RefcountSetter {
  switch (order) {
    case 0: case 1: case 2: {
      const bits = 2 ** order;
      const per = 8 / bits;
      const mask = (1 << bits) - 1;
      return (b, i, v) => {
        const at = Math.floor(i / per);
        const shift = (i % per) * bits;
        b.setUint8(at, (b.getUint8(at) & ~(mask << shift)) | ((v & mask) << shift));
      };
    }
    case 3: return (b, i, v) => b.setUint8(i, v);
    case 4: return (b, i, v) => b.setUint16(i * 2, v);
    case 5: return (b, i, v) => b.setUint32(i * 4, v);
    default: return (b, i, v) => {
      b.setUint32(i * 8, Math.floor(v / TWO_POW_32));
      b.setUint32(i * 8 + 4, v >>> 0);
    };
  }
}

interface SnapshotRef {
  l1TableOffset: number | bigint;
  l1Size: number;
  id: string;
  name: string;
  extraDataSize: number;
}

const utf8 = new TextDecoder();

/** Cluster types as QEMU's qcow2_get_cluster_type classifies whole L2 entries. */
const enum CType { Unallocated, ZeroPlain, ZeroAlloc, Normal, Compressed }

class Checker {
  readonly cs: number;
  readonly cbits: number;
  readonly order: number;
  readonly epb: number; // refcount entries per refblock
  readonly extL2: boolean;
  readonly entryBytes: number;
  readonly l2Entries: number;
  readonly dataFile: boolean;
  fixLeaks: boolean;
  fixErrors: boolean;
  readonly get: RefcountGetter;
  readonly set: RefcountSetter;
  fileSize = 0;
  imrt: Imrt;
  res: CheckResult = emptyResult();
  reftable: DataView = new DataView(new ArrayBuffer(0));
  reftableOffset: number;
  reftableEntries: number;
  /** The active L1 as read when the image was opened (QEMU's s->l1_table). */
  l1: DataView = new DataView(new ArrayBuffer(0));
  snapshots: SnapshotRef[] = [];
  snapshotsSize = 0;
  signaledCorruption = false;
  private readonly blocks = new Map<number, DataView>();

  constructor(readonly storage: Storage, readonly h: Qcow2Header, readonly options: CheckOptions, readonly messages: string[]) {
    this.cbits = h.clusterBits;
    this.cs = 2 ** h.clusterBits;
    this.order = h.refcountOrder;
    this.epb = (this.cs * 8) / 2 ** this.order;
    this.extL2 = (h.incompatibleFeatures & INCOMPAT_EXTL2) !== 0n;
    this.entryBytes = this.extL2 ? 16 : 8;
    this.l2Entries = this.cs / this.entryBytes;
    this.dataFile = (h.incompatibleFeatures & INCOMPAT_DATA_FILE) !== 0n;
    this.fixLeaks = options.repair !== undefined;
    this.fixErrors = options.repair === 'all';
    this.get = refcountGetter(this.order);
    this.set = refcountSetter(this.order);
    this.imrt = new Imrt(this.order, options.maxMemoryBytes ?? DEFAULT_MAX_MEMORY);
    this.reftableOffset = h.refcountTableOffset;
    this.reftableEntries = (h.refcountTableClusters * this.cs) / 8;
  }

  msg(text: string): void {
    this.messages.push(text);
    this.options.onMessage?.(text, 'stderr');
  }

  errorReport(text: string): void {
    this.messages.push(text);
    this.options.onMessage?.(text, 'error');
  }

  async read(offset: number | bigint, length: number): Promise<Uint8Array> {
    const buf = new Uint8Array(length);
    if (typeof offset === 'number' && offset < this.fileSize) await readFullZeroFill(this.storage, buf, offset);
    return buf;
  }

  // ---- stored refcounts -------------------------------------------------------------------

  /** The refblock covering refcount-table index ti: null when none (all zero); throws on an unaligned one. */
  async refblock(ti: number): Promise<{ view: DataView; offset: number } | null> {
    if (ti >= this.reftableEntries) return null;
    const hi = this.reftable.getUint32(ti * 8);
    const lo = this.reftable.getUint32(ti * 8 + 4) & 0xfffffe00;
    if (hi === 0 && lo === 0) return null;
    const off = offsetOf(hi, lo);
    if (typeof off === 'bigint' || off % this.cs !== 0) {
      this.signalCorruption(`Refblock offset 0x${hexNum(off)} unaligned (reftable index: 0x${ti.toString(16)})`);
      throw new CheckAbort('EIO');
    }
    let view = this.blocks.get(off);
    if (!view) {
      view = new DataView((await this.read(off, this.cs)).buffer);
      if (this.blocks.size >= 8) this.blocks.delete(this.blocks.keys().next().value as number);
      this.blocks.set(off, view);
    }
    return { view, offset: off };
  }

  signalCorruption(message: string): void {
    if (this.signaledCorruption) return;
    this.signaledCorruption = true;
    // QEMU marks a writable image corrupt here; qimg only reports it.
    this.msg(this.storage.readOnly
      ? `qcow2: Image is corrupt: ${message}; further non-fatal corruption events will be suppressed`
      : `qcow2: Marking image as corrupt: ${message}; further corruption events will be suppressed`);
  }

  async storedRefcount(k: number): Promise<number> {
    const ti = Math.floor(k / this.epb);
    const b = await this.refblock(ti);
    return b ? this.get(b.view, k - ti * this.epb) : 0;
  }

  /** Sets a stored refcount whose refblock exists (QEMU's update_refcount on a repair). */
  async setStoredRefcount(k: number, value: number): Promise<void> {
    const ti = Math.floor(k / this.epb);
    const b = await this.refblock(ti);
    if (!b) throw new CheckAbort('EIO');
    const i = k - ti * this.epb;
    this.set(b.view, i, value);
    const bytesPerEntry = 2 ** this.order / 8;
    const at = Math.floor(i * bytesPerEntry);
    const len = Math.max(1, bytesPerEntry);
    await this.storage.write(new Uint8Array(b.view.buffer, at, len), b.offset + at);
    // QEMU discards a cluster whose refcount a repair dropped to 0 (QCOW2_DISCARD_ALWAYS): the
    // host file punches a hole there, so the freed cluster reads as zeros afterwards.
    if (value === 0 && this.storage.discard && k * this.cs < this.fileSize) {
      await this.storage.discard(k * this.cs, Math.min(this.cs, this.fileSize - k * this.cs)).catch(() => undefined);
    }
  }

  // ---- expected refcounts -----------------------------------------------------------------

  /** QEMU's qcow2_inc_refcounts_imrt. */
  inc(offset: number | bigint, size: number): void {
    if (size <= 0) return;
    if (num(offset) + size - this.fileSize >= this.cs) {
      this.msg(`ERROR: counting reference for region exceeding the end of the file by one cluster or more: offset 0x${hexNum(offset)} size 0x${size.toString(16)}`);
      this.res.corruptions++;
      return;
    }
    const off = num(offset);
    const start = Math.floor(off / this.cs);
    const last = Math.floor((off + size - 1) / this.cs);
    const imrt = this.imrt;
    for (let k = start; k <= last; k++) {
      if (k >= imrt.size) imrt.ensure(k + 1);
      const rc = imrt.arr[k]!;
      if (rc === imrt.max) {
        if (imrt.saturate) continue;
        this.msg(`ERROR: overflow cluster offset=0x${(k * this.cs).toString(16)}`);
        this.msg('Use qemu-img amend to increase the refcount entry width or qemu-img convert to create a clean copy if the image cannot be opened for writing');
        this.res.corruptions++;
        continue;
      }
      imrt.arr[k] = rc + 1;
    }
  }

  clusterType(hi: number, lo: number): CType {
    if (hi & COMPRESSED_HI) return CType.Compressed;
    const hasOffset = (hi & 0x00ffffff) !== 0 || (lo & 0xfffffe00) !== 0;
    if (lo & 1 && !this.extL2) return hasOffset ? CType.ZeroAlloc : CType.ZeroPlain;
    if (!hasOffset) return this.dataFile && hi & COPIED_HI ? CType.Normal : CType.Unallocated;
    return CType.Normal;
  }

  async checkL1(l1Offset: number | bigint, l1Size: number, fragInfo: boolean, active: boolean): Promise<void> {
    if (!l1Size) return;
    this.inc(l1Offset, l1Size * 8);
    const l1 = new DataView((await this.read(l1Offset, l1Size * 8)).buffer);
    for (let i = 0; i < l1Size; i++) {
      const hi = l1.getUint32(i * 8);
      const lo = l1.getUint32(i * 8 + 4);
      if (hi === 0 && lo === 0) continue;
      if (hi & 0x7f000000 || lo & 0x1ff) {
        this.msg(`ERROR found L1 entry with reserved bits set: ${hex64(hi, lo)}`);
        this.res.corruptions++;
      }
      const l2Offset = offsetOf(hi & 0x00ffffff, lo & 0xfffffe00);
      this.inc(l2Offset, this.cs);
      if (num(l2Offset) % this.cs !== 0) {
        this.msg(`ERROR l2_offset=${hexNum(l2Offset)}: Table is not cluster aligned; L1 entry corrupted`);
        this.res.corruptions++;
      }
      await this.checkL2(l2Offset, fragInfo, active);
    }
  }

  async checkL2(l2Offset: number | bigint, fragInfo: boolean, _active: boolean): Promise<void> {
    const bytes = await this.read(l2Offset, this.cs);
    const t = new DataView(bytes.buffer);
    const res = this.res;
    const cs = this.cs;
    let nextContiguous = 0;
    for (let i = 0; i < this.l2Entries; i++) {
      const at = i * this.entryBytes;
      let hi = t.getUint32(at);
      const lo = t.getUint32(at + 4);
      const bHi = this.extL2 ? t.getUint32(at + 8) : 0;
      const bLo = this.extL2 ? t.getUint32(at + 12) : 0;
      if (hi === 0 && lo === 0 && bHi === 0 && bLo === 0) continue;
      const type = this.clusterType(hi, lo);
      if (type !== CType.Compressed && (hi & 0x3f000000 || lo & 0x1fe)) {
        this.msg(`ERROR found l2 entry with reserved bits set: ${hex64(hi, lo)}`);
        res.corruptions++;
      }
      switch (type) {
        case CType.Compressed: {
          const shift = 62 - (this.cbits - 8);
          const hiShift = shift - 32;
          const offHi = hi & ((1 << hiShift) - 1);
          if (hi & COPIED_HI) {
            this.msg(`ERROR: coffset=0x${hex64(offHi, lo)}: copied flag must never be set for compressed clusters`);
            hi = (hi & ~COPIED_HI) >>> 0;
            res.corruptions++;
          }
          if (this.dataFile) {
            this.msg(`ERROR compressed cluster ${i} with data file, entry=0x${hex64(hi, lo)}`);
            res.corruptions++;
            break;
          }
          if (bHi || bLo) {
            this.msg(`ERROR compressed cluster ${i} with non-zero subcluster allocation bitmap, entry=0x${hex64(hi, lo)}`);
            res.corruptions++;
            break;
          }
          const coffset = offsetOf(offHi, lo);
          const nbSectors = ((hi >>> hiShift) & ((1 << (this.cbits - 8)) - 1)) + 1;
          this.inc(coffset, nbSectors * 512 - (num(coffset) % 512));
          if (fragInfo) {
            res.allocatedClusters++;
            res.compressedClusters++;
            res.fragmentedClusters++;
          }
          break;
        }
        case CType.ZeroAlloc:
        case CType.Normal: {
          const offset = offsetOf(hi & 0x00ffffff, lo & 0xfffffe00);
          if (bHi & bLo) {
            res.corruptions++;
            this.msg(`ERROR offset=${hexNum(offset)}: Allocated cluster has corrupted subcluster allocation bitmap`);
          }
          if (num(offset) % cs !== 0) {
            res.corruptions++;
            const containsData = this.extL2 ? bLo !== 0 : !(lo & 1);
            if (!containsData) {
              this.msg(`${this.fixErrors ? 'Repairing' : 'ERROR'} offset=${hexNum(offset)}: Preallocated cluster is not properly aligned; L2 entry corrupted.`);
              if (this.fixErrors) {
                if (this.extL2) {
                  t.setUint32(at, 0);
                  t.setUint32(at + 4, 0);
                  t.setUint32(at + 8, (bHi | bLo) >>> 0);
                  t.setUint32(at + 12, 0);
                } else {
                  t.setUint32(at, 0);
                  t.setUint32(at + 4, 1);
                }
                await this.storage.write(bytes.slice(at, at + this.entryBytes), num(l2Offset) + at);
                res.corruptions--;
                res.corruptionsFixed++;
                continue;
              }
            } else {
              this.msg(`ERROR offset=${hexNum(offset)}: Data cluster is not properly aligned; L2 entry corrupted.`);
            }
          }
          if (fragInfo) {
            res.allocatedClusters++;
            const o = num(offset);
            if (nextContiguous && o !== nextContiguous) res.fragmentedClusters++;
            nextContiguous = o + cs;
          }
          if (!this.dataFile) this.inc(offset, cs);
          break;
        }
        case CType.ZeroPlain:
          break;
        default:
          if (bLo) {
            res.corruptions++;
            this.msg('ERROR: Unallocated cluster has non-zero subcluster allocation map');
          }
      }
    }
  }

  /** Returns true when the refcount structure must be rebuilt. */
  async checkRefblocks(): Promise<boolean> {
    let rebuild = false;
    const res = this.res;
    for (let i = 0; i < this.reftableEntries; i++) {
      const hi = this.reftable.getUint32(i * 8);
      const loRaw = this.reftable.getUint32(i * 8 + 4);
      const offset = offsetOf(hi, loRaw & 0xfffffe00);
      if (loRaw & 0x1ff) {
        this.msg(`ERROR refcount table entry ${i} has reserved bits set`);
        res.corruptions++;
        rebuild = true;
        continue;
      }
      if (num(offset) % this.cs !== 0) {
        this.msg(`ERROR refcount block ${i} is not cluster aligned; refcount table entry corrupted`);
        res.corruptions++;
        rebuild = true;
        continue;
      }
      const cluster = Math.floor(num(offset) / this.cs);
      if (cluster >= this.imrt.size) {
        res.corruptions++;
        this.msg(`${this.fixErrors ? 'Repairing' : 'ERROR'} refcount block ${i} is outside image`);
        if (this.fixErrors) {
          // QEMU grows the file to hold the block; a block absurdly far away is left to the rebuild.
          const o = num(offset);
          if (typeof offset === 'bigint' || o + this.cs > this.fileSize + 2 ** 40) {
            rebuild = true;
            this.msg(`ERROR could not resize image: ${typeof offset === 'bigint' ? STRERROR.EINVAL : STRERROR.EFBIG}`);
            continue;
          }
          await this.storage.truncate(o + this.cs);
          this.fileSize = await this.storage.size();
          this.imrt.ensure(Math.ceil(this.fileSize / this.cs));
          res.corruptions--;
          res.corruptionsFixed++;
          this.blocks.delete(o);
          this.inc(o, this.cs);
        }
        continue;
      }
      if (num(offset) !== 0) {
        this.inc(offset, this.cs);
        const rc = this.imrt.get(cluster);
        if (rc !== 1) {
          this.msg(`ERROR refcount block ${i} refcount=${rc}`);
          res.corruptions++;
          rebuild = true;
        }
      }
    }
    return rebuild;
  }

  /** QEMU's calculate_refcounts; returns whether a rebuild is needed. */
  async calculateRefcounts(fix: boolean): Promise<boolean> {
    const saved = [this.fixLeaks, this.fixErrors] as const;
    if (!fix) Object.assign(this, { fixLeaks: false, fixErrors: false });
    try {
      const h = this.h;
      this.inc(0, this.cs);
      await this.checkL1(h.l1TableOffset, h.l1Size, true, true);
      if (this.dataFile && this.snapshots.length) {
        this.msg(`ERROR ${this.snapshots.length} snapshots in image with data file`);
        this.res.corruptions++;
      }
      for (const sn of this.snapshots) {
        if (num(sn.l1TableOffset) % this.cs !== 0) {
          this.msg(`ERROR snapshot ${sn.id} (${sn.name}) l1_offset=0x${hexNum(sn.l1TableOffset)}: L1 table is not cluster aligned; snapshot table entry corrupted`);
          this.res.corruptions++;
          continue;
        }
        if (sn.l1Size > MAX_L1_BYTES / 8) {
          this.msg(`ERROR snapshot ${sn.id} (${sn.name}) l1_size=0x${sn.l1Size.toString(16)}: L1 table is too large; snapshot table entry corrupted`);
          this.res.corruptions++;
          continue;
        }
        await this.checkL1(sn.l1TableOffset, sn.l1Size, false, false);
      }
      this.inc(h.snapshotsOffset, this.snapshotsSize);
      this.inc(this.reftableOffset, this.reftableEntries * 8);
      const crypto = h.extensions.find((e) => e.type === EXT_CRYPTO);
      if (crypto && crypto.data.length >= 16) {
        const dv = new DataView(crypto.data.buffer, crypto.data.byteOffset, crypto.data.byteLength);
        const length = dv.getUint32(8) * TWO_POW_32 + dv.getUint32(12);
        if (length) this.inc(offsetOf(dv.getUint32(0), dv.getUint32(4)), length);
      }
      await this.checkBitmaps();
      return await this.checkRefblocks();
    } finally {
      Object.assign(this, { fixLeaks: saved[0], fixErrors: saved[1] });
    }
  }

  async checkBitmaps(): Promise<void> {
    const ext = this.h.bitmaps;
    if (!ext || ext.nbBitmaps === 0) return;
    this.inc(ext.directoryOffset, ext.directorySize);
    const fail = (): never => {
      this.res.corruptions++;
      throw new CheckAbort('EINVAL');
    };
    if (ext.directoryOffset + ext.directorySize > this.fileSize) fail();
    const dir = await this.read(ext.directoryOffset, ext.directorySize);
    const dv = new DataView(dir.buffer);
    const tables: { offset: number | bigint; size: number }[] = [];
    let pos = 0;
    for (let i = 0; i < ext.nbBitmaps; i++) {
      if (pos + 24 > dir.length) fail();
      const offset = offsetOf(dv.getUint32(pos), dv.getUint32(pos + 4));
      const size = dv.getUint32(pos + 8);
      const nameSize = dv.getUint16(pos + 18);
      const extra = dv.getUint32(pos + 20);
      const entry = 24 + extra + nameSize;
      if (pos + entry > dir.length || size === 0 || size > 0x8000000 || num(offset) % this.cs !== 0) fail();
      tables.push({ offset, size });
      pos += (entry + 7) & ~7;
    }
    for (const tb of tables) {
      this.inc(tb.offset, tb.size * 8);
      const t = new DataView((await this.read(tb.offset, tb.size * 8)).buffer);
      const offsets: number[] = [];
      let bad = false;
      for (let i = 0; i < tb.size; i++) {
        const hi = t.getUint32(i * 8);
        const lo = t.getUint32(i * 8 + 4);
        const off = offsetOf(hi & 0x00ffffff, lo & 0xfffffe00);
        if (hi & 0xff000000 || lo & 0x1fe || (num(off) !== 0 && (lo & 1 || num(off) % this.cs !== 0))) bad = true;
        offsets.push(num(off));
      }
      // QEMU loads the whole table first and gives up on it (and the check) at a bad entry.
      if (bad) fail();
      for (const off of offsets) if (off) this.inc(off, this.cs);
    }
  }

  /** QEMU's compare_refcounts. Returns [rebuild, highestCluster]. */
  async compareRefcounts(fix: { leaks: boolean; errors: boolean }): Promise<[boolean, number]> {
    let rebuild = false;
    let highest = 0;
    const res = this.res;
    const size = this.imrt.size;
    for (let ti = 0; ti * this.epb < size; ti++) {
      let block: DataView | null = null;
      let failed = false;
      try {
        block = (await this.refblock(ti))?.view ?? null;
      } catch (e) {
        if (!(e instanceof CheckAbort)) throw e;
        failed = true;
      }
      const end = Math.min(size, (ti + 1) * this.epb);
      for (let i = ti * this.epb; i < end; i++) {
        if (failed) {
          this.msg(`Can't get refcount for cluster ${i}: ${STRERROR.EIO}`);
          res.checkErrors++;
          continue;
        }
        const rc1 = block ? this.get(block, i - ti * this.epb) : 0;
        const rc2 = this.imrt.arr[i]!;
        if (rc1 > 0 || rc2 > 0) highest = i;
        if (rc1 === rc2 || (this.imrt.saturate && rc2 === this.imrt.max && rc1 >= rc2)) continue;
        let fixed: 'leaksFixed' | 'corruptionsFixed' | null = null;
        if (rc1 === 0) rebuild = true;
        else if (rc1 > rc2 && fix.leaks) fixed = 'leaksFixed';
        else if (rc1 < rc2 && fix.errors) fixed = 'corruptionsFixed';
        this.msg(`${fixed ? 'Repairing' : rc1 < rc2 ? 'ERROR' : 'Leaked'} cluster ${i} refcount=${rc1} reference=${rc2}`);
        if (fixed) {
          await this.setStoredRefcount(i, rc2);
          res[fixed]++;
          continue;
        }
        if (rc1 < rc2) res.corruptions++;
        else res.leaks++;
      }
    }
    return [rebuild, highest];
  }

  // ---- rebuild ----------------------------------------------------------------------------

  /** QEMU's alloc_clusters_imrt: first fit from *firstFree, growing the array at the end. */
  allocImrt(count: number, firstFree: { v: number }): number {
    const imrt = this.imrt;
    let cluster = firstFree.v;
    let contiguous = 0;
    let firstGap = true;
    for (; cluster < imrt.size && contiguous < count; cluster++) {
      if (!imrt.arr[cluster]) {
        contiguous++;
        if (firstGap) {
          firstFree.v = cluster;
          firstGap = false;
        }
      } else if (contiguous) {
        contiguous = 0;
      }
    }
    if (contiguous < count) imrt.ensure(cluster + count - contiguous);
    cluster -= contiguous;
    for (let i = 0; i < count; i++) imrt.arr[cluster + i] = 1;
    return cluster * this.cs;
  }

  /** One refblock's bytes from the in-memory counts. */
  refblockBytes(start: number): Uint8Array {
    const buf = new Uint8Array(this.cs);
    const view = new DataView(buf.buffer);
    const end = Math.min(this.imrt.size, start + this.epb);
    for (let k = start; k < end; k++) {
      const v = this.imrt.arr[k]!;
      if (v) this.set(view, k - start, v);
    }
    return buf;
  }

  async writeRefblocks(first: number, endCluster: number, rt: { table: number[]; entries: number }): Promise<boolean> {
    let grown = false;
    const firstFree = { v: 0 };
    let end = endCluster;
    for (let cluster = first; cluster < end; cluster++) {
      if (!this.imrt.get(cluster)) continue;
      const rbIndex = Math.floor(cluster / this.epb);
      const rbStart = rbIndex * this.epb;
      let rbOffset: number;
      if (rt.entries > rbIndex && rt.table[rbIndex]) {
        rbOffset = rt.table[rbIndex]!;
      } else {
        if (firstFree.v < rbStart) firstFree.v = rbStart;
        rbOffset = this.allocImrt(1, firstFree);
        const rbCluster = rbOffset / this.cs;
        if (rbCluster >= end) end = rbCluster + 1;
        if (rt.entries <= rbIndex) {
          rt.entries = Math.ceil(((rbIndex + 1) * 8) / this.cs) * this.cs / 8;
          while (rt.table.length < rt.entries) rt.table.push(0);
          grown = true;
        }
        rt.table[rbIndex] = rbOffset;
      }
      await this.storage.write(this.refblockBytes(rbStart), rbOffset);
      cluster = rbStart + this.epb - 1;
    }
    return grown;
  }

  /** QEMU's rebuild_refcount_structure: new refblocks and table in free space, then the header switch. */
  async rebuildRefcountStructure(): Promise<void> {
    this.blocks.clear();
    const rt = { table: [] as number[], entries: 0 };
    let grown = await this.writeRefblocks(0, this.imrt.size, rt);
    let rtOffset = -1;
    let rtClusters = 0;
    do {
      const firstFree = { v: 0 };
      rtClusters = Math.ceil((rt.entries * 8) / this.cs);
      rtOffset = this.allocImrt(rtClusters, firstFree);
      const startCluster = rtOffset / this.cs;
      grown = await this.writeRefblocks(startCluster, startCluster + rtClusters, rt);
    } while (grown);
    const tableBytes = new Uint8Array(rt.entries * 8);
    const tv = new DataView(tableBytes.buffer);
    rt.table.forEach((off, i) => {
      tv.setUint32(i * 8, Math.floor(off / TWO_POW_32));
      tv.setUint32(i * 8 + 4, off >>> 0);
    });
    await this.storage.write(tableBytes, rtOffset);
    // Commit point: the new structure is durable before the header points at it.
    await this.storage.flush();
    const ptr = new Uint8Array(12);
    const pv = new DataView(ptr.buffer);
    pv.setUint32(0, Math.floor(rtOffset / TWO_POW_32));
    pv.setUint32(4, rtOffset >>> 0);
    pv.setUint32(8, rtClusters);
    await this.storage.write(ptr, 48);
    await this.storage.flush();
    this.reftable = tv;
    this.reftableOffset = rtOffset;
    this.reftableEntries = rt.entries;
    this.h.refcountTableOffset = rtOffset;
    this.h.refcountTableClusters = rtClusters;
    this.fileSize = await this.storage.size();
  }

  // ---- COPIED flags -----------------------------------------------------------------------

  async checkOflagCopied(): Promise<void> {
    const res = this.res;
    const repair = this.fixErrors ? true : this.fixLeaks ? !res.checkErrors && !res.corruptions && !res.leaks : false;
    const word = repair ? 'Repairing' : 'ERROR';
    const l1Entries = this.l1.byteLength / 8;
    const stored = async (k: number): Promise<number | null> => {
      try {
        return await this.storedRefcount(k);
      } catch (e) {
        if (e instanceof CheckAbort) return null;
        throw e;
      }
    };
    for (let i = 0; i < l1Entries; i++) {
      let hi = this.l1.getUint32(i * 8);
      const lo = this.l1.getUint32(i * 8 + 4);
      const l2Offset = offsetOf(hi & 0x00ffffff, lo & 0xfffffe00);
      if (!num(l2Offset)) continue;
      const rc = typeof l2Offset === 'bigint' ? 0 : await stored(Math.floor(l2Offset / this.cs));
      if (rc === null) continue;
      if ((rc === 1) !== ((hi & COPIED_HI) !== 0)) {
        res.corruptions++;
        this.msg(`${word} OFLAG_COPIED L2 cluster: l1_index=${i} l1_entry=${hex64(hi, lo)} refcount=${rc}`);
        if (repair) {
          hi = rc === 1 ? (hi | COPIED_HI) >>> 0 : (hi & ~COPIED_HI) >>> 0;
          this.l1.setUint32(i * 8, hi);
          await this.storage.write(new Uint8Array(this.l1.buffer.slice(i * 8, i * 8 + 8)), this.h.l1TableOffset + i * 8);
          res.corruptions--;
          res.corruptionsFixed++;
        }
      }
      const bytes = await this.read(l2Offset, this.cs);
      const t = new DataView(bytes.buffer);
      let dirty = 0;
      for (let j = 0; j < this.l2Entries; j++) {
        const at = j * this.entryBytes;
        const ehi = t.getUint32(at);
        const elo = t.getUint32(at + 4);
        if (ehi === 0 && elo === 0) continue;
        const type = this.clusterType(ehi, elo);
        if (type !== CType.Normal && type !== CType.ZeroAlloc) continue;
        let erc: number | null = 1;
        if (!this.dataFile) {
          const off = offsetOf(ehi & 0x00ffffff, elo & 0xfffffe00);
          erc = typeof off === 'bigint' ? 0 : await stored(Math.floor(off / this.cs));
          if (erc === null) continue;
        }
        if ((erc === 1) !== ((ehi & COPIED_HI) !== 0)) {
          res.corruptions++;
          this.msg(`${word} OFLAG_COPIED data cluster: l2_entry=${hex64(ehi, elo)} refcount=${erc}`);
          if (repair) {
            t.setUint32(at, erc === 1 ? (ehi | COPIED_HI) >>> 0 : (ehi & ~COPIED_HI) >>> 0);
            dirty++;
          }
        }
      }
      if (dirty > 0) {
        await this.storage.write(bytes, num(l2Offset));
        res.corruptions -= dirty;
        res.corruptionsFixed += dirty;
      }
    }
  }

  // ---- the whole check --------------------------------------------------------------------

  /** QEMU's qcow2_check_refcounts. */
  async checkRefcounts(): Promise<void> {
    const res = this.res;
    this.fileSize = await this.storage.size();
    const nbClusters = Math.ceil(this.fileSize / this.cs);
    if (nbClusters > INT_MAX) {
      res.checkErrors++;
      throw new CheckAbort('EFBIG');
    }
    res.totalClusters = Math.ceil((Math.floor(this.h.size / 512) * 512) / this.cs);
    try {
      this.imrt.ensure(nbClusters);
    } catch (e) {
      res.checkErrors++;
      throw e;
    }
    let rebuild = await this.calculateRefcounts(true);
    const preCompare = { ...res };
    let highest: number;
    [rebuild, highest] = await this.compareRefcounts({ leaks: false, errors: false });

    if (rebuild && this.fixErrors) {
      const old = { ...res };
      let freshLeaks = 0;
      this.msg('Rebuilding refcount structure');
      await this.rebuildRefcountStructure();
      res.corruptions = 0;
      res.leaks = 0;
      this.imrt.clear();
      await this.calculateRefcounts(false);
      if (this.fixLeaks) {
        const saved = { ...res };
        Object.assign(res, { ...emptyResult(), messages: res.messages });
        let again: boolean;
        [again, highest] = await this.compareRefcounts({ leaks: true, errors: false });
        if (again) this.msg('ERROR rebuilt refcount structure is still broken');
        freshLeaks = res.leaks;
        Object.assign(res, saved);
      }
      if (res.corruptions < old.corruptions) res.corruptionsFixed += old.corruptions - res.corruptions;
      if (res.leaks < old.leaks) res.leaksFixed += old.leaks - res.leaks;
      res.leaks += freshLeaks;
    } else if (this.fixLeaks) {
      if (rebuild) {
        this.msg('ERROR need to rebuild refcount structures');
        res.checkErrors++;
        throw new CheckAbort('EIO');
      }
      if (res.leaks || res.corruptions) {
        Object.assign(res, preCompare);
        [, highest] = await this.compareRefcounts({ leaks: this.fixLeaks, errors: this.fixErrors });
      }
    }
    await this.checkOflagCopied();
    res.imageEndOffset = (highest + 1) * this.cs;
  }

  /** QEMU's qcow2_check_read_snapshot_table (without its repairs). Returns the corruptions it found. */
  async readSnapshotTable(snapshotRes: { corruptions: number; checkErrors: number }): Promise<void> {
    const h = this.h;
    const count = h.nbSnapshots;
    if (count > MAX_SNAPSHOTS) {
      snapshotRes.checkErrors++;
      this.errorReport('ERROR snapshot table too large');
      throw new CheckAbort('EFBIG');
    }
    if (num(h.snapshotsOffset) % this.cs !== 0 || num(h.snapshotsOffset) + count * SNAPSHOT_HEADER_SIZE > Number.MAX_SAFE_INTEGER) {
      snapshotRes.checkErrors++;
      this.errorReport('ERROR snapshot table offset invalid');
      throw new CheckAbort('EINVAL');
    }
    const fail = (text: string, errno: string): never => {
      snapshotRes.checkErrors++;
      this.errorReport(`ERROR failed to read the snapshot table: ${text}`);
      throw new CheckAbort(errno);
    };
    let pos = h.snapshotsOffset;
    let tableLength = 0;
    const snaps: SnapshotRef[] = [];
    for (let i = 0; i < count; i++) {
      tableLength = Math.ceil(tableLength / 8) * 8;
      pos = Math.ceil(pos / 8) * 8;
      const head = new DataView((await this.read(pos, SNAPSHOT_HEADER_SIZE)).buffer);
      pos += SNAPSHOT_HEADER_SIZE;
      const l1TableOffset = offsetOf(head.getUint32(0), head.getUint32(4));
      const l1Size = head.getUint32(8);
      const idSize = head.getUint16(12);
      const nameSize = head.getUint16(14);
      const extraDataSize = head.getUint32(36);
      if (extraDataSize > MAX_SNAPSHOT_EXTRA_DATA) {
        fail(`Too much extra metadata in snapshot table entry ${i}`, 'EFBIG');
      }
      pos += extraDataSize;
      const id = utf8.decode(await this.read(pos, idSize));
      pos += idSize;
      const name = utf8.decode(await this.read(pos, nameSize));
      pos += nameSize;
      tableLength += SNAPSHOT_HEADER_SIZE + extraDataSize + idSize + nameSize;
      if (tableLength > MAX_SNAPSHOTS_TABLE_BYTES) fail('Snapshot table is too big', 'EFBIG');
      snaps.push({ l1TableOffset, l1Size, id, name, extraDataSize });
    }
    this.snapshots = snaps;
    this.snapshotsSize = pos - h.snapshotsOffset;
    if (h.version >= 3) {
      snaps.forEach((s, i) => {
        if (s.extraDataSize < 16) {
          snapshotRes.corruptions++;
          // QEMU rewrites the snapshot table here with -r all; qimg leaves that to the writer.
          this.msg(`ERROR snapshot table entry ${i} is incomplete`);
        }
      });
    }
  }
}

/** Reads cluster 0 and parses it as QEMU does in check mode (no refcount table or snapshot table needed). */
async function readHeaderForCheck(storage: Storage): Promise<Qcow2Header> {
  const fileSize = await storage.size();
  let head = new Uint8Array(Math.max(512, Math.min(fileSize, 2 * 1024 * 1024)));
  await readFullZeroFill(storage, head, 0);
  if (head.length >= 24) {
    const bits = new DataView(head.buffer).getUint32(20);
    if (bits >= 9 && bits <= 21 && 2 ** bits > head.length) {
      head = new Uint8Array(2 ** bits);
      await readFullZeroFill(storage, head, 0);
    } else if (bits >= 9 && bits <= 21) {
      head = head.slice(0, 2 ** bits);
    }
  }
  const copy = head.slice();
  const view = new DataView(copy.buffer);
  if (copy.length < 72) return parseHeader(copy);
  const rtClusters = view.getUint32(56);
  const nbSnapshots = view.getUint32(60);
  const snapHi = view.getUint32(64);
  const snapLo = view.getUint32(68);
  if (rtClusters === 0) view.setUint32(56, 1);
  view.setUint32(60, 0);
  view.setUint32(64, 0);
  view.setUint32(68, 0);
  const h = parseHeader(copy);
  h.refcountTableClusters = rtClusters;
  h.nbSnapshots = nbSnapshots;
  h.snapshotsOffset = snapHi >= 0x200000 ? Number.MAX_SAFE_INTEGER : snapHi * TWO_POW_32 + snapLo;
  return h;
}

/** The checks QEMU's qcow2_do_open makes before a check can start; failures are open errors. */
async function prepare(storage: Storage, options: CheckOptions, messages: string[]): Promise<Checker> {
  const h = await readHeaderForCheck(storage);
  const cs = 2 ** h.clusterBits;
  const l2Entries = cs / ((h.incompatibleFeatures & INCOMPAT_EXTL2) !== 0n ? 16 : 8);
  const l1Needed = Math.ceil(h.size / (cs * l2Entries));
  if (l1Needed > 0x7fffffff) throw new FormatError('Image is too big');
  if (h.l1Size < l1Needed) throw new FormatError('L1 table is too small');
  const c = new Checker(storage, h, options, messages);
  c.fileSize = await storage.size();
  c.reftable = new DataView((await c.read(h.refcountTableOffset, h.refcountTableClusters * cs)).buffer);
  c.l1 = new DataView((await c.read(h.l1TableOffset, h.l1Size * 8)).buffer);
  return c;
}

function addResult(out: CheckResult, src: { corruptions: number; leaks?: number; checkErrors: number; corruptionsFixed?: number; leaksFixed?: number }): void {
  out.corruptions += src.corruptions;
  out.leaks += src.leaks ?? 0;
  out.checkErrors += src.checkErrors;
  out.corruptionsFixed += src.corruptionsFixed ?? 0;
  out.leaksFixed += src.leaksFixed ?? 0;
}

/**
 * Checks (and with `repair`, repairs) a qcow2 image as QEMU 7.2's qcow2_co_check does, directly on
 * its storage (opened writable for repairs). Header errors that would stop QEMU from opening the
 * image are thrown (FormatError/UnsupportedError); everything else lands in the result.
 */
export async function checkQcow2(storage: Storage, options: CheckOptions = {}): Promise<CheckResult> {
  if (options.repair !== undefined && storage.readOnly) {
    throw new QimgError('USAGE', 'Cannot repair an image opened read-only');
  }
  const result = emptyResult();
  const c = await prepare(storage, options, result.messages);
  const snapshotRes = { corruptions: 0, checkErrors: 0 };
  try {
    await c.readSnapshotTable(snapshotRes);
  } catch (e) {
    if (!(e instanceof CheckAbort)) throw e;
    addResult(result, snapshotRes);
    result.failure = { errno: e.errno, message: e.message };
    return result;
  }
  try {
    await c.checkRefcounts();
  } catch (e) {
    if (!(e instanceof CheckAbort)) throw e;
    copyRefcountResult(result, c.res);
    addResult(result, snapshotRes);
    result.failure = { errno: e.errno, message: e.message };
    return result;
  }
  copyRefcountResult(result, c.res);
  addResult(result, snapshotRes);
  if (options.repair !== undefined && result.checkErrors === 0 && result.corruptions === 0) {
    await rewriteFlags(storage, c.h, INCOMPAT_DIRTY | INCOMPAT_CORRUPT);
  }
  return result;
}

/** QEMU's qcow2_mark_clean / qcow2_mark_consistent: flush, clear the bits, rewrite the header (qcow2_update_header). */
async function rewriteFlags(storage: Storage, h: Qcow2Header, clear: bigint): Promise<void> {
  if ((h.incompatibleFeatures & clear) === 0n) return;
  await storage.flush();
  h.incompatibleFeatures &= ~clear;
  h.size = Math.floor(h.size / 512) * 512;
  await storage.write(serializeHeader(h), 0);
  await storage.flush();
}

/**
 * Clears the dirty bit as QEMU does when it closes an image it opened writable (qcow2_inactivate
 * marks it clean once its caches are flushed), whatever a check found. qemu-img check -r ends so.
 */
export async function markClean(storage: Storage): Promise<void> {
  const h = await readHeaderForCheck(storage);
  await rewriteFlags(storage, h, INCOMPAT_DIRTY);
}

function copyRefcountResult(out: CheckResult, res: CheckResult): void {
  addResult(out, res);
  out.imageEndOffset = res.imageEndOffset;
  out.totalClusters = res.totalClusters;
  out.allocatedClusters = res.allocatedClusters;
  out.fragmentedClusters = res.fragmentedClusters;
  out.compressedClusters = res.compressedClusters;
}

/**
 * Makes the refcounts of an image opened with the dirty bit (lazy refcounts after a crash) match
 * its metadata exactly, fixes COPIED flags and clears the dirty bit, as QEMU does when it opens
 * a dirty image writable. Throws when the image cannot be repaired ("Could not repair dirty image").
 */
export async function rebuildRefcounts(storage: Storage, options: Omit<CheckOptions, 'repair'> = {}): Promise<CheckResult> {
  const result = await checkQcow2(storage, { ...options, repair: 'all' });
  if (result.failure || result.checkErrors) {
    const why = result.failure?.message ?? STRERROR.EIO;
    throw new QimgError('FORMAT', `Could not repair dirty image: ${why}`, { result });
  }
  return result;
}
