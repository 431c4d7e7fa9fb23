// Optional native file fast paths through koffi: SEEK_DATA/SEEK_HOLE, punch hole, copy_file_range.
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
}

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
    return ops;
  } catch {
    return null;
  }
}

export const NATIVE_ENXIO = ENXIO;
