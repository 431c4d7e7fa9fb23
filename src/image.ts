// The format-independent image: generic read and block status over a format's shallow mapping,
// with the backing chain followed here (never inside a format).

import type { Storage } from './io/storage.js';
import { readFullZeroFill } from './io/storage.js';
import { storageExtents } from './sparse/extents.js';
import { settleAll } from './async.js';
import { UnsupportedError, UsageError } from './errors.js';
import type { ImageInfo, SnapshotInfo } from './info.js';

export type ImageFormat = 'qcow2' | 'raw';

/**
 * How a format's own data answers "what is at this guest range", without looking at backing files.
 * One mapping covers `length` bytes that share a kind (and, for data, are contiguous on the host).
 *
 * - `data`: bytes stored uncompressed at `hostOffset` in `storage`. `hostProbe` says how QEMU's
 *   block status looks through to the host file: `raw` (the raw format: a host hole is reported as
 *   zero and not data), `recurse` (qcow2 with metadata preallocation: a host hole adds "zero" to
 *   "data") or `none`.
 * - `zero`: reads as zeros regardless of backing (qcow2 zero flag). `hostOffset` is set when the
 *   cluster is preallocated (QEMU's ZERO_ALLOC).
 * - `unallocated`: the backing file decides (zeros if none). `hostOffset` is set for QEMU's
 *   UNALLOCATED_ALLOC subclusters (extended L2).
 * - `compressed`: one compressed cluster (or part of one); read it with `readCompressed`.
 */
export type ShallowMapping =
  | { kind: 'data'; length: number; storage: Storage; hostOffset: number; hostProbe: 'none' | 'raw' | 'recurse' }
  | { kind: 'zero'; length: number; storage?: Storage; hostOffset?: number }
  | { kind: 'unallocated'; length: number; storage?: Storage; hostOffset?: number }
  | { kind: 'compressed'; length: number };

/** What the generic layer gives a format's write: its own guest read (copy-on-write source) and whether a backing file is open. */
export interface WriteIo {
  readGuest(buf: Uint8Array, guestOffset: number): Promise<void>;
  hasBacking: boolean;
  /**
   * The backing image's virtual size (0 without one). Growing an image, QEMU zero-fills the new
   * range only when the backing file reaches past the old end (bdrv_co_truncate's ZERO_WRITE).
   */
  backingSize?: number;
  /**
   * True when block status through the whole chain says the range reads as zeros (QEMU's
   * bdrv_co_is_zero_fast: metadata only, data that happens to be zero does not count). An empty
   * range is zero.
   */
  readsAsZero(guestOffset: number, length: number): Promise<boolean>;
}

export interface WriteZeroesOptions {
  /** The range may be deallocated (QEMU's BDRV_REQ_MAY_UNMAP); otherwise allocated clusters stay allocated. */
  mayUnmap?: boolean;
}

export interface ResizeOptions {
  /** Required to make the image smaller (as qemu-img resize --shrink). */
  shrink?: boolean;
  preallocation?: 'off' | 'metadata' | 'falloc' | 'full';
  /** Told what qemu-img would warn about without failing (qcow2: persistent bitmaps that could not be stored and stay in_use). */
  onWarning?: (message: string) => void;
}

/** Fields of a new internal snapshot; by default those qemu-img snapshot -c writes. */
export interface CreateSnapshotOptions {
  /** Seconds since the epoch (default: now). */
  dateSec?: number;
  /** Nanoseconds within the second (default: now, microsecond precision as QEMU takes it). */
  dateNsec?: number;
  /** Guest run time in nanoseconds (default 0: qemu-img has no running guest). */
  vmClockNsec?: number;
  /** Record/replay instruction count, -1 for none (default 0, as qemu-img writes). */
  icount?: number;
}

/** What a format supplies to the generic layer. */
export interface FormatDriver {
  readonly format: ImageFormat;
  /** Guest-visible size in bytes. */
  readonly virtualSize: number;
  /** The storage holding the image's own metadata (the file named on the command line). */
  readonly storage: Storage;
  /**
   * The mapping at guestOffset (< virtualSize), covering 1..maxLength bytes. Never does I/O
   * beyond the metadata needed to answer (an L2 table at most).
   */
  getMapping(guestOffset: number, maxLength: number): Promise<ShallowMapping>;
  /** Fills buf with guest bytes [guestOffset, guestOffset+buf.length), which lie in one compressed cluster. */
  readCompressed(guestOffset: number, buf: Uint8Array): Promise<void>;
  /** Facts for `qimg info` (the backing fields are filled from the metadata, not the opened chain). */
  info(): Promise<ImageInfo>;
  /** Flushes (if writable) and closes. */
  close(): Promise<void>;

  // Writing (present when the format can write; `readOnly` false when opened for it). Ranges are
  // checked against virtualSize by the generic layer.
  readonly readOnly?: boolean;
  write?(guestOffset: number, data: Uint8Array, io: WriteIo): Promise<void>;
  writeZeroes?(guestOffset: number, length: number, mayUnmap: boolean, io: WriteIo): Promise<void>;
  discard?(guestOffset: number, length: number, io: WriteIo): Promise<void>;
  writeCompressed?(guestOffset: number, data: Uint8Array, io: WriteIo): Promise<void>;
  flush?(): Promise<void>;
  resize?(newSize: number, options: ResizeOptions, io: WriteIo): Promise<void>;
  // Internal snapshots (qcow2). Absent: the format has none.
  snapshotList?(): SnapshotInfo[];
  createSnapshot?(name: string, options?: CreateSnapshotOptions): Promise<SnapshotInfo>;
  applySnapshot?(idOrName: string): Promise<void>;
  deleteSnapshot?(which: string | { id?: string; name?: string }): Promise<SnapshotInfo>;
  /** Names another backing file and format in the image's metadata (undefined: none). */
  changeBackingFile?(name: string | undefined, format: string | undefined): Promise<void>;
  /** Makes the whole image unallocated, so that it reads through to its backing file. */
  makeEmpty?(): Promise<void>;
}

/**
 * One run of block status, as qemu-img map reports it: `present` = allocated in some layer of
 * the chain, `depth` = how many backing links were followed, `hostOffset` + `file` when the bytes'
 * host location is known (not for compressed clusters).
 */
export interface BlockStatus {
  offset: number;
  length: number;
  data: boolean;
  zero: boolean;
  present: boolean;
  depth: number;
  compressed: boolean;
  hostOffset?: number;
  file?: Storage;
}

/** An open image with its backing chain. Reads, block status, and (opened writable) writes. */
export class Image {
  readonly driver: FormatDriver;
  /** The backing image (itself with its own backing), or null. */
  readonly backing: Image | null;
  private readonly io: WriteIo;

  constructor(driver: FormatDriver, backing: Image | null) {
    this.driver = driver;
    this.backing = backing;
    this.io = {
      readGuest: (buf, offset) => this.readInto(buf, offset),
      hasBacking: backing !== null,
      backingSize: backing?.virtualSize ?? 0,
      readsAsZero: (offset, length) => this.readsAsZero(offset, length),
    };
  }

  /** False only for an image opened writable (`openImage(target, { readOnly: false })`). */
  get readOnly(): boolean {
    return this.driver.readOnly ?? true;
  }

  private checkWrite(what: string, offset: number, length: number): void {
    if (this.readOnly) throw new UsageError(`${this.storage.name}: cannot ${what}: the image is open read-only`);
    if (!Number.isSafeInteger(offset) || !Number.isSafeInteger(length) || offset < 0 || length < 0 || offset + length > this.virtualSize) {
      throw new UsageError(`${what} of ${length} bytes at ${offset} is outside the image (size ${this.virtualSize})`);
    }
  }

  private method<K extends 'write' | 'writeZeroes' | 'discard' | 'writeCompressed' | 'resize'>(name: K): NonNullable<FormatDriver[K]> {
    const fn = this.driver[name];
    if (!fn) throw new UnsupportedError(`The ${this.format} driver cannot ${name}`);
    return fn.bind(this.driver) as NonNullable<FormatDriver[K]>;
  }

  /** Writes data at the guest offset. */
  async write(offset: number, data: Uint8Array): Promise<void> {
    this.checkWrite('write', offset, data.length);
    if (data.length === 0) return;
    await this.method('write')(offset, data, this.io);
  }

  /** Makes the range read as zeros (zero clusters where the format has them; deallocating with mayUnmap). */
  async writeZeroes(offset: number, length: number, options: WriteZeroesOptions = {}): Promise<void> {
    this.checkWrite('write zeroes', offset, length);
    if (length === 0) return;
    await this.method('writeZeroes')(offset, length, options.mayUnmap ?? false, this.io);
  }

  /** Discards the range as QEMU does: whole clusters only (qcow2); afterwards they read as zeros (or from nothing). */
  async discard(offset: number, length: number): Promise<void> {
    this.checkWrite('discard', offset, length);
    if (length === 0) return;
    await this.method('discard')(offset, length, this.io);
  }

  /** Writes whole clusters compressed (qcow2; the last may be partial at the disk's end); only into unallocated clusters. */
  async writeCompressed(offset: number, data: Uint8Array): Promise<void> {
    this.checkWrite('write compressed', offset, data.length);
    if (data.length === 0) return;
    await this.method('writeCompressed')(offset, data, this.io);
  }

  /** Writes out cached metadata and flushes the storage. */
  async flush(): Promise<void> {
    if (this.driver.flush) await this.driver.flush();
  }

  /** Changes the virtual size (shrinking only with `shrink: true`). */
  async resize(newSize: number, options: ResizeOptions = {}): Promise<void> {
    if (this.readOnly) throw new UsageError(`${this.storage.name}: cannot resize: the image is open read-only`);
    if (!Number.isSafeInteger(newSize) || newSize < 0) throw new UsageError(`Invalid image size ${newSize}`);
    await this.method('resize')(newSize, options, this.io);
  }

  /**
   * Names another backing file (`undefined`: none) and its format in the metadata; the open chain
   * is not changed (reopen to read through the new one). Formats without backing files refuse.
   */
  async changeBackingFile(name: string | undefined, format: string | undefined): Promise<void> {
    if (this.readOnly) throw new UsageError(`${this.storage.name}: cannot change the backing file: the image is open read-only`);
    const fn = this.driver.changeBackingFile;
    if (!fn) throw new UnsupportedError('Operation not supported', { errno: 'ENOTSUP' });
    await fn.call(this.driver, name, format);
  }

  /** Makes the whole image unallocated (reads go through to the backing file). */
  async makeEmpty(): Promise<void> {
    if (this.readOnly) throw new UsageError(`${this.storage.name}: cannot empty: the image is open read-only`);
    const fn = this.driver.makeEmpty;
    if (!fn) throw new UnsupportedError('Operation not supported', { errno: 'ENOTSUP' });
    await fn.call(this.driver);
  }

  // ---- internal snapshots

  private snapshotMethod<K extends 'snapshotList' | 'createSnapshot' | 'applySnapshot' | 'deleteSnapshot'>(name: K, write: boolean): NonNullable<FormatDriver[K]> {
    const fn = this.driver[name];
    // errno ENOTSUP: QEMU's answer for a format without snapshots (qemu-img prints it for -c).
    if (!fn) throw new UnsupportedError(`Block format '${this.format}' does not support internal snapshots`, { errno: 95 });
    if (write && this.readOnly) throw new UsageError(`${this.storage.name}: cannot change snapshots: the image is open read-only`);
    return fn.bind(this.driver) as NonNullable<FormatDriver[K]>;
  }

  /** The internal snapshots, in table order. Throws UnsupportedError for formats (or images) that cannot hold any. */
  snapshots(): SnapshotInfo[] {
    return this.snapshotMethod('snapshotList', false)();
  }

  /**
   * Takes an internal snapshot of the active image (qemu-img snapshot -c): the new snapshot gets
   * the next free numeric id; names need not be unique. The image must be open writable.
   */
  async createSnapshot(name: string, options: CreateSnapshotOptions = {}): Promise<SnapshotInfo> {
    return this.snapshotMethod('createSnapshot', true)(name, options);
  }

  /**
   * Reverts the active image to a snapshot (qemu-img snapshot -a), found by id, else by name; the
   * virtual size becomes the snapshot's. Refused when the image has persistent bitmaps (as QEMU).
   */
  async applySnapshot(idOrName: string): Promise<void> {
    await this.snapshotMethod('applySnapshot', true)(idOrName);
  }

  /**
   * Deletes a snapshot, freeing the clusters only it used: a string is looked up as an id, else as a
   * name; `{ id, name }` must match both (either may be left out). Returns what was deleted.
   */
  async deleteSnapshot(which: string | { id?: string; name?: string }): Promise<SnapshotInfo> {
    return this.snapshotMethod('deleteSnapshot', true)(which);
  }

  get format(): ImageFormat {
    return this.driver.format;
  }

  get virtualSize(): number {
    return this.driver.virtualSize;
  }

  get storage(): Storage {
    return this.driver.storage;
  }

  /** Reads `length` guest bytes at `offset` into a new buffer. */
  async read(offset: number, length: number): Promise<Uint8Array> {
    const buf = new Uint8Array(length);
    await this.readInto(buf, offset);
    return buf;
  }

  /**
   * Fills buf with the guest bytes at offset. Adjacent host runs are merged into one storage read,
   * and adjacent unallocated runs into one backing read; all I/O for the request runs concurrently.
   */
  async readInto(buf: Uint8Array, offset: number): Promise<void> {
    const length = buf.length;
    if (offset < 0 || offset + length > this.virtualSize) {
      throw new UsageError(`read of ${length} bytes at ${offset} is outside the image (size ${this.virtualSize})`);
    }
    const ios: Promise<void>[] = [];
    // Reads are awaited only once every lookup is done; one that fails meanwhile must not count as
    // an unhandled rejection (settleAll below still sees it).
    const issue = (io: Promise<void>): void => {
      io.catch(() => undefined);
      ios.push(io);
    };
    // Pending coalesced data run.
    let dStorage: Storage | null = null;
    let dHost = 0;
    let dPos = 0;
    let dLen = 0;
    // Pending coalesced backing run.
    let bPos = -1;
    let bLen = 0;
    const flushData = (): void => {
      if (dStorage && dLen > 0) issue(readFullZeroFill(dStorage, buf.subarray(dPos, dPos + dLen), dHost));
      dStorage = null;
      dLen = 0;
    };
    const flushBacking = (): void => {
      if (bLen > 0) issue(this.readFromBacking(buf.subarray(bPos, bPos + bLen), offset + bPos));
      bLen = 0;
      bPos = -1;
    };
    let pos = 0;
    try {
      while (pos < length) {
        const m = await this.driver.getMapping(offset + pos, length - pos);
        const n = Math.min(m.length, length - pos);
        if (m.kind !== 'unallocated') flushBacking();
        if (m.kind !== 'data') flushData();
        switch (m.kind) {
          case 'data':
            if (dStorage === m.storage && dHost + dLen === m.hostOffset) {
              dLen += n;
            } else {
              flushData();
              dStorage = m.storage;
              dHost = m.hostOffset;
              dPos = pos;
              dLen = n;
            }
            break;
          case 'zero':
            buf.fill(0, pos, pos + n);
            break;
          case 'unallocated':
            if (bLen === 0) bPos = pos;
            bLen += n;
            break;
          case 'compressed':
            issue(this.driver.readCompressed(offset + pos, buf.subarray(pos, pos + n)));
            break;
        }
        pos += n;
      }
    } catch (e) {
      // A failed mapping lookup must not leave the reads already issued unawaited (an unhandled
      // rejection when one fails) or still filling the caller's buffer after we return.
      await Promise.allSettled(ios);
      throw e;
    }
    flushData();
    flushBacking();
    // Every read settles before the first failure is thrown (the buffer is the caller's again).
    await settleAll(ios);
  }

  /** Reads an unallocated range through the backing chain; past the backing's end reads zeros. */
  private async readFromBacking(buf: Uint8Array, offset: number): Promise<void> {
    const backing = this.backing;
    if (!backing || offset >= backing.virtualSize) {
      buf.fill(0);
      return;
    }
    const inBacking = Math.min(buf.length, backing.virtualSize - offset);
    if (inBacking < buf.length) buf.fill(0, inBacking);
    await backing.readInto(inBacking === buf.length ? buf : buf.subarray(0, inBacking), offset);
  }

  /**
   * Block status of the run starting at offset (at most maxLength bytes), following the chain the
   * way qemu-img map does: a layer that neither has data nor zeros passes the question to its
   * backing file, one depth further down.
   */
  async blockStatusAt(offset: number, maxLength: number): Promise<BlockStatus> {
    let bytes = Math.min(maxLength, this.virtualSize - offset);
    if (bytes <= 0) throw new UsageError(`block status at ${offset} is outside the image`);
    // eslint-disable-next-line @typescript-eslint/no-this-alias
    let layer: Image = this;
    let depth = 0;
    for (;;) {
      const m = await layer.driver.getMapping(offset, bytes);
      bytes = Math.min(bytes, m.length);
      if (m.kind === 'data') {
        const st: BlockStatus = {
          offset, length: bytes, data: true, zero: false, present: true, depth, compressed: false,
          hostOffset: m.hostOffset, file: m.storage,
        };
        if (m.hostProbe !== 'none') await probeHost(st, m.storage, m.hostProbe);
        return st;
      }
      if (m.kind === 'compressed') {
        return { offset, length: bytes, data: true, zero: false, present: true, depth, compressed: true };
      }
      if (m.kind === 'zero') {
        return {
          offset, length: bytes, data: false, zero: true, present: true, depth, compressed: false,
          ...(m.hostOffset !== undefined ? { hostOffset: m.hostOffset, file: m.storage } : {}),
        };
      }
      // Unallocated here: the backing file decides; with none (or past its end) the range reads as zeros.
      const backing = layer.backing;
      if (!backing || offset >= backing.virtualSize) {
        return {
          offset, length: bytes, data: false, zero: true, present: false, depth, compressed: false,
          ...(m.hostOffset !== undefined ? { hostOffset: m.hostOffset, file: m.storage } : {}),
        };
      }
      bytes = Math.min(bytes, backing.virtualSize - offset);
      layer = backing;
      depth++;
    }
  }

  /** Block status runs covering [offset, offset+length), in order. */
  async *blockStatus(offset = 0, length = this.virtualSize - offset): AsyncGenerator<BlockStatus> {
    const end = offset + length;
    let pos = offset;
    while (pos < end) {
      const st = await this.blockStatusAt(pos, end - pos);
      yield st;
      pos += st.length;
    }
  }

  info(): Promise<ImageInfo> {
    return this.driver.info();
  }

  /** Whether block status says [offset, offset+length) reads as zeros (see WriteIo.readsAsZero). */
  async readsAsZero(offset: number, length: number): Promise<boolean> {
    if (length <= 0) return true;
    if (offset + length > this.virtualSize) return false;
    const end = offset + length;
    for (let pos = offset; pos < end; ) {
      const st = await this.blockStatusAt(pos, end - pos);
      if (!st.zero) return false;
      pos += st.length;
    }
    return true;
  }

  /** Closes this image and its whole backing chain. */
  async close(): Promise<void> {
    await this.driver.close();
    if (this.backing) await this.backing.close();
  }
}

/** Looks through a data run to the host file, as QEMU's block status does for raw and preallocated qcow2. */
async function probeHost(st: BlockStatus, storage: Storage, how: 'raw' | 'recurse'): Promise<void> {
  const host = st.hostOffset!;
  const size = await storage.size();
  if (host >= size) {
    // Past the host file's end reads as zeros.
    st.zero = true;
    if (how === 'raw') st.data = false;
    return;
  }
  const [first] = await storageExtents(storage, host, Math.min(st.length, size - host));
  if (!first) return;
  if (first.offset + first.length < host + st.length && host + first.length < size) {
    st.length = first.offset + first.length - host;
  } else if (first.offset + first.length < host + st.length) {
    // The extent ends at the file's end: with a hole there the rest reads as zeros too.
    if (!first.hole) st.length = first.offset + first.length - host;
  }
  if (first.hole) {
    st.zero = true;
    if (how === 'raw') st.data = false;
  }
}
