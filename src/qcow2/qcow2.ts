// The qcow2 driver: opens an image (or one of its snapshots) and answers the shallow mapping the
// generic layer in src/image.ts builds reads and block status on.

import type { CreateSnapshotOptions, FormatDriver, ShallowMapping, WriteIo } from '../image.js';
import type { ImageInfo, Qcow2SpecificInfo, SnapshotInfo } from '../info.js';
import type { Storage } from '../io/storage.js';
import { readFullZeroFill } from '../io/storage.js';
import { Limiter } from '../async.js';
import { FormatError, NotFoundError, QimgError, UnsupportedError } from '../errors.js';
import { readHeader, validateTable, type Qcow2Header } from './header.js';
import {
  AUTOCLEAR_BITMAPS, AUTOCLEAR_DATA_FILE_RAW, COMPAT_LAZY_REFCOUNTS, INCOMPAT_CORRUPT, INCOMPAT_DATA_FILE, INCOMPAT_DIRTY, INCOMPAT_EXTL2,
  MAX_L1_BYTES, SUBCLUSTERS_PER_CLUSTER, hex,
} from './layout.js';
import { SubclusterType, decodeCompressed, standardHostOffset, subclusterType, type L2Geometry } from './l2-entry.js';
import { MetaCache } from './cache.js';
import { L1Table } from './l1.js';
import { Refcounts } from './allocator.js';
import { Qcow2Writer } from './write.js';
import { rebuildRefcounts } from './check.js';
import { BitmapTracker } from './bitmaps-write.js';
import { findSnapshot, readSnapshotTable, type Qcow2Snapshot } from './snapshots.js';
import { readBitmapDirectory } from './bitmaps.js';
import { RefcountReader } from './refcount.js';
import {
  ERRNO, SnapshotError, applySnapshot, createSnapshot, deleteSnapshot, type SnapshotCommit, type SnapshotHost,
} from './snapshot-write.js';
import { findSnapshotIndexByIdOrName } from './snapshots.js';
import { getCodec, type ClusterCodec } from './compression.js';
import { backingFileHeader } from './header-write.js';
import { makeEmpty } from './make-empty.js';

/** Default bound on cached L2 tables: a sequential read keeps few tables hot; a 16 TiB image stays small. */
const L2_CACHE_BYTES = 4 * 1024 * 1024;
/** Writers keep more (dirty tables stay until the next write-out; QEMU's default is 32 MiB on Linux). */
const L2_CACHE_BYTES_WRITABLE = 32 * 1024 * 1024;
/** Decompressed clusters kept so that reads splitting a compressed cluster decompress it once. */
const DECOMPRESSED_CACHE_CLUSTERS = 4;
/** Compressed-data read buffers kept for reuse (as many as reads usually run at once). */
const MAX_SPARE_READ_BUFFERS = 16;

export interface Qcow2OpenOptions {
  /** Opens the external data file (called lazily, on the first access to guest data). */
  openDataFile?: (name: string) => Promise<Storage>;
  /** Open this internal snapshot instead of the active L1 table. */
  snapshot?: { id?: string; name?: string };
  /** Open for writing (the storage must be writable; the data file is opened through openDataFile writable too). */
  writable?: boolean;
}

export class Qcow2Driver implements FormatDriver {
  readonly format = 'qcow2' as const;
  readonly storage: Storage;
  readonly header: Qcow2Header;
  virtualSize: number;
  readonly clusterSize: number;
  readonly geometry: L2Geometry;
  readonly snapshots: Qcow2Snapshot[];
  /** The active (or opened snapshot's) L1 table. */
  readonly l1: L1Table;
  /** L2 tables, shared by reads and the writer (reads see tables not yet written). */
  readonly l2Cache: MetaCache;
  private readonly writer: Qcow2Writer | null;
  /** The writer's refcounts (null when read-only), for emptying the image (make-empty.ts). */
  private readonly refcounts: Refcounts | null;
  private readonly subclusterSize: number;
  private readonly openDataFileFn?: (name: string) => Promise<Storage>;
  private dataStorage: Promise<Storage> | null = null;
  private codec: Promise<ClusterCodec> | null = null;
  private readonly decompressed = new Map<number, Promise<Uint8Array>>();
  private readonly compressedReadBuffers: Uint8Array[] = [];
  private readonly compressedReads = new Limiter(MAX_SPARE_READ_BUFFERS);
  /** True when QEMU would detect metadata preallocation (block status then looks through to the host file). */
  private metadataPreallocation: boolean | null = null;

  private constructor(storage: Storage, header: Qcow2Header, l1: L1Table, virtualSize: number,
    snapshots: Qcow2Snapshot[], options: Qcow2OpenOptions, refcounts: Refcounts | null, bitmaps: BitmapTracker | null = null) {
    this.storage = storage;
    this.header = header;
    this.virtualSize = virtualSize;
    this.clusterSize = 2 ** header.clusterBits;
    const extendedL2 = (header.incompatibleFeatures & INCOMPAT_EXTL2) !== 0n;
    const entryBytes = extendedL2 ? 16 : 8;
    this.geometry = {
      clusterBits: header.clusterBits,
      clusterSize: this.clusterSize,
      extendedL2,
      entryBytes,
      l2Entries: this.clusterSize / entryBytes,
      hasDataFile: (header.incompatibleFeatures & INCOMPAT_DATA_FILE) !== 0n,
    };
    this.subclusterSize = extendedL2 ? this.clusterSize / SUBCLUSTERS_PER_CLUSTER : this.clusterSize;
    this.snapshots = snapshots;
    this.l1 = l1;
    this.l2Cache = new MetaCache(storage, this.clusterSize, refcounts ? L2_CACHE_BYTES_WRITABLE : L2_CACHE_BYTES, 2);
    this.openDataFileFn = options.openDataFile;
    this.writer = refcounts ? new Qcow2Writer(this, refcounts, bitmaps) : null;
    this.refcounts = refcounts;
  }

  get readOnly(): boolean {
    return this.writer === null;
  }

  static async open(storage: Storage, options: Qcow2OpenOptions = {}): Promise<Qcow2Driver> {
    if (options.writable) {
      if (options.snapshot) throw new UnsupportedError('Snapshots can only be opened read-only');
      if (storage.readOnly) throw new QimgError('USAGE', `${storage.name}: the storage is read-only`);
      const peek = await Qcow2Driver.open(storage, { ...options, writable: false, openDataFile: undefined });
      const h = peek.header;
      if ((h.incompatibleFeatures & INCOMPAT_CORRUPT) !== 0n) {
        throw new FormatError('qcow2: Image is corrupt; cannot be opened read/write', { corrupt: true });
      }
      if ((h.incompatibleFeatures & INCOMPAT_DIRTY) !== 0n) {
        // As QEMU opening a dirty image writable: rebuild the refcounts from the metadata first.
        await rebuildRefcounts(storage);
      }
    }
    const fileSize = await storage.size();
    const header = await readHeader(storage, fileSize);
    const clusterSize = 2 ** header.clusterBits;
    if (header.cryptMethod !== 0) {
      throw new UnsupportedError(`Encrypted qcow2 images are not supported (crypt_method ${header.cryptMethod})`);
    }
    const extendedL2 = (header.incompatibleFeatures & INCOMPAT_EXTL2) !== 0n;
    if (extendedL2 && clusterSize / SUBCLUSTERS_PER_CLUSTER < 512) {
      throw new FormatError(`Unsupported subcluster size: ${clusterSize / SUBCLUSTERS_PER_CLUSTER}`);
    }
    const hasDataFile = (header.incompatibleFeatures & INCOMPAT_DATA_FILE) !== 0n;
    if (hasDataFile && header.dataFile === undefined && !options.openDataFile) {
      // Reading needs the file; describing the image does not. The error comes on first access.
    }
    if (!hasDataFile && (header.autoclearFeatures & AUTOCLEAR_DATA_FILE_RAW) !== 0n) {
      throw new FormatError('data-file-raw requires a data file');
    }

    const l2Entries = clusterSize / (extendedL2 ? 16 : 8);
    const sizeToL1 = (size: number): number => Math.ceil(size / (clusterSize * l2Entries));
    if (sizeToL1(header.size) > 0x7fffffff) throw new FormatError('Image is too big');
    if (header.l1Size < sizeToL1(header.size)) throw new FormatError('L1 table is too small');

    const snapshots = header.nbSnapshots > 0
      ? await readSnapshotTable(storage, header.snapshotsOffset, header.nbSnapshots, header.size)
      : [];

    let l1Offset = header.l1TableOffset;
    let l1Size = header.l1Size;
    // QEMU counts the disk in whole 512-byte sectors, dropping a partial one.
    const virtualSize = Math.floor(header.size / 512) * 512;
    if (options.snapshot) {
      const snap = findSnapshot(snapshots, options.snapshot);
      if (!snap) {
        const what = options.snapshot.name ?? options.snapshot.id ?? '';
        throw new NotFoundError("Can't find snapshot", { snapshot: options.snapshot, what });
      }
      validateTable(snap.l1TableOffset, snap.l1Size, 8, MAX_L1_BYTES, clusterSize, 'Snapshot L1 table');
      // As QEMU's temporary snapshot load: only the L1 table changes; the disk keeps its current
      // size, and what the snapshot's L1 does not cover reads as unallocated.
      l1Offset = snap.l1TableOffset;
      l1Size = snap.l1Size;
    }

    // The L1 table is bounded by QEMU's 32 MiB limit (validated in parseHeader); entries the file
    // does not hold read as zeros without being allocated.
    const l1Held = Math.max(0, Math.min(l1Size * 8, fileSize - l1Offset));
    let l1: L1Table;
    let refcounts: Refcounts | null = null;
    let bitmaps: BitmapTracker | null = null;
    if (options.writable) {
      const l1Bytes = new Uint8Array(Math.ceil((l1Size * 8) / clusterSize) * clusterSize);
      await readFullZeroFill(storage, l1Bytes.subarray(0, l1Held), l1Offset);
      l1 = new L1Table(l1Bytes, l1Size, l1Offset);
      refcounts = await Refcounts.load(storage, clusterSize, header.refcountOrder, header.refcountTableOffset, header.refcountTableClusters);
      if ((header.autoclearFeatures & AUTOCLEAR_BITMAPS) !== 0n) bitmaps = await BitmapTracker.load(storage, header.bitmaps, clusterSize);
    } else {
      const l1Bytes = new Uint8Array(Math.ceil(l1Held / 8) * 8);
      await readFullZeroFill(storage, l1Bytes, l1Offset);
      l1 = new L1Table(l1Bytes, Math.min(l1Size, l1Bytes.length / 8), l1Offset);
    }
    return new Qcow2Driver(storage, header, l1, virtualSize, snapshots, options, refcounts, bitmaps);
  }

  get dirty(): boolean {
    return (this.header.incompatibleFeatures & INCOMPAT_DIRTY) !== 0n;
  }

  get corrupt(): boolean {
    return (this.header.incompatibleFeatures & INCOMPAT_CORRUPT) !== 0n;
  }

  /** The storage holding guest data: the image file, or the external data file (opened on first use). */
  /** Opens the external data file now (a no-op for images without one); open errors surface here. */
  async openDataFile(): Promise<void> {
    await this.dataFile();
  }

  dataFile(): Promise<Storage> {
    if (!this.geometry.hasDataFile) return Promise.resolve(this.storage);
    if (!this.dataStorage) {
      const name = this.header.dataFile;
      if (name === undefined || !this.openDataFileFn) {
        this.dataStorage = Promise.reject(new FormatError("'data-file' is required for this image"));
      } else {
        this.dataStorage = this.openDataFileFn(name);
      }
      this.dataStorage.catch(() => undefined);
    }
    return this.dataStorage;
  }

  async getMapping(guestOffset: number, maxLength: number): Promise<ShallowMapping> {
    const g = this.geometry;
    const cs = this.clusterSize;
    const clusterIndex = Math.floor(guestOffset / cs);
    const l1Index = Math.floor(clusterIndex / g.l2Entries);
    const l2Index = clusterIndex - l1Index * g.l2Entries;
    const inCluster = guestOffset - clusterIndex * cs;
    // A run never leaves the L2 table that maps its start.
    const limit = Math.min(maxLength, (g.l2Entries - l2Index) * cs - inCluster);
    if (l1Index >= this.l1.size) return { kind: 'unallocated', length: limit };
    const l2Offset = standardHostOffset(this.l1.view.getUint32(l1Index * 8), this.l1.view.getUint32(l1Index * 8 + 4));
    if (l2Offset === 0) return { kind: 'unallocated', length: limit };
    if (l2Offset < 0 || l2Offset % cs !== 0) {
      throw new FormatError(`L2 table offset ${hex(l2Offset)} unaligned (L1 index: ${hex(l1Index)})`, { l1Index, l2Offset });
    }
    const table = await this.l2Cache.get(l2Offset);
    const sc = this.subclusterSize;
    const scBits = g.extendedL2 ? SUBCLUSTERS_PER_CLUSTER : 1;
    let scIndex = Math.floor(inCluster / sc);
    let index = l2Index;
    let at = index * g.entryBytes;
    let hi = table.getUint32(at);
    let lo = table.getUint32(at + 4);
    let bHi = g.extendedL2 ? table.getUint32(at + 8) : 0;
    let bLo = g.extendedL2 ? table.getUint32(at + 12) : 0;
    const type = subclusterType(g, hi, lo, bHi, bLo, scIndex);
    const where = { l2Offset, l2Index: index };

    if (type === SubclusterType.Invalid) {
      throw new FormatError(`Invalid cluster entry found  (L2 offset: ${hex(l2Offset)}, L2 index: ${hex(index)})`, where);
    }
    if ((type === SubclusterType.ZeroPlain || type === SubclusterType.ZeroAlloc) && this.header.version < 3) {
      throw new FormatError(`Zero cluster entry found in pre-v3 image (L2 offset: ${hex(l2Offset)}, L2 index: ${hex(index)})`, where);
    }
    if (type === SubclusterType.Compressed) {
      if (g.hasDataFile) {
        throw new FormatError(`Compressed cluster entry found in image with external data file (L2 offset: ${hex(l2Offset)}, L2 index: ${hex(index)})`, where);
      }
      return { kind: 'compressed', length: Math.min(limit, cs - inCluster) };
    }
    const hasHost = type === SubclusterType.Normal || type === SubclusterType.ZeroAlloc || type === SubclusterType.UnallocatedAlloc;
    let hostCluster = 0;
    if (hasHost) {
      hostCluster = standardHostOffset(hi, lo);
      if (hostCluster < 0 || hostCluster % cs !== 0) {
        throw new FormatError(`Cluster allocation offset ${hex(hostCluster)} unaligned (L2 offset: ${hex(l2Offset)}, L2 index: ${hex(index)})`, where);
      }
      if (g.hasDataFile && hostCluster !== clusterIndex * cs) {
        throw new FormatError(`External data file host cluster offset ${hex(hostCluster)} does not match guest cluster offset: ${hex(clusterIndex * cs)}, L2 index: ${hex(index)})`, where);
      }
    }
    const hostOffset = hostCluster + inCluster;

    // Extend the run over following subclusters/clusters of the same type (and, for types with a
    // host offset, contiguous on the host).
    let length = (scIndex + 1) * sc - inCluster;
    let expectHost = hostCluster + (scIndex + 1) * sc;
    while (length < limit) {
      scIndex++;
      if (scIndex === scBits) {
        scIndex = 0;
        index++;
        at = index * g.entryBytes;
        hi = table.getUint32(at);
        lo = table.getUint32(at + 4);
        if (g.extendedL2) {
          bHi = table.getUint32(at + 8);
          bLo = table.getUint32(at + 12);
        }
        if (hasHost && standardHostOffset(hi, lo) !== expectHost) break;
      }
      if (subclusterType(g, hi, lo, bHi, bLo, scIndex) !== type) break;
      length += sc;
      expectHost += sc;
    }
    length = Math.min(length, limit);

    switch (type) {
      case SubclusterType.Normal: {
        const storage = await this.dataFile();
        return { kind: 'data', length, storage, hostOffset, hostProbe: (await this.hasMetadataPreallocation()) ? 'recurse' : 'none' };
      }
      case SubclusterType.ZeroAlloc:
        return { kind: 'zero', length, storage: await this.dataFile(), hostOffset };
      case SubclusterType.ZeroPlain:
        return { kind: 'zero', length };
      case SubclusterType.UnallocatedAlloc:
        return { kind: 'unallocated', length, storage: await this.dataFile(), hostOffset };
      default:
        return { kind: 'unallocated', length };
    }
  }

  async readCompressed(guestOffset: number, buf: Uint8Array): Promise<void> {
    const cs = this.clusterSize;
    const clusterIndex = Math.floor(guestOffset / cs);
    const inCluster = guestOffset - clusterIndex * cs;
    if (inCluster === 0 && buf.length === cs && !this.decompressed.has(clusterIndex)) {
      // A whole cluster (convert, large reads): decompress straight into the caller's buffer, so a
      // bulk read allocates nothing per cluster; the cache only serves reads that split a cluster.
      await this.doDecompress(clusterIndex, buf);
      return;
    }
    const cluster = await this.decompressCluster(clusterIndex);
    buf.set(cluster.subarray(inCluster, inCluster + buf.length));
  }

  private decompressCluster(clusterIndex: number): Promise<Uint8Array> {
    const hit = this.decompressed.get(clusterIndex);
    if (hit) return hit;
    const work = this.doDecompress(clusterIndex);
    this.decompressed.set(clusterIndex, work);
    work.catch(() => this.decompressed.delete(clusterIndex));
    while (this.decompressed.size > DECOMPRESSED_CACHE_CLUSTERS) {
      this.decompressed.delete(this.decompressed.keys().next().value as number);
    }
    return work;
  }

  private async doDecompress(clusterIndex: number, out: Uint8Array = new Uint8Array(this.clusterSize)): Promise<Uint8Array> {
    const g = this.geometry;
    const l1Index = Math.floor(clusterIndex / g.l2Entries);
    const l2Index = clusterIndex - l1Index * g.l2Entries;
    const l2Offset = standardHostOffset(this.l1.view.getUint32(l1Index * 8), this.l1.view.getUint32(l1Index * 8 + 4));
    const table = await this.l2Cache.get(l2Offset);
    const hi = table.getUint32(l2Index * g.entryBytes);
    const lo = table.getUint32(l2Index * g.entryBytes + 4);
    const desc = decodeCompressed(g, hi, lo);
    if (!desc) {
      throw new FormatError(`Compressed cluster offset out of range (L2 offset: ${hex(l2Offset)}, L2 index: ${hex(l2Index)})`);
    }
    // A compressed cluster spans at most 2 clusters of sectors; the read buffers are reused so that
    // bulk reads of compressed images allocate nothing per cluster. At most MAX_SPARE_READ_BUFFERS
    // clusters are read and decompressed at once (a convert asks for hundreds: each held a read
    // buffer and a decompressor's output chunk while it waited for the thread pool).
    return this.compressedReads.run(async () => {
      const spare = this.compressedReadBuffers.pop() ?? new Uint8Array(2 * this.clusterSize);
      try {
        const src = spare.subarray(0, desc.length);
        await readFullZeroFill(this.storage, src, desc.hostOffset);
        if (!this.codec) this.codec = getCodec(this.header.compressionType === 1 ? 'zstd' : 'zlib');
        const codec = await this.codec;
        await codec.decompress(src, out);
        return out;
      } finally {
        if (this.compressedReadBuffers.length < MAX_SPARE_READ_BUFFERS) this.compressedReadBuffers.push(spare);
      }
    });
  }

  /**
   * QEMU's qcow2_detect_metadata_preallocation: the image counts as metadata-preallocated when the
   * file holds fewer bytes than its allocated clusters, i.e. clusters were allocated but never
   * written. Then block status asks the host file which data clusters are holes.
   */
  private async hasMetadataPreallocation(): Promise<boolean> {
    if (this.metadataPreallocation !== null) return this.metadataPreallocation;
    let result = false;
    if (this.storage.allocatedSize) {
      const cs = this.clusterSize;
      const realClusters = Math.floor((await this.storage.allocatedSize()) / cs);
      const threshold = Math.max(Math.floor((realClusters * 10) / 9), realClusters + 2);
      const endCluster = Math.ceil((await this.storage.size()) / cs);
      const h = this.header;
      const refcounts = new RefcountReader(this.storage, h.refcountTableOffset, h.refcountTableClusters, cs, h.refcountOrder);
      let count = 0;
      for (let i = 0; i < endCluster && count < threshold; i++) {
        if ((await refcounts.refcount(i)) !== 0) count++;
      }
      result = count >= threshold;
    }
    this.metadataPreallocation = result;
    return result;
  }

  async info(): Promise<ImageInfo> {
    const h = this.header;
    const actualSize = this.storage.allocatedSize ? await this.storage.allocatedSize() : undefined;
    const specific: Qcow2SpecificInfo = {
      type: 'qcow2',
      compat: h.version === 2 ? '0.10' : '1.1',
      compressionType: h.compressionType === 1 ? 'zstd' : 'zlib',
      refcountBits: 2 ** h.refcountOrder,
    };
    if (h.version === 3) {
      specific.lazyRefcounts = (h.compatibleFeatures & COMPAT_LAZY_REFCOUNTS) !== 0n;
      if (h.bitmaps) specific.bitmaps = await readBitmapDirectory(this.storage, h.bitmaps);
      specific.corrupt = this.corrupt;
      specific.extendedL2 = this.geometry.extendedL2;
      if (h.dataFile !== undefined) specific.dataFile = h.dataFile;
      if (this.geometry.hasDataFile) specific.dataFileRaw = (h.autoclearFeatures & AUTOCLEAR_DATA_FILE_RAW) !== 0n;
    }
    return {
      filename: this.storage.name,
      format: 'qcow2',
      virtualSize: this.virtualSize,
      ...(actualSize !== undefined ? { actualSize } : {}),
      clusterSize: this.clusterSize,
      dirtyFlag: this.dirty,
      encrypted: h.cryptMethod !== 0,
      ...(h.backingFile !== undefined ? { backingFilename: h.backingFile } : {}),
      ...(h.backingFormat !== undefined ? { backingFilenameFormat: h.backingFormat } : {}),
      snapshots: this.snapshots.map(snapshotInfo),
      formatSpecific: specific,
    };
  }

  // ---------------------------------------------------------------- writing (write.ts)

  invalidateReadCaches(): void {
    this.decompressed.clear();
  }

  private requireWriter(): Qcow2Writer {
    if (!this.writer) throw new QimgError('USAGE', `${this.storage.name}: the image is open read-only`);
    return this.writer;
  }

  write(guestOffset: number, data: Uint8Array, io: WriteIo): Promise<void> {
    return this.requireWriter().write(guestOffset, data, io);
  }

  writeZeroes(guestOffset: number, length: number, mayUnmap: boolean, io: WriteIo): Promise<void> {
    return this.requireWriter().writeZeroes(guestOffset, length, mayUnmap, io);
  }

  discard(guestOffset: number, length: number, io: WriteIo): Promise<void> {
    return this.requireWriter().discard(guestOffset, length, io);
  }

  writeCompressed(guestOffset: number, data: Uint8Array, io: WriteIo): Promise<void> {
    return this.requireWriter().writeCompressed(guestOffset, data, io);
  }

  async flush(): Promise<void> {
    if (this.writer) await this.writer.flush();
  }

  resize(newSize: number, options: { shrink?: boolean; preallocation?: string; onWarning?: (message: string) => void }, io: WriteIo): Promise<void> {
    const mode = options.preallocation ?? 'off';
    if (mode !== 'off' && mode !== 'metadata' && mode !== 'falloc' && mode !== 'full') {
      throw new UnsupportedError(`Unsupported preallocation mode '${mode}'`);
    }
    return this.requireWriter().resize(newSize, options.shrink ?? false, io, mode, options.onWarning);
  }

  /**
   * Names another backing file (or none) in the header, as qcow2_change_backing_file: everything
   * written so far is flushed first, so the one header write names only metadata on disk. Call
   * with no other operation on this image in flight.
   */
  async changeBackingFile(name: string | undefined, format: string | undefined): Promise<void> {
    this.requireWriter();
    await this.flush();
    await this.storage.write(backingFileHeader(this.header, name, format), 0);
    await this.storage.flush();
  }

  /**
   * Makes every guest cluster of the active layer unallocated (reads go to the backing file);
   * snapshots and bitmaps are left as they are. Call with no other operation in flight.
   */
  async makeEmpty(): Promise<void> {
    this.requireWriter();
    await this.flush();
    this.invalidateReadCaches();
    await makeEmpty({ storage: this.storage, geometry: this.geometry, l1: this.l1, l2Cache: this.l2Cache, refcounts: this.refcounts! });
  }

  // ---------------------------------------------------------------- internal snapshots (snapshot-write.ts)

  /** The snapshot table (QEMU's qcow2_snapshot_list: refused with an external data file). */
  snapshotList(): SnapshotInfo[] {
    if (this.geometry.hasDataFile) throw new SnapshotError('UNSUPPORTED', 'Internal snapshots are not supported with an external data file', ERRNO.ENOTSUP);
    return this.snapshots.map(snapshotInfo);
  }

  async createSnapshot(name: string, options: CreateSnapshotOptions = {}): Promise<SnapshotInfo> {
    return this.requireWriter().offline(async () => {
      const { commit, snapshot } = await createSnapshot(this.snapshotHost(), name, options);
      this.adopt(commit);
      return snapshotInfo(snapshot);
    });
  }

  /** Makes the snapshot found by id, else by name (QEMU's find_snapshot_by_id_or_name), the active image. */
  async applySnapshot(idOrName: string): Promise<void> {
    await this.requireWriter().offline(async () => {
      const index = this.geometry.hasDataFile || (this.header.bitmaps?.nbBitmaps ?? 0) > 0
        ? 0 // applySnapshot refuses these before looking the name up, as QEMU does
        : findSnapshotIndexByIdOrName(this.snapshots, idOrName);
      this.adopt(await applySnapshot(this.snapshotHost(), index));
    });
  }

  /** Deletes a snapshot: by id, else by name when given a string; by both when given both. */
  async deleteSnapshot(which: string | { id?: string; name?: string }): Promise<SnapshotInfo> {
    return this.requireWriter().offline(async () => {
      let index: number;
      if (typeof which === 'string') {
        index = findSnapshotIndexByIdOrName(this.snapshots, which);
      } else {
        index = this.snapshots.findIndex((s) => (which.id === undefined || s.id === which.id) && (which.name === undefined || s.name === which.name));
        if (which.id === undefined && which.name === undefined) index = -1;
      }
      const info = index >= 0 ? snapshotInfo(this.snapshots[index]!) : null;
      this.adopt(await deleteSnapshot(this.snapshotHost(), index));
      return info!;
    });
  }

  private snapshotHost(): SnapshotHost {
    return {
      storage: this.storage, header: this.header, geometry: this.geometry, clusterSize: this.clusterSize,
      l1Bytes: this.l1.bytes.subarray(0, this.l1.size * 8), snapshots: this.snapshots, virtualSize: this.virtualSize,
    };
  }

  /** Takes over the state a snapshot operation committed to the file. */
  private adopt(c: SnapshotCommit): void {
    const h = this.header;
    h.size = c.size;
    h.l1Size = c.l1Size;
    h.l1TableOffset = c.l1Offset;
    h.refcountTableOffset = c.refcountTableOffset;
    h.refcountTableClusters = c.refcountTableClusters;
    h.nbSnapshots = c.snapshots.length;
    h.snapshotsOffset = c.snapshotsOffset;
    h.autoclearFeatures = c.autoclearFeatures;
    this.virtualSize = Math.floor(c.size / 512) * 512;
    const bytes = new Uint8Array(Math.ceil((c.l1Size * 8) / this.clusterSize) * this.clusterSize);
    bytes.set(c.l1Bytes);
    Object.assign(this.l1, { bytes, view: new DataView(bytes.buffer), size: c.l1Size, offset: c.l1Offset, relocated: false });
    this.snapshots.splice(0, this.snapshots.length, ...c.snapshots);
    this.l2Cache.clear();
    this.invalidateReadCaches();
    this.metadataPreallocation = null;
  }

  async close(): Promise<void> {
    try {
      if (this.writer) await this.writer.close();
    } finally {
      await this.closeStorages();
    }
  }

  private async closeStorages(): Promise<void> {
    this.l2Cache.clear();
    this.decompressed.clear();
    if (this.dataStorage) {
      const ds = await this.dataStorage.catch(() => null);
      if (ds && ds !== this.storage) await ds.close();
    }
    await this.storage.close();
  }
}


function snapshotInfo(s: Qcow2Snapshot): SnapshotInfo {
  return {
    id: s.id, name: s.name, vmStateSize: s.vmStateSize, dateSec: s.dateSec, dateNsec: s.dateNsec,
    vmClockNsec: s.vmClockNsec, diskSize: s.diskSize, ...(s.icount >= 0 ? { icount: s.icount } : {}),
  };
}
