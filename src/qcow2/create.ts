// Creating qcow2 images with the layout qemu-img 7.2 produces.
//
// QEMU creates an image in steps (qcow2_co_create): a minimal header, a one-cluster refcount table
// and an empty refcount block at clusters 1 and 2; then it reopens the image and uses its ordinary
// allocator to refcount clusters 0-2, grows the L1 table to the virtual size, preallocates, and
// rewrites the header. Where each structure lands therefore follows from that allocator's rules
// (first-fit from a moving free-cluster index, refcount blocks placed where they can describe
// themselves, refcount-table growth by a self-describing area at the end of the file, freed
// clusters reused). `LayoutPlanner` replays those rules on a sparse model (intervals of used
// clusters, the refcount table, L2 offsets and data runs), so memory is bounded by the number of
// tables, never by the virtual size; `writeLayout` then writes the same byte ranges QEMU writes,
// so file length and allocated blocks match as well as the bytes.

import type { Storage } from '../io/storage.js';
import { zeroBuffer } from '../io/zero.js';
import { QimgError, UsageError } from '../errors.js';
import type { Qcow2Header } from './header.js';
import { serializeHeader } from './header-write.js';
import {
  AUTOCLEAR_DATA_FILE_RAW, COMPAT_LAZY_REFCOUNTS, COPIED_HI, INCOMPAT_COMPRESSION, INCOMPAT_DATA_FILE,
  INCOMPAT_EXTL2, MAX_CLUSTER_BITS, MAX_L1_BYTES, MIN_CLUSTER_BITS, SUBCLUSTERS_PER_CLUSTER,
} from './layout.js';

export type Qcow2Preallocation = 'off' | 'metadata' | 'falloc' | 'full';

export interface Qcow2CreateOptions {
  /** Virtual size in bytes (QEMU silently rounds it up to a multiple of 512). */
  size: number;
  compat?: '0.10' | '1.1';
  clusterSize?: number;
  refcountBits?: number;
  lazyRefcounts?: boolean;
  extendedL2?: boolean;
  compressionType?: 'zlib' | 'zstd';
  preallocation?: Qcow2Preallocation;
  backingFile?: string;
  backingFormat?: string;
  /** The external data file name as recorded in the header. */
  dataFile?: string;
  dataFileRaw?: boolean;
}

export interface Qcow2CreateResult {
  header: Qcow2Header;
  /** Length of the image file and of the data file (if any) after creation. */
  fileLength: number;
  dataFileLength?: number;
  /** How the falloc preallocation was done: reserved by the storage, or emulated by writing zeros. */
  fallocMethod?: 'allocate' | 'zeros';
}

const INT_MAX = 2147483647;
/** BDRV_REQUEST_MAX_BYTES: (INT_MAX >> 9) << 9. */
const REQUEST_MAX_BYTES = 2147483136;
/** QCOW_MAX_REFTABLE_SIZE; QEMU compares entry counts against this byte value. */
const MAX_REFTABLE_SIZE = 8 * 1024 * 1024;
const SECTOR = 512;
const MAX_BLOCKSIZE = 4096;

/** The normalised, validated options (QEMU's view after qcow2_co_create's defaults). */
export interface Qcow2Plan {
  version: 2 | 3;
  clusterSize: number;
  clusterBits: number;
  refcountOrder: number;
  extendedL2: boolean;
  lazyRefcounts: boolean;
  compressionType: 0 | 1;
  preallocation: Qcow2Preallocation;
  size: number;
  backingFile?: string;
  backingFormat?: string;
  dataFile?: string;
  dataFileRaw: boolean;
}

function isPowerOfTwo(n: number): boolean {
  return Number.isInteger(n) && n > 0 && 2 ** Math.round(Math.log2(n)) === n;
}

/**
 * Validates and normalises the options in qcow2_co_create_opts / qcow2_co_create's order, with
 * QEMU's messages. Throws UsageError.
 */
export function planQcow2(options: Qcow2CreateOptions): Qcow2Plan {
  const fail = (msg: string): never => {
    throw new UsageError(msg);
  };
  // QAPI parsing first (qcow2_co_create_opts): enum values.
  const compat = options.compat as string | undefined;
  if (compat !== undefined && compat !== '0.10' && compat !== '1.1') {
    fail(`Parameter 'version' does not accept value '${compat}'`);
  }
  const prealloc = (options.preallocation ?? 'off') as string;
  if (!['off', 'metadata', 'falloc', 'full'].includes(prealloc)) {
    fail(`Parameter 'preallocation' does not accept value '${prealloc}'`);
  }
  const compression = (options.compressionType ?? 'zlib') as string;
  if (compression !== 'zlib' && compression !== 'zstd') {
    fail(`Parameter 'compression-type' does not accept value '${compression}'`);
  }
  const refcountBits = options.refcountBits ?? 16;
  if (!Number.isInteger(refcountBits) || refcountBits < 0) {
    fail(`Parameter 'refcount-bits' expects uint64`);
  }
  const clusterSize = options.clusterSize ?? 65536;
  if (!Number.isInteger(clusterSize) || clusterSize < 0) fail(`Parameter 'cluster-size' expects size`);
  if (!Number.isSafeInteger(options.size) || options.size < 0) fail(`Parameter 'size' expects size`);
  // "Silently round up size".
  const size = Math.ceil(options.size / SECTOR) * SECTOR;

  const version = compat === '0.10' ? 2 : 3;
  const extendedL2 = options.extendedL2 ?? false;
  if (extendedL2 && version < 3) {
    fail('Extended L2 entries are only supported with compatibility level 1.1 and above (use version=v3 or greater)');
  }
  const clusterBits = Math.round(Math.log2(clusterSize));
  if (!isPowerOfTwo(clusterSize) || clusterBits < MIN_CLUSTER_BITS || clusterBits > MAX_CLUSTER_BITS) {
    fail(`Cluster size must be a power of two between ${2 ** MIN_CLUSTER_BITS} and ${2 ** (MAX_CLUSTER_BITS - 10)}k`);
  }
  if (extendedL2 && clusterSize < 2 ** MIN_CLUSTER_BITS * SUBCLUSTERS_PER_CLUSTER) {
    fail(`Extended L2 entries are only supported with cluster sizes of at least ${2 ** MIN_CLUSTER_BITS * SUBCLUSTERS_PER_CLUSTER} bytes`);
  }
  let preallocation = prealloc as Qcow2Preallocation;
  const hasBacking = options.backingFile !== undefined;
  if (hasBacking && preallocation !== 'off' && !extendedL2) {
    fail('Backing file and preallocation can only be used at the same time if extended_l2 is on');
  }
  if (options.backingFormat !== undefined && !hasBacking) fail('Backing format cannot be used without backing file');
  const lazyRefcounts = options.lazyRefcounts ?? false;
  if (version < 3 && lazyRefcounts) {
    fail('Lazy refcounts only supported with compatibility level 1.1 and above (use version=v3 or greater)');
  }
  if (refcountBits > 64 || !isPowerOfTwo(refcountBits)) {
    fail('Refcount width must be a power of two and may not exceed 64 bits');
  }
  if (version < 3 && refcountBits !== 16) {
    fail('Different refcount widths than 16 bits require compatibility level 1.1 or above (use version=v3 or greater)');
  }
  const dataFileRaw = options.dataFileRaw ?? false;
  if (dataFileRaw && options.dataFile === undefined) fail('data-file-raw requires data-file');
  if (dataFileRaw && hasBacking) fail('Backing file and data-file-raw cannot be used at the same time');
  // The data file must stay a valid raw image, so the L1/L2 tables must map it 1:1.
  if (dataFileRaw && preallocation === 'off') preallocation = 'metadata';
  if (options.dataFile !== undefined && version < 3) {
    fail('External data files are only supported with compatibility level 1.1 and above (use version=v3 or greater)');
  }
  if (compression !== 'zlib' && version < 3) {
    fail('Non-zlib compression type is only supported with compatibility level 1.1 and above (use version=v3 or greater)');
  }
  if (hasBacking && options.backingFile!.length > 1023) {
    fail(`Could not assign backing file '${options.backingFile}' with format '${options.backingFormat ?? '(null)'}': Invalid argument`);
  }
  return {
    version,
    clusterSize,
    clusterBits,
    refcountOrder: Math.round(Math.log2(refcountBits)),
    extendedL2,
    lazyRefcounts,
    compressionType: compression === 'zstd' ? 1 : 0,
    preallocation,
    size,
    backingFile: options.backingFile,
    backingFormat: options.backingFormat,
    dataFile: options.dataFile,
    dataFileRaw,
  };
}

// ---------------------------------------------------------------------------------------------
// The allocator model.

/** Sorted, disjoint half-open cluster intervals: the clusters whose refcount is 1. */
class ClusterSet {
  private readonly starts: number[] = [];
  private readonly ends: number[] = [];

  /** Index of the first interval whose end is > c. */
  private find(c: number): number {
    let lo = 0;
    let hi = this.ends.length;
    while (lo < hi) {
      const mid = (lo + hi) >>> 1;
      if (this.ends[mid]! > c) hi = mid;
      else lo = mid + 1;
    }
    return lo;
  }

  has(c: number): boolean {
    const i = this.find(c);
    return i < this.starts.length && this.starts[i]! <= c;
  }

  /** The first used cluster in [a, b), or -1. */
  firstUsed(a: number, b: number): number {
    const i = this.find(a);
    if (i >= this.starts.length) return -1;
    const s = Math.max(this.starts[i]!, a);
    return s < b ? s : -1;
  }

  add(a: number, b: number): void {
    if (b <= a) return;
    if (this.firstUsed(a, b) >= 0) throw new Error(`qcow2 create: cluster ${a}..${b} already in use`);
    let i = this.find(a - 1); // may merge with an interval ending exactly at a
    if (i < this.starts.length && this.ends[i] === a) {
      this.ends[i] = b;
      if (i + 1 < this.starts.length && this.starts[i + 1] === b) {
        this.ends[i] = this.ends[i + 1]!;
        this.starts.splice(i + 1, 1);
        this.ends.splice(i + 1, 1);
      }
      return;
    }
    i = this.find(a);
    if (i < this.starts.length && this.starts[i] === b) {
      this.starts[i] = a;
      return;
    }
    this.starts.splice(i, 0, a);
    this.ends.splice(i, 0, b);
  }

  /** Removes [a, b) (all of it must be used). */
  remove(a: number, b: number): void {
    if (b <= a) return;
    const i = this.find(a);
    const s = this.starts[i];
    const e = this.ends[i];
    if (s === undefined || e === undefined || s > a || e < b) throw new Error(`qcow2 create: freeing unused clusters ${a}..${b}`);
    const pieces: [number, number][] = [];
    if (s < a) pieces.push([s, a]);
    if (b < e) pieces.push([b, e]);
    this.starts.splice(i, 1, ...pieces.map((p) => p[0]));
    this.ends.splice(i, 1, ...pieces.map((p) => p[1]));
  }

  /** Calls fn for each used run intersecting [a, b), clipped. */
  forEach(a: number, b: number, fn: (s: number, e: number) => void): void {
    for (let i = this.find(a); i < this.starts.length && this.starts[i]! < b; i++) {
      fn(Math.max(this.starts[i]!, a), Math.min(this.ends[i]!, b));
    }
  }
}

const AGAIN = 'again' as const;
type Result = 'ok' | typeof AGAIN;

/** A byte range QEMU writes during creation, with what goes there. */
type Region =
  | { kind: 'stale-reftable'; offset: number; entries: number[]; bytes: number }
  | { kind: 'zeros'; target: 'image' | 'data'; offset: number; length: number }
  | { kind: 'cow'; target: 'image' | 'data'; offset: number; length: number }
  | { kind: 'falloc'; target: 'image' | 'data'; offset: number; length: number };

interface DataRun {
  guestCluster: number;
  hostOffset: number;
  clusters: number;
}

/** What is left to write once the allocation has been replayed. */
export interface Qcow2Layout {
  plan: Qcow2Plan;
  l1Offset: number;
  l1Size: number;
  reftableOffset: number;
  reftable: number[];
  /** Cluster indexes of every live refcount block, from the final refcount table. */
  refblocks: { index: number; offset: number }[];
  l2Tables: Map<number, number>;
  dataRuns: DataRun[];
  regions: Region[];
  used: ClusterSet;
  fileLength: number;
  dataFileLength: number;
  /** True when the image file is grown by truncate after the last write (QEMU's bdrv_co_truncate). */
}

export class LayoutPlanner {
  readonly cs: number;
  readonly cbits: number;
  /** log2 of refcount entries per refcount block. */
  private readonly rbBits: number;
  private readonly rbEntries: number;
  private table: number[];
  private tableSize: number;
  private tableOffset: number;
  private maxTableIndex = 0;
  readonly used = new ClusterSet();
  private freeIndex = 0;
  private l1Size = 0;
  private l1Offset = 0;
  private readonly l2Entries: number;
  private readonly subclusterSize: number;
  readonly l2Tables = new Map<number, number>();
  readonly dataRuns: DataRun[] = [];
  readonly regions: Region[] = [];
  private fileLength: number;
  private dataFileLength = 0;
  private readonly hasDataFile: boolean;

  constructor(private readonly plan: Qcow2Plan) {
    this.cs = plan.clusterSize;
    this.cbits = plan.clusterBits;
    this.rbBits = this.cbits + 3 - plan.refcountOrder;
    this.rbEntries = 2 ** this.rbBits;
    this.l2Entries = this.cs / (plan.extendedL2 ? 16 : 8);
    this.subclusterSize = plan.extendedL2 ? this.cs / SUBCLUSTERS_PER_CLUSTER : this.cs;
    this.hasDataFile = plan.dataFile !== undefined;
    // The minimal image: header at 0, refcount table (one cluster) at 1, empty refcount block at 2.
    this.tableSize = this.cs / 8;
    this.table = [2];
    this.tableOffset = 1;
    this.fileLength = 3 * this.cs;
  }

  private grow(target: 'image' | 'data', end: number): void {
    if (target === 'image') this.fileLength = Math.max(this.fileLength, end);
    else this.dataFileLength = Math.max(this.dataFileLength, end);
  }

  private refcount(c: number): number {
    const ti = Math.floor(c / this.rbEntries);
    if (ti >= this.tableSize || !this.table[ti]) return 0;
    return this.used.has(c) ? 1 : 0;
  }

  /** alloc_clusters_noref: first fit from the free-cluster index. */
  private allocNoref(n: number): number {
    for (;;) {
      const p = this.freeIndex;
      const u = this.firstRefcounted(p, p + n);
      if (u < 0) {
        this.freeIndex = p + n;
        return p;
      }
      this.freeIndex = u + 1;
    }
  }

  private firstRefcounted(a: number, b: number): number {
    // Used clusters are always covered by a hooked-up refcount block here.
    return this.used.firstUsed(a, b);
  }

  /** update_refcount over clusters [start, start+n), by +1 or -1. */
  private updateRefcount(start: number, n: number, decrease: boolean): Result {
    const end = start + n;
    let c = start;
    while (c < end) {
      const ti = Math.floor(c / this.rbEntries);
      const chunkEnd = Math.min(end, (ti + 1) * this.rbEntries);
      if (this.allocRefcountBlock(c) === AGAIN) {
        if (this.freeIndex > start) this.freeIndex = start;
        if (c > start) this.updateRefcount(start, c - start, !decrease);
        return AGAIN;
      }
      if (decrease) {
        this.used.remove(c, chunkEnd);
        if (c < this.freeIndex) this.freeIndex = c;
      } else {
        this.used.add(c, chunkEnd);
      }
      c = chunkEnd;
    }
    return 'ok';
  }

  /** alloc_refcount_block: 'ok' when the block covering cluster c exists, else allocates and says 'again'. */
  private allocRefcountBlock(c: number): Result {
    const ti = Math.floor(c / this.rbEntries);
    if (ti < this.tableSize && this.table[ti]) return 'ok';
    const newBlock = this.allocNoref(1);
    if (newBlock === 0) throw new QimgError('FORMAT', 'Preventing invalid allocation of refcount block at offset 0');
    if (Math.floor(newBlock / this.rbEntries) === ti) {
      this.used.add(newBlock, newBlock + 1); // describes itself
    } else if (this.updateRefcount(newBlock, 1, false) === AGAIN) {
      return AGAIN;
    }
    this.grow('image', (newBlock + 1) * this.cs);
    if (ti < this.tableSize) {
      this.table[ti] = newBlock;
      this.maxTableIndex = Math.max(this.maxTableIndex, ti);
      return AGAIN;
    }
    const blocksUsed = Math.ceil(Math.max(c + 1, newBlock + 1) / this.rbEntries);
    this.refcountArea(blocksUsed * this.rbEntries, 0, false, ti, newBlock);
    return AGAIN;
  }

  /** qcow2_refcount_metadata_size: the number of refcount blocks for `clusters` clusters. */
  private refblockCount(clusters: number, generous: boolean): number {
    const perTableCluster = this.cs / 8;
    let table = 0;
    let blocks = 0;
    let n = 0;
    let last: number;
    do {
      last = n;
      blocks = Math.ceil((clusters + table + blocks) / this.rbEntries);
      table = Math.ceil(blocks / perTableCluster);
      n = clusters + blocks + table;
      if (n === last && generous) {
        clusters += Math.ceil(table / 2);
        n = 0;
        generous = false;
      }
    } while (n !== last);
    return blocks;
  }

  private efbig(): never {
    throw new QimgError('USAGE', 'File too large', { errno: 'EFBIG' });
  }

  /** qcow2_refcount_area: a new self-describing refcount table (and blocks) at cluster `start`. */
  private refcountArea(start: number, additional: number, exact: boolean, newIndex: number, newBlock: number): number {
    const total = this.refblockCount(start + additional, !exact);
    if (total > MAX_REFTABLE_SIZE) this.efbig();
    const areaIndex = Math.floor(start / this.rbEntries);
    let tableSize = exact ? total : total + Math.ceil(total / 2);
    const perCluster = this.cs / 8;
    tableSize = Math.ceil(tableSize / perCluster) * perCluster;
    const tableClusters = tableSize / perCluster;
    if (tableSize > MAX_REFTABLE_SIZE) this.efbig();
    const copy = tableSize > this.maxTableIndex ? this.maxTableIndex + 1 : tableSize;
    const newTable: number[] = this.table.slice(0, copy);
    if (newBlock) newTable[newIndex] = newBlock;
    let additionalBlocks = 0;
    for (let i = areaIndex; i < total; i++) if (!newTable[i]) additionalBlocks++;
    const tableOffset = start + additionalBlocks;
    const end = tableOffset + tableClusters;
    let block = start;
    for (let i = areaIndex; i < total; i++) {
      if (!newTable[i]) newTable[i] = block++;
      const first = i * this.rbEntries;
      if (first < end) {
        const j = first < start ? start - first : 0;
        const endIndex = Math.min(end - first, this.rbEntries);
        this.used.add(first + j, first + endIndex);
      }
    }
    this.grow('image', end * this.cs);
    // The old table stays on disk as it was (its clusters are freed, possibly reused later).
    this.regions.push({ kind: 'stale-reftable', offset: this.tableOffset * this.cs, entries: this.table.slice(), bytes: this.tableSize * 8 });
    const oldOffset = this.tableOffset;
    const oldSize = this.tableSize;
    this.table = newTable;
    this.tableSize = tableSize;
    this.tableOffset = tableOffset;
    this.maxTableIndex = 0;
    for (let i = newTable.length - 1; i >= 0; i--) {
      if (newTable[i]) {
        this.maxTableIndex = i;
        break;
      }
    }
    this.freeClusters(oldOffset, Math.ceil((oldSize * 8) / this.cs));
    return end;
  }

  private freeClusters(start: number, n: number): void {
    this.updateRefcount(start, n, true);
  }

  /** qcow2_alloc_clusters: n contiguous clusters, first fit. */
  allocClusters(n: number): number {
    for (;;) {
      const off = this.allocNoref(n);
      if (this.updateRefcount(off, n, false) !== AGAIN) return off;
    }
  }

  /** qcow2_alloc_clusters_at: as many of n clusters at `at` as are free (0 if `at` is taken). */
  private allocClustersAt(at: number, n: number): number {
    if (n === 0) return 0;
    for (;;) {
      const u = this.used.firstUsed(at, at + n);
      const free = u < 0 ? n : u - at;
      if (this.updateRefcount(at, free, false) !== AGAIN) return free;
    }
  }

  /** Steps of qcow2_co_create after the minimal image is written. */
  run(): void {
    const p = this.plan;
    if (this.allocClusters(3) !== 0) throw new Error('qcow2 create: first cluster in empty image is already in use');
    // blk_co_truncate(size, preallocation) from 0.
    const l1Size = Math.ceil(p.size / (this.cs * this.l2Entries));
    if (l1Size > 0) {
      if (l1Size > Math.floor(INT_MAX / 8) || l1Size > MAX_L1_BYTES / 8) this.efbig();
      const l1 = this.allocClusters(Math.ceil((l1Size * 8) / this.cs));
      this.l1Size = l1Size;
      this.l1Offset = l1;
      this.grow('image', l1 * this.cs + l1Size * 8);
    }
    let mode = p.preallocation;
    if (p.dataFileRaw && mode === 'off') mode = 'metadata';
    switch (mode) {
      case 'off':
        if (this.hasDataFile) this.truncateFile('data', p.size, 'off');
        break;
      case 'metadata':
        this.preallocate(p.size, 'metadata');
        break;
      case 'falloc':
      case 'full':
        if (this.hasDataFile) this.preallocate(p.size, mode);
        else this.preallocateFile(p.size, mode);
        break;
    }
  }

  /** get_cluster_table: the L2 table for a guest cluster, allocated (zeroed) on first use. */
  private l2For(guestCluster: number): void {
    const l1Index = Math.floor(guestCluster / this.l2Entries);
    if (l1Index >= this.l1Size) throw new Error('qcow2 create: guest offset beyond the L1 table');
    if (this.l2Tables.has(l1Index)) return;
    const l2 = this.allocClusters(1);
    this.l2Tables.set(l1Index, l2);
    this.grow('image', (l2 + 1) * this.cs);
  }

  /** preallocate_co: allocate L2 tables and data clusters for [0, size) with the write path's allocator. */
  private preallocate(size: number, mode: Qcow2Preallocation): void {
    const target = this.hasDataFile ? 'data' : 'image';
    const chunkMax = Math.floor(INT_MAX / this.cs) * this.cs;
    let offset = 0;
    let bytes = size;
    let hostOffset = 0;
    let curBytes = 0;
    while (bytes > 0) {
      curBytes = Math.min(bytes, chunkMax);
      const r = this.allocHostOffset(offset, curBytes);
      hostOffset = r.hostOffset;
      curBytes = r.bytes;
      bytes -= curBytes;
      offset += curBytes;
    }
    const end = hostOffset + curBytes;
    const length = target === 'image' ? this.fileLength : this.dataFileLength;
    if (end > length) this.truncateFile(target, end, mode === 'metadata' ? 'off' : mode);
  }

  /** qcow2_alloc_host_offset + qcow2_handle_l2meta for one request. */
  private allocHostOffset(offset: number, bytes: number): { hostOffset: number; bytes: number } {
    const cs = this.cs;
    const INV = -1;
    let start = offset;
    let remaining = bytes;
    let clusterOffset = INV;
    let hostOffset = INV;
    let cur = 0;
    const metas: { guest: number; alloc: number; clusters: number; cowFrom: number; cowTo: number }[] = [];
    for (;;) {
      if (hostOffset === INV && clusterOffset !== INV) hostOffset = clusterOffset;
      start += cur;
      remaining -= cur;
      if (clusterOffset !== INV) clusterOffset += cur;
      if (remaining === 0) break;
      cur = remaining;
      const guestCluster = Math.floor(start / cs);
      const inCluster = start % cs;
      // handle_copied: looks the cluster up (allocating its L2 table); nothing is allocated yet.
      this.l2For(guestCluster);
      // handle_alloc
      let nb = Math.ceil((inCluster + cur) / cs);
      nb = Math.min(nb, this.l2Entries - (guestCluster % this.l2Entries), Math.floor(REQUEST_MAX_BYTES / cs));
      let alloc: number;
      if (this.hasDataFile) {
        alloc = guestCluster;
      } else if (clusterOffset === INV) {
        alloc = this.allocClusters(nb);
      } else {
        alloc = Math.floor(clusterOffset / cs);
        nb = this.allocClustersAt(alloc, nb);
      }
      if (nb === 0) {
        cur = 0;
        break;
      }
      const nbBytes = Math.min(cur + inCluster, nb * cs);
      cur = Math.min(cur, nbBytes - inCluster);
      clusterOffset = alloc * cs + inCluster;
      const cowFrom = inCluster + cur;
      const cowTo = Math.ceil(cowFrom / this.subclusterSize) * this.subclusterSize;
      metas.push({ guest: guestCluster, alloc, clusters: Math.ceil(cowFrom / cs), cowFrom, cowTo });
    }
    const target = this.hasDataFile ? 'data' : 'image';
    for (const m of metas) {
      // perform_cow: the tail of the last cluster, from the end of the disk to the (sub)cluster
      // end, is copied before the L2 entries are linked; it lies past the disk, so it reads as zeros.
      if (m.cowTo > m.cowFrom) {
        const at = m.alloc * cs + m.cowFrom;
        this.regions.push({ kind: 'cow', target, offset: at, length: m.cowTo - m.cowFrom });
        this.grow(target, at + m.cowTo - m.cowFrom);
      }
      this.dataRuns.push({ guestCluster: m.guest, hostOffset: m.alloc * cs, clusters: m.clusters });
    }
    return { hostOffset, bytes: bytes - remaining };
  }

  /** The falloc/full branch of qcow2_co_truncate for an image without a data file. */
  private preallocateFile(size: number, mode: 'falloc' | 'full'): void {
    const cs = this.cs;
    let oldFileClusters = Math.ceil(this.fileLength / cs);
    for (let c = oldFileClusters - 1; c >= 0; c--) {
      if (this.refcount(c) > 0) {
        oldFileClusters = c + 1;
        break;
      }
    }
    const dataClusters = Math.ceil(size / cs);
    const l2Tables = Math.ceil(dataClusters / this.l2Entries) + 1;
    const allocationStart = this.refcountArea(oldFileClusters, dataClusters + l2Tables, true, 0, 0);
    const got = this.allocClustersAt(allocationStart, dataClusters);
    if (got !== dataClusters) throw new Error('qcow2 create: preallocated data clusters are not free');
    this.truncateFile('image', (allocationStart + dataClusters) * cs, mode);
    let guest = 0;
    let host = allocationStart;
    let left = dataClusters;
    while (left > 0) {
      const n = Math.min(left, this.l2Entries - (guest % this.l2Entries));
      this.l2For(guest);
      this.dataRuns.push({ guestCluster: guest, hostOffset: host * cs, clusters: n });
      guest += n;
      host += n;
      left -= n;
    }
  }

  /** file-posix truncate: grows with the preallocation mode (off also writes the first block of an empty file). */
  private truncateFile(target: 'image' | 'data', length: number, mode: 'off' | 'falloc' | 'full'): void {
    const current = target === 'image' ? this.fileLength : this.dataFileLength;
    if (length > current) {
      if (mode === 'full') this.regions.push({ kind: 'zeros', target, offset: current, length: length - current });
      if (mode === 'falloc') this.regions.push({ kind: 'falloc', target, offset: current, length: length - current });
      if (current === 0 && mode !== 'full') {
        // allocate_first_block, to speed up QEMU's alignment probing later.
        this.regions.push({ kind: 'zeros', target, offset: 0, length: length < MAX_BLOCKSIZE ? SECTOR : MAX_BLOCKSIZE });
      }
    }
    if (target === 'image') this.fileLength = length;
    else this.dataFileLength = length;
  }

  layout(): Qcow2Layout {
    const refblocks: { index: number; offset: number }[] = [];
    this.table.forEach((off, index) => {
      if (off) refblocks.push({ index, offset: off });
    });
    return {
      plan: this.plan,
      l1Offset: this.l1Offset * this.cs,
      l1Size: this.l1Size,
      reftableOffset: this.tableOffset * this.cs,
      reftable: this.table,
      refblocks,
      l2Tables: this.l2Tables,
      dataRuns: this.dataRuns,
      regions: this.regions,
      used: this.used,
      fileLength: this.fileLength,
      dataFileLength: this.dataFileLength,
    };
  }

  get reftableClusters(): number {
    return (this.tableSize * 8) / this.cs;
  }
}

// ---------------------------------------------------------------------------------------------
// Writing.

/** The header QEMU ends up with for this plan and layout. */
export function createdHeader(plan: Qcow2Plan, layout: Qcow2Layout, reftableClusters: number): Qcow2Header {
  let incompatible = 0n;
  if (plan.dataFile !== undefined) incompatible |= INCOMPAT_DATA_FILE;
  if (plan.compressionType !== 0) incompatible |= INCOMPAT_COMPRESSION;
  if (plan.extendedL2) incompatible |= INCOMPAT_EXTL2;
  return {
    version: plan.version,
    backingFileOffset: 0,
    backingFileSize: 0,
    clusterBits: plan.clusterBits,
    size: plan.size,
    cryptMethod: 0,
    l1Size: layout.l1Size,
    l1TableOffset: layout.l1Offset,
    refcountTableOffset: layout.reftableOffset,
    refcountTableClusters: reftableClusters,
    nbSnapshots: 0,
    snapshotsOffset: 0,
    incompatibleFeatures: plan.version === 3 ? incompatible : 0n,
    compatibleFeatures: plan.lazyRefcounts ? COMPAT_LAZY_REFCOUNTS : 0n,
    autoclearFeatures: plan.dataFileRaw ? AUTOCLEAR_DATA_FILE_RAW : 0n,
    refcountOrder: plan.refcountOrder,
    headerLength: plan.version === 3 ? 112 : 72,
    compressionType: plan.compressionType,
    unknownHeaderFields: new Uint8Array(0),
    extensions: [],
    featureNames: [],
    ...(plan.backingFormat !== undefined ? { backingFormat: plan.backingFormat } : {}),
    ...(plan.dataFile !== undefined ? { dataFile: plan.dataFile } : {}),
    ...(plan.backingFile !== undefined ? { backingFile: plan.backingFile } : {}),
  };
}

/** Sets refcount entries [from, to) of a refcount block to 1 (widths 1..64, sub-byte LSB first). */
function setRefcountsToOne(block: Uint8Array, order: number, from: number, to: number): void {
  const bits = 2 ** order;
  if (bits >= 8) {
    const bytes = bits / 8;
    for (let i = from; i < to; i++) block[i * bytes + bytes - 1] = 1;
    return;
  }
  const perByte = 8 / bits;
  const full = bits === 1 ? 0xff : bits === 2 ? 0x55 : 0x11;
  let i = from;
  for (; i < to && i % perByte !== 0; i++) block[Math.floor(i / perByte)]! |= 1 << ((i % perByte) * bits);
  const firstByte = i / perByte;
  const lastByte = Math.floor(to / perByte);
  if (lastByte > firstByte) {
    block.fill(full, firstByte, lastByte);
    i = lastByte * perByte;
  }
  for (; i < to; i++) block[Math.floor(i / perByte)]! |= 1 << ((i % perByte) * bits);
}

function tableBytes(entries: number[], bytes: number): Uint8Array {
  const buf = new Uint8Array(bytes);
  const view = new DataView(buf.buffer);
  entries.forEach((e, i) => {
    if (e && i * 8 < bytes) {
      view.setUint32(i * 8, Math.floor(e / 4294967296));
      view.setUint32(i * 8 + 4, e >>> 0);
    }
  });
  return buf;
}

export interface WriteTargets {
  image: Storage;
  data?: Storage;
}


async function writeZeros(storage: Storage, offset: number, length: number): Promise<void> {
  const chunk = 1 << 20;
  for (let pos = 0; pos < length; pos += chunk) {
    const n = Math.min(chunk, length - pos);
    await storage.write(zeroBuffer(n), offset + pos);
  }
}

/** Writes what QEMU writes for the layout, in an order where later QEMU writes win. */
export async function writeLayout(layout: Qcow2Layout, header: Qcow2Header, targets: WriteTargets): Promise<'allocate' | 'zeros' | undefined> {
  const plan = layout.plan;
  const cs = plan.clusterSize;
  const image = targets.image;
  const storageOf = (t: 'image' | 'data'): Storage => (t === 'image' ? image : targets.data!);
  let fallocMethod: 'allocate' | 'zeros' | undefined;

  // 1. The minimal image's refcount table and empty refcount block (clusters 1-2), then any
  //    refcount table that was later replaced, as it was when replaced.
  await image.write(tableBytes([2 * cs], 2 * cs), cs);
  for (const r of layout.regions) {
    if (r.kind === 'stale-reftable') await image.write(tableBytes(r.entries.map((e) => e * cs), r.bytes), r.offset);
  }
  // 2. Data: preallocation and copy-on-write tails.
  for (const r of layout.regions) {
    if (r.kind === 'zeros') {
      await writeZeros(storageOf(r.target), r.offset, r.length);
    } else if (r.kind === 'falloc') {
      const s = storageOf(r.target);
      if (s.allocate) {
        await s.allocate(r.offset, r.length);
        fallocMethod ??= 'allocate';
      } else {
        // Node has no fallocate: do what posix_fallocate does on file systems without it (write
        // zeros), so the space is really reserved and the allocated size matches QEMU's.
        await writeZeros(s, r.offset, r.length);
        fallocMethod = 'zeros';
      }
    } else if (r.kind === 'cow') {
      // The tail past the virtual size: QEMU's copy-on-write reads it as zeros (also with a backing file).
      await writeZeros(storageOf(r.target), r.offset, r.length);
    }
  }
  // 3. Live metadata: refcount blocks, refcount table, L2 tables, L1 table.
  const order = plan.refcountOrder;
  const entriesPerBlock = (cs * 8) / 2 ** order;
  const block = new Uint8Array(cs);
  for (const rb of layout.refblocks) {
    block.fill(0);
    const first = rb.index * entriesPerBlock;
    layout.used.forEach(first, first + entriesPerBlock, (s, e) => setRefcountsToOne(block, order, s - first, e - first));
    await image.write(block, rb.offset * cs);
  }
  await image.write(tableBytes(layout.reftable.map((e) => e * cs), header.refcountTableClusters * cs), layout.reftableOffset);

  const entryBytes = plan.extendedL2 ? 16 : 8;
  const l2Entries = cs / entryBytes;
  const l1 = new Uint8Array(layout.l1Size * 8);
  const l1View = new DataView(l1.buffer);
  const l2 = new Uint8Array(cs);
  const l2View = new DataView(l2.buffer);
  const runs = [...layout.dataRuns].sort((a, b) => a.guestCluster - b.guestCluster);
  let runIndex = 0;
  const l1Indexes = [...layout.l2Tables.keys()].sort((a, b) => a - b);
  for (const l1Index of l1Indexes) {
    const l2Offset = layout.l2Tables.get(l1Index)! * cs;
    l1View.setUint32(l1Index * 8, (Math.floor(l2Offset / 4294967296) | COPIED_HI) >>> 0);
    l1View.setUint32(l1Index * 8 + 4, l2Offset >>> 0);
    l2.fill(0);
    const firstGuest = l1Index * l2Entries;
    const endGuest = firstGuest + l2Entries;
    while (runIndex < runs.length && runs[runIndex]!.guestCluster + runs[runIndex]!.clusters <= firstGuest) runIndex++;
    for (let k = runIndex; k < runs.length && runs[k]!.guestCluster < endGuest; k++) {
      const run = runs[k]!;
      const s = Math.max(run.guestCluster, firstGuest);
      const e = Math.min(run.guestCluster + run.clusters, endGuest);
      for (let g = s; g < e; g++) {
        const host = run.hostOffset + (g - run.guestCluster) * cs;
        const at = (g - firstGuest) * entryBytes;
        l2View.setUint32(at, (Math.floor(host / 4294967296) | COPIED_HI) >>> 0);
        l2View.setUint32(at + 4, host >>> 0);
      }
    }
    await image.write(l2, l2Offset);
  }
  if (layout.l1Size > 0) await image.write(l1, layout.l1Offset);
  // 4. The header cluster.
  await image.write(serializeHeader(header), 0);
  // 5. Lengths set by truncation (sparse tails).
  if ((await image.size()) < layout.fileLength) await image.truncate(layout.fileLength);
  if (targets.data && (await targets.data.size()) < layout.dataFileLength) await targets.data.truncate(layout.dataFileLength);
  return fallocMethod;
}

/**
 * Creates a qcow2 image on `storage` (which must be empty: freshly created or truncated to 0) and,
 * when the plan has a data file, writes the data file's preallocation to `data`.
 */
export async function createQcow2(plan: Qcow2Plan, targets: WriteTargets): Promise<Qcow2CreateResult> {
  const planner = new LayoutPlanner(plan);
  planner.run();
  const layout = planner.layout();
  const header = createdHeader(plan, layout, planner.reftableClusters);
  const fallocMethod = await writeLayout(layout, header, targets);
  return {
    header,
    fileLength: layout.fileLength,
    ...(plan.dataFile !== undefined ? { dataFileLength: layout.dataFileLength } : {}),
    ...(fallocMethod ? { fallocMethod } : {}),
  };
}
