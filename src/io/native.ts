// Optional native file fast paths through koffi: SEEK_DATA/SEEK_HOLE, punch hole, copy_file_range,
// and the OFD byte locks of QEMU's image locking.
//
// koffi is an optional dependency loaded lazily; when it is missing, fails to load, the platform is
// not 64-bit Linux, or QIMG_NO_NATIVE=1 is set, `loadNative()` returns null and FileStorage works
// with fs/promises alone (src/sparse supplies zero-scan extents and zero-writing discard).
// koffi calls are synchronous: callers query large ranges, never once per cluster.

import { createRequire } from 'node:module';

/** Linux whence values for lseek (include/uapi/linux/fs.h). */
const SEEK_DATA = 3;
const SEEK_HOLE = 4;
/** fallocate mode bits (include/uapi/linux/falloc.h). */
const FALLOC_FL_KEEP_SIZE = 0x01;
const FALLOC_FL_PUNCH_HOLE = 0x02;
const ENXIO = 6;
const EINTR = 4;

/** The native operations on a file descriptor. Each returns a negative errno on failure. */
export interface NativeFileOps {
  /** Offset of the first data at or after `offset`; -ENXIO when there is none before EOF. */
  seekData(fd: number, offset: number): number;
  /** Offset of the first hole at or after `offset` (EOF counts as a hole); -ENXIO past EOF. */
  seekHole(fd: number, offset: number): number;
  /** Deallocates [offset, offset+length) keeping the file size; 0 or -errno. */
  punchHole(fd: number, offset: number, length: number): number;
  /** Reserves [offset, offset+length) (fallocate mode 0: extends the file, keeps data); 0 or -errno. */
  allocate(fd: number, offset: number, length: number): number;
  /**
   * Reserves blocks for [offset, offset+length) without changing the file size (FALLOC_FL_KEEP_SIZE),
   * on the libuv thread pool; `done` gets 0, or a negative number on failure (errno not kept).
   */
  reserveAsync(fd: number, offset: number, length: number, done: (result: number) => void): void;
  /**
   * Copies up to `length` bytes in the kernel (copy_file_range) on the libuv thread pool; `done`
   * gets the bytes copied, or a negative number on failure (errno not kept).
   */
  copyFileRangeAsync(fdIn: number, offIn: number, fdOut: number, offOut: number, length: number, done: (result: number) => void): void;
  /**
   * Open-file-description byte locks (fcntl F_OFD_SETLK/F_OFD_GETLK), present on the platforms
   * whose struct flock layout is known (x86_64 and arm64 Linux).
   */
  ofdLocks?: OfdLockOps;
}

/** One-byte OFD locks, the primitive of QEMU's image locking (src/io/lock.ts holds the rules). */
export interface OfdLockOps {
  /** Takes a shared (read) lock on byte `byte`, or releases it (`unlock`); 0 or -errno. */
  set(fd: number, byte: number, unlock: boolean): number;
  /**
   * Whether another open file description holds a lock on `byte` that an exclusive lock would
   * conflict with: 0 free, 1 held, or -errno. Locks of this description never count.
   */
  test(fd: number, byte: number): number;
}

/** fcntl commands and lock types, identical on x86_64 and arm64 (asm-generic/fcntl.h). */
const F_OFD_GETLK = 36;
const F_OFD_SETLK = 37;
const F_RDLCK = 0;
const F_WRLCK = 1;
const F_UNLCK = 2;
/**
 * struct flock on x86_64 and arm64 Linux: l_type (short) at 0, l_whence (short) at 2, l_start
 * (off_t) at 8, l_len (off_t) at 16, l_pid (int) at 24; 32 bytes with padding. Other
 * architectures differ (mips numbers the types differently): locks are unavailable there.
 */
const FLOCK_SIZE = 32;
const FLOCK_ARCHES = new Set(['x64', 'arm64']);

/** Architectures where off_t and size_t are 64-bit, so plain lseek/fallocate take int64 offsets. */
const ARCH_64 = new Set(['x64', 'arm64', 'ppc64', 'riscv64', 'loong64', 's390x', 'mips64el']);

let loaded: NativeFileOps | null | undefined;

/** True unless QIMG_NO_NATIVE is set to something other than "" or "0". */
export function nativeAllowed(): boolean {
  const v = process.env.QIMG_NO_NATIVE;
  return v === undefined || v === '' || v === '0';
}

/** The native operations, or null when unavailable or disabled (QIMG_NO_NATIVE=1). Never throws. */
export function loadNative(): NativeFileOps | null {
  if (!nativeAllowed()) return null;
  if (loaded === undefined) loaded = tryLoad();
  return loaded;
}

function toNumber(v: unknown): number {
  return typeof v === 'bigint' ? Number(v) : (v as number);
}

/** A koffi function: called directly, or on the libuv thread pool with `.async(...args, callback)`. */
interface KoffiFunction {
  (...args: unknown[]): unknown;
  async(...args: unknown[]): void;
}

interface KoffiLike {
  load(path: string | null): { func(definition: string): KoffiFunction };
  errno(): number;
}

function moduleRequire(): NodeJS.Require {
  // ESM (and tsup's ESM bundle): import.meta.url. In the CJS bundle import.meta is empty and the
  // CommonJS require is in scope.
  const url = (import.meta as { url?: string }).url;
  if (typeof url === 'string' && url !== '') return createRequire(url);
  return require;
}

function tryLoad(): NativeFileOps | null {
  if (process.platform !== 'linux' || !ARCH_64.has(process.arch)) return null;
  try {
    const koffi = moduleRequire()('koffi') as KoffiLike;
    let lib: ReturnType<KoffiLike['load']> | undefined;
    for (const name of ['libc.so.6', null]) {
      try {
        lib = koffi.load(name);
        break;
      } catch {
        // musl and others: fall back to the process's own symbols (libc is always linked in).
      }
    }
    if (!lib) return null;
    const lseek = lib.func('int64_t lseek(int fd, int64_t offset, int whence)');
    const fallocate = lib.func('int fallocate(int fd, int mode, int64_t offset, int64_t len)');
    let copyFileRange: KoffiFunction | undefined;
    try {
      copyFileRange = lib.func(
        'int64_t copy_file_range(int fd_in, _Inout_ int64_t *off_in, int fd_out, _Inout_ int64_t *off_out, size_t len, unsigned int flags)',
      );
    } catch {
      copyFileRange = undefined;
    }
    const seek = (fd: number, offset: number, whence: number): number => {
      const r = toNumber(lseek(fd, offset, whence));
      return r < 0 ? -koffi.errno() : r;
    };
    const ofdLocks = FLOCK_ARCHES.has(process.arch) ? loadOfdLocks(lib, koffi) : undefined;
    const ops: NativeFileOps = {
      seekData: (fd, offset) => seek(fd, offset, SEEK_DATA),
      seekHole: (fd, offset) => seek(fd, offset, SEEK_HOLE),
      punchHole: (fd, offset, length) => {
        const r = toNumber(fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length));
        return r < 0 ? -koffi.errno() : 0;
      },
      allocate: (fd, offset, length) => {
        const r = toNumber(fallocate(fd, 0, offset, length));
        return r < 0 ? -koffi.errno() : 0;
      },
      reserveAsync: (fd, offset, length, done) => {
        fallocate.async(fd, FALLOC_FL_KEEP_SIZE, offset, length, (err: unknown, r: unknown) => {
          done(err ? -1 : toNumber(r) < 0 ? -1 : 0);
        });
      },
      copyFileRangeAsync: (fdIn, offIn, fdOut, offOut, length, done) => {
        if (!copyFileRange) {
          done(-38); // ENOSYS
          return;
        }
        copyFileRange.async(fdIn, [offIn], fdOut, [offOut], length, 0, (err: unknown, r: unknown) => {
          done(err ? -1 : toNumber(r) < 0 ? -1 : toNumber(r));
        });
      },
    };
    if (ofdLocks) ops.ofdLocks = ofdLocks;
    return ops;
  } catch {
    return null;
  }
}

/**
 * fcntl with a struct flock. A kernel without OFD locks (before Linux 3.15) answers EINVAL, which
 * src/io/lock.ts takes for "locking unavailable" (QEMU then does not lock either).
 */
function loadOfdLocks(lib: ReturnType<KoffiLike['load']>, koffi: KoffiLike): OfdLockOps | undefined {
  let fcntl: KoffiFunction;
  try {
    fcntl = lib.func('int fcntl(int fd, int cmd, ...)');
  } catch {
    return undefined;
  }
  // One flock buffer, reused: every call fills it completely before use.
  const flock = Buffer.alloc(FLOCK_SIZE);
  const call = (fd: number, cmd: number, type: number, byte: number): number => {
    flock.fill(0);
    flock.writeInt16LE(type, 0);
    flock.writeInt16LE(0, 2); // SEEK_SET
    flock.writeBigInt64LE(BigInt(byte), 8);
    flock.writeBigInt64LE(1n, 16);
    for (;;) {
      const r = toNumber(fcntl(fd, cmd, 'void *', flock));
      if (r >= 0) return 0;
      const errno = koffi.errno();
      if (errno !== EINTR) return -errno;
    }
  };
  const ops: OfdLockOps = {
    set: (fd, byte, unlock) => call(fd, F_OFD_SETLK, unlock ? F_UNLCK : F_RDLCK, byte),
    test: (fd, byte) => {
      const r = call(fd, F_OFD_GETLK, F_WRLCK, byte);
      if (r < 0) return r;
      return flock.readInt16LE(0) === F_UNLCK ? 0 : 1;
    },
  };
  return ops;
}

export const NATIVE_ENXIO = ENXIO;
