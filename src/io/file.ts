// A Storage over a file (fs/promises FileHandle), with koffi fast paths when available.
// This is the only module in src/ that imports node:fs.

import { constants as fsConstants, fstatSync, ftruncateSync, read as fsRead, write as fsWrite, writev as fsWritev } from 'node:fs';
import { open as fsOpen, type FileHandle } from 'node:fs/promises';
import type { OpenStorageOptions, Storage, StorageExtent } from './storage.js';
import { extentCollector } from './storage.js';
import { IoError, UsageError } from '../errors.js';
import { checkOpen, checkRange, checkWritable } from './check.js';
import { loadNative, nativeAllowed, NATIVE_ENXIO, type NativeFileOps } from './native.js';
import { writeZeroBytes } from './zero.js';
import { applyLocks, NOTHING_HELD, reportLockingUnavailable, type HeldLocks, type LockPerms } from './lock.js';

export interface FileStorageOptions extends OpenStorageOptions {
  /**
   * Use the native fast paths (SEEK_DATA/SEEK_HOLE extents, punch-hole discard) when koffi loads.
   * Default true; QIMG_NO_NATIVE=1 disables them regardless.
   */
  native?: boolean;
  /**
   * flush() does not sync to the medium: QEMU's cache=unsafe (cache.no-flush), which qemu-img
   * convert uses for its target by default. Data still reaches the file; only durability is waived.
   */
  noFlush?: boolean;
  /**
   * QEMU's image locks to take as the file is opened (src/io/lock.ts): with `create`, before the
   * file is truncated, so that a file in use elsewhere is refused intact. Absent: no locks until
   * lock() is called.
   */
  locks?: LockPerms;
}

/** strerror(3) texts for the errno codes Node reports, as QEMU prints them. */
const STRERROR: Record<string, string> = {
  ENOENT: 'No such file or directory',
  EACCES: 'Permission denied',
  EPERM: 'Operation not permitted',
  EISDIR: 'Is a directory',
  ENOTDIR: 'Not a directory',
  EEXIST: 'File exists',
  EROFS: 'Read-only file system',
  ENOSPC: 'No space left on device',
  EIO: 'Input/output error',
  EBADF: 'Bad file descriptor',
  EINVAL: 'Invalid argument',
  EFBIG: 'File too large',
  EMFILE: 'Too many open files',
  ENFILE: 'Too many open files in system',
  ELOOP: 'Too many levels of symbolic links',
  ENAMETOOLONG: 'File name too long',
  ETXTBSY: 'Text file busy',
  EBUSY: 'Device or resource busy',
  EAGAIN: 'Resource temporarily unavailable',
  EOPNOTSUPP: 'Operation not supported',
  ENOTSUP: 'Operation not supported',
  ENXIO: 'No such device or address',
  ENODEV: 'No such device',
  EDQUOT: 'Disk quota exceeded',
  ENOLCK: 'No locks available',
  ENOSYS: 'Function not implemented',
};

/** Linux errno numbers for the codes the native path returns. */
const ERRNO_NAMES: Record<number, string> = {
  1: 'EPERM', 5: 'EIO', 6: 'ENXIO', 9: 'EBADF', 13: 'EACCES', 22: 'EINVAL', 27: 'EFBIG',
  28: 'ENOSPC', 30: 'EROFS', 37: 'ENOLCK', 38: 'ENOSYS', 95: 'EOPNOTSUPP',
};

/** The strerror text for an errno number. */
function errnoText(errno: number): string {
  const name = ERRNO_NAMES[errno];
  return name ? strerror(name) : `Unknown error ${errno}`;
}

/** The strerror text for an errno code name ("ENOENT" -> "No such file or directory"). */
export function strerror(code: string | undefined): string {
  if (!code) return 'Unknown error';
  return STRERROR[code] ?? code;
}

function errnoCode(err: unknown): string | undefined {
  const code = (err as { code?: unknown } | null)?.code;
  return typeof code === 'string' ? code : undefined;
}

function wrap(what: string, path: string, err: unknown, data: Record<string, unknown> = {}): IoError {
  if (err instanceof IoError) return err;
  const code = errnoCode(err);
  const text = code ? strerror(code) : err instanceof Error ? err.message : String(err);
  return new IoError(`${what} '${path}': ${text}`, { path, errno: code, ...data }, { cause: err });
}

/**
 * fs open flags: read-only, read-write, and create. Creating does not truncate at open: the file
 * is truncated once its locks are held (a file another process uses must stay intact).
 */
const DEFAULT_OPEN_FLAGS = {
  read: 'r',
  write: 'r+',
  create: fsConstants.O_RDWR | fsConstants.O_CREAT,
} as const;

/** How far past the end of the file reserveHint reserves blocks at a time. */
const RESERVE_AHEAD = 32 * 1024 * 1024;

/** Buffers per pwritev call (Linux IOV_MAX is 1024). */
const WRITEV_MAX = 1024;

export class FileStorage implements Storage {
  readonly name: string;
  readonly readOnly: boolean;
  private readonly handle: FileHandle;
  /**
   * The native operations: undefined until first needed (loading koffi costs start-up time that
   * a command never using them should not pay), then the loaded ops or null. `nativeWanted` is
   * decided at open (options and QIMG_NO_NATIVE), as if koffi were loaded then.
   */
  private nativeOps: NativeFileOps | null | undefined;
  private readonly nativeWanted: boolean;
  private closed = false;
  /** Reads and writes in flight on the descriptor; close waits for them (as FileHandle.close does). */
  private inflight = 0;
  /** Woken when no read or write is in flight any more. */
  private drained: (() => void)[] = [];
  /** Cleared when the file system refuses FALLOC_FL_PUNCH_HOLE; discard then writes zeros. */
  private punchSupported = true;
  /** Cleared at the first refused reserveHint (no fallocate there): the hint is then a no-op. */
  private reserveSupported = true;
  /** The window reserveHint reserved ahead past the end of the file (see reserveHint). */
  private reservedStart = 0;
  private reservedEnd = 0;
  private reservedPastEof = false;
  private readonly extentsFn = (offset: number, length: number): Promise<StorageExtent[]> =>
    this.nativeExtents(offset, length);
  private readonly discardFn = (offset: number, length: number): Promise<void> => this.nativeDiscard(offset, length);
  private readonly writeZeroesFn = (offset: number, length: number): Promise<void> =>
    this.nativeWriteZeroes(offset, length);
  private readonly allocateFn = (offset: number, length: number): Promise<void> => this.nativeAllocate(offset, length);

  /** See FileStorageOptions.noFlush. */
  private noFlush = false;
  /** The image lock bytes this file's description holds (src/io/lock.ts). */
  private held: HeldLocks = NOTHING_HELD;

  private constructor(name: string, handle: FileHandle, readOnly: boolean, nativeWanted: boolean) {
    this.name = name;
    this.handle = handle;
    this.readOnly = readOnly;
    this.nativeWanted = nativeWanted;
    if (!nativeWanted) this.nativeOps = null;
  }

  private get native(): NativeFileOps | null {
    if (this.nativeOps === undefined) this.nativeOps = loadNative();
    return this.nativeOps;
  }

  /** Present when the native fast paths are loaded (SEEK_DATA/SEEK_HOLE). */
  get extents(): ((offset: number, length: number) => Promise<StorageExtent[]>) | undefined {
    return this.native ? this.extentsFn : undefined;
  }

  /** Present when the native fast paths are loaded (punch hole). */
  get discard(): ((offset: number, length: number) => Promise<void>) | undefined {
    return this.native && !this.readOnly ? this.discardFn : undefined;
  }

  /** Present when the native fast paths are loaded (punch hole, then extend). */
  get writeZeroes(): ((offset: number, length: number) => Promise<void>) | undefined {
    return this.native && !this.readOnly ? this.writeZeroesFn : undefined;
  }

  /**
   * See Storage.reserveHint. Past the end of the file (an image growing as it is written) the
   * blocks are reserved RESERVE_AHEAD at a time with FALLOC_FL_KEEP_SIZE, so that the size only
   * grows with the writes and a reservation is one system call per 32 MiB rather than per write
   * (each one waits for the inode lock the writes in flight hold); inside the file exactly the
   * range. The call runs on the thread pool, counted with the reads and writes in flight. Blocks
   * reserved past the end are given back (ftruncate to the same size, once nothing is in flight)
   * on flush and close, so the file's "disk size" is what was written.
   */
  reserveHint(offset: number, length: number): void {
    if (!this.reserveSupported || this.closed || this.readOnly || length <= 0) return;
    if (offset >= this.reservedStart && offset + length <= this.reservedEnd) return;
    const native = this.native;
    if (!native) {
      this.reserveSupported = false;
      return;
    }
    let size: number;
    try {
      size = fstatSync(this.handle.fd).size;
    } catch {
      return;
    }
    let end = offset + length;
    if (offset >= size) {
      end = Math.max(end, offset + RESERVE_AHEAD);
      this.reservedStart = offset;
      this.reservedEnd = end;
      this.reservedPastEof = true;
    } else if (end > size) {
      this.reservedPastEof = true;
    }
    // On the thread pool: a reservation waits for the journal and for the inode lock the writes in
    // flight hold, which stalled the event loop when made here (5-7 ms in a 2 GiB convert, 49 ms in
    // a slow one, everything waiting meanwhile).
    this.inflight++;
    native.reserveAsync(this.handle.fd, offset, end - offset, (result) => {
      // Any failure (no space, no fallocate here): the writes report what matters.
      if (result !== 0) {
        this.reserveSupported = false;
        this.reservedStart = this.reservedEnd = 0;
      }
      this.opDone();
    });
  }

  /**
   * Gives back blocks reserved past the end of the file (ext4 frees them on a truncate to the same
   * size). Synchronous once nothing is in flight, so no write of this storage can slip between
   * reading the size and truncating to it.
   */
  private async releaseReserved(): Promise<void> {
    if (!this.reservedPastEof) return;
    while (this.inflight > 0) await new Promise<void>((resolve) => this.drained.push(resolve));
    if (!this.reservedPastEof) return;
    this.reservedPastEof = false;
    this.reservedStart = this.reservedEnd = 0;
    try {
      ftruncateSync(this.handle.fd, fstatSync(this.handle.fd).size);
    } catch {
      // Only space: the data is intact either way.
    }
  }

  /** Present when the native fast paths are loaded (fallocate mode 0). */
  get allocate(): ((offset: number, length: number) => Promise<void>) | undefined {
    return this.native && !this.readOnly ? this.allocateFn : undefined;
  }

  /**
   * Opens (or with `create`, creates and truncates) the file at `path`. Errors are IoErrors worded
   * as QEMU's: `Could not open '<path>': <strerror>`.
   */
  static async open(path: string, options: FileStorageOptions): Promise<FileStorage> {
    if (options.create && options.readOnly) {
      throw new UsageError(`Could not create '${path}': cannot create a file read-only`, { path });
    }
    const flags = options.create
      ? DEFAULT_OPEN_FLAGS.create
      : options.readOnly
        ? DEFAULT_OPEN_FLAGS.read
        : DEFAULT_OPEN_FLAGS.write;
    let handle: FileHandle;
    try {
      handle = await fsOpen(path, flags, 0o644);
    } catch (err) {
      throw wrap('Could not open', path, err);
    }
    let length = 0;
    try {
      const st = await handle.stat();
      length = st.size;
      if (st.isDirectory()) {
        throw Object.assign(new Error('Is a directory'), { code: 'EISDIR' });
      }
    } catch (err) {
      await handle.close().catch(() => undefined);
      throw wrap('Could not open', path, err);
    }
    const nativeWanted = options.native !== false && nativeAllowed();
    const storage = new FileStorage(path, handle, options.readOnly && !options.create, nativeWanted);
    storage.noFlush = options.noFlush ?? false;
    try {
      if (options.locks) storage.lock(options.locks);
      // An empty file needs no truncation (which ext4 would remember as a rewrite to flush on close).
      if (options.create && length !== 0) await storage.truncate(0);
    } catch (err) {
      await handle.close().catch(() => undefined);
      throw err;
    }
    return storage;
  }

  /**
   * Takes QEMU's image locks for holding `perms.perm` and sharing `perms.shared`, replacing those
   * held before; throws a LockError (QEMU's message, hint in data.hint) when another open file
   * description holds conflicting ones, keeping the previous locks. Closing the file releases them.
   * Where image locking is unavailable (no native helpers, QIMG_NO_NATIVE=1, no OFD locks) this
   * takes nothing and reports it once per call through onLockingUnavailable.
   */
  lock(perms: LockPerms): void {
    checkOpen(this.name, this.closed);
    const ops = loadNative()?.ofdLocks;
    if (!ops) {
      reportLockingUnavailable();
      return;
    }
    const outcome = applyLocks(ops, this.handle.fd, this.name, this.held, perms, errnoText);
    this.held = outcome.held;
    if (outcome.ok) return;
    if (outcome.unsupported) {
      reportLockingUnavailable();
      return;
    }
    throw outcome.error;
  }

  /** The lock bytes held now (masks of permission bits for bytes 100 + i and 200 + i). */
  get heldLocks(): HeldLocks {
    return this.held;
  }

  /** The OS file descriptor (for native calls); stays valid until close. */
  get fd(): number {
    return this.handle.fd;
  }

  /** True when the native fast paths (koffi) are in use. */
  get nativeEnabled(): boolean {
    return this.native !== null;
  }

  async read(buf: Uint8Array, offset: number): Promise<number> {
    checkOpen(this.name, this.closed);
    checkRange(this.name, offset, buf.length);
    let done = 0;
    try {
      while (done < buf.length) {
        const bytesRead = await this.pread(buf, done, buf.length - done, offset + done);
        if (bytesRead === 0) break;
        done += bytesRead;
      }
    } catch (err) {
      throw wrap('Could not read', this.name, err, { offset: offset + done });
    }
    return done;
  }

  async write(buf: Uint8Array, offset: number): Promise<void> {
    checkOpen(this.name, this.closed);
    checkWritable(this.name, this.readOnly);
    checkRange(this.name, offset, buf.length);
    let done = 0;
    try {
      while (done < buf.length) {
        const bytesWritten = await this.pwrite(buf, done, buf.length - done, offset + done);
        if (bytesWritten <= 0) throw Object.assign(new Error('short write'), { code: 'EIO' });
        done += bytesWritten;
      }
    } catch (err) {
      throw wrap('Could not write to', this.name, err, { offset: offset + done });
    }
  }

  async writev(bufs: Uint8Array[], offset: number): Promise<void> {
    checkOpen(this.name, this.closed);
    checkWritable(this.name, this.readOnly);
    let total = 0;
    for (const b of bufs) total += b.length;
    checkRange(this.name, offset, total);
    let pos = 0;
    // IOV_MAX is 1024 on Linux.
    for (let i = 0; i < bufs.length; i += WRITEV_MAX) {
      const group = bufs.slice(i, i + WRITEV_MAX);
      let length = 0;
      for (const b of group) length += b.length;
      let done: number;
      try {
        done = await this.pwritev(group, offset + pos);
      } catch (err) {
        throw wrap('Could not write to', this.name, err, { offset: offset + pos });
      }
      // A short write (rare): the rest piece by piece.
      for (let at = 0, k = 0; done < length && k < group.length; at += group[k]!.length, k++) {
        const b = group[k]!;
        if (at + b.length > done) {
          const from = Math.max(0, done - at);
          await this.write(b.subarray(from), offset + pos + at + from);
        }
      }
      pos += length;
    }
  }

  // Reads and writes use the callback API on the descriptor: FileHandle.read/write cost about
  // three times as much CPU per call (measured: 32768 preads of 12 KiB, 64 in flight: 320 ms
  // with FileHandle, 120 ms with fs.read), which matters for compressed images (one read per
  // cluster). The FileHandle still owns the descriptor and closes it once these have finished.
  private pread(buf: Uint8Array, offset: number, length: number, position: number): Promise<number> {
    this.inflight++;
    return new Promise((resolve, reject) => {
      fsRead(this.handle.fd, buf, offset, length, position, (err, bytesRead) => {
        this.opDone();
        if (err) reject(err);
        else resolve(bytesRead);
      });
    });
  }

  private pwrite(buf: Uint8Array, offset: number, length: number, position: number): Promise<number> {
    this.inflight++;
    return new Promise((resolve, reject) => {
      fsWrite(this.handle.fd, buf, offset, length, position, (err, bytesWritten) => {
        this.opDone();
        if (err) reject(err);
        else resolve(bytesWritten);
      });
    });
  }

  private pwritev(bufs: Uint8Array[], position: number): Promise<number> {
    this.inflight++;
    return new Promise((resolve, reject) => {
      fsWritev(this.handle.fd, bufs as NodeJS.ArrayBufferView[], position, (err, bytesWritten) => {
        this.opDone();
        if (err) reject(err);
        else resolve(bytesWritten);
      });
    });
  }

  private opDone(): void {
    if (--this.inflight === 0 && this.drained.length > 0) {
      for (const wake of this.drained.splice(0)) wake();
    }
  }


  async size(): Promise<number> {
    checkOpen(this.name, this.closed);
    try {
      return (await this.handle.stat()).size;
    } catch (err) {
      throw wrap('Could not stat', this.name, err);
    }
  }

  async truncate(size: number): Promise<void> {
    checkOpen(this.name, this.closed);
    checkWritable(this.name, this.readOnly);
    checkRange(this.name, size, 0);
    try {
      await this.handle.truncate(size);
    } catch (err) {
      throw wrap('Could not truncate', this.name, err, { size });
    }
  }

  async flush(): Promise<void> {
    checkOpen(this.name, this.closed);
    await this.releaseReserved();
    if (this.readOnly || this.noFlush) return;
    try {
      // QEMU's flush of a file is fdatasync.
      await this.handle.datasync();
    } catch (err) {
      throw wrap('Could not flush', this.name, err);
    }
  }

  async close(): Promise<void> {
    if (this.closed) return;
    await this.releaseReserved();
    this.closed = true;
    if (this.inflight > 0) await new Promise<void>((resolve) => this.drained.push(resolve));
    try {
      await this.handle.close();
    } catch (err) {
      throw wrap('Could not close', this.name, err);
    }
  }

  /** st_blocks × 512: what qemu-img reports as "disk size". */
  async allocatedSize(): Promise<number> {
    checkOpen(this.name, this.closed);
    try {
      return (await this.handle.stat()).blocks * 512;
    } catch (err) {
      throw wrap('Could not stat', this.name, err);
    }
  }

  private async nativeExtents(offset: number, length: number): Promise<StorageExtent[]> {
    checkOpen(this.name, this.closed);
    checkRange(this.name, offset, length);
    const native = this.native!;
    const end = Math.min(await this.size(), offset + length);
    const { out, push } = extentCollector(offset, end);
    if (end <= offset) return out;
    const fd = this.handle.fd;
    let pos = offset;
    while (pos < end) {
      const data = native.seekData(fd, pos);
      if (data === -NATIVE_ENXIO) {
        // No data from pos to EOF.
        push(pos, end, true);
        break;
      }
      if (data < 0) {
        // The file system cannot answer (should not happen: Linux treats such files as all data).
        push(pos, end, false);
        break;
      }
      push(pos, data, true);
      if (data >= end) break;
      let hole = native.seekHole(fd, data);
      if (hole < 0) hole = end; // ENXIO here means the file shrank under us: call the rest data.
      push(data, hole, false);
      if (hole <= pos) break; // defensive: never loop without progress
      pos = hole;
    }
    return out;
  }

  private async nativeDiscard(offset: number, length: number): Promise<void> {
    checkOpen(this.name, this.closed);
    checkWritable(this.name, this.readOnly);
    checkRange(this.name, offset, length);
    // Like memory's discard and a punch hole with KEEP_SIZE: never past EOF, never changes the size.
    const end = Math.min(offset + length, await this.size());
    if (end <= offset) return;
    await this.punchOrZero(offset, end - offset);
  }

  private async nativeWriteZeroes(offset: number, length: number): Promise<void> {
    checkOpen(this.name, this.closed);
    checkWritable(this.name, this.readOnly);
    checkRange(this.name, offset, length);
    if (length === 0) return;
    const size = await this.size();
    const end = offset + length;
    if (Math.min(end, size) > offset) await this.punchOrZero(offset, Math.min(end, size) - offset);
    if (end > size) await this.truncate(end);
  }

  private async nativeAllocate(offset: number, length: number): Promise<void> {
    checkOpen(this.name, this.closed);
    checkWritable(this.name, this.readOnly);
    checkRange(this.name, offset, length);
    if (length === 0) return;
    const r = this.native!.allocate(this.handle.fd, offset, length);
    if (r === 0) return;
    const code = ERRNO_NAMES[-r];
    if (code !== 'EOPNOTSUPP' && code !== 'ENOSYS') {
      throw wrap('Could not preallocate', this.name, Object.assign(new Error(code ?? `errno ${-r}`), { code }), {
        offset,
        length,
      });
    }
    // No fallocate on this file system: posix_fallocate's own fallback, zeros past the end only
    // (existing data inside the file is kept as it is).
    const size = await this.size();
    const end = offset + length;
    if (end > size) {
      const from = Math.max(offset, size);
      await writeZeroBytes((b, o) => this.write(b, o), from, end - from);
    }
  }

  private async punchOrZero(offset: number, length: number): Promise<void> {
    if (this.punchSupported) {
      const r = this.native!.punchHole(this.handle.fd, offset, length);
      if (r === 0) return;
      const code = ERRNO_NAMES[-r];
      if (code !== 'EOPNOTSUPP' && code !== 'ENOSYS') {
        throw wrap('Could not discard in', this.name, Object.assign(new Error(code ?? `errno ${-r}`), { code }), {
          offset,
          length,
        });
      }
      this.punchSupported = false;
    }
    await writeZeroBytes((b, o) => this.write(b, o), offset, length, (b, o) => this.read(b, o));
  }
}
