// Optional native zstd: the system's libzstd through koffi (as QEMU itself links libzstd).
// Decoding a 64 KiB cluster takes about half the time of the WebAssembly build, writes straight
// into the caller's buffer and runs on a libuv thread (koffi's async calls). Compression, at QEMU's
// level (3), into one plain frame with its content size (ZSTD_compressCCtx), which any zstd decoder,
// QEMU's included, reads, runs in worker threads through the synchronous compressor below
// (ZstdBatchPool), or on a libuv thread when there is no worker script. The bytes may differ from the WebAssembly build's
// (another zstd version), the decoded content does not. Like the file fast paths (src/io/native.ts),
// this is skipped when koffi or libzstd is missing, off 64-bit Linux, or with QIMG_NO_NATIVE=1;
// callers then use the WebAssembly build.

import { createRequire } from 'node:module';
import { Limiter } from '../async.js';
import { nativeAllowed } from '../io/native.js';

/** Decodes whole zstd frames into dst (exactly as ZSTD_decompress); bytes written, or a wasm32-style error code. */
export interface ZstdNativeDecoder {
  /** Returns the bytes written (>= 0), or -(ZSTD error code) on failure. */
  decompress(dst: Uint8Array, src: Uint8Array): number;
  /** The same on a libuv thread pool thread. */
  decompressAsync(dst: Uint8Array, src: Uint8Array): Promise<number>;
  /**
   * Compresses src into dst as one frame (with content size) on a libuv thread; returns the
   * frame's length, or -(ZSTD error code), e.g. when it does not fit in dst.
   */
  compressAsync(dst: Uint8Array, src: Uint8Array, level: number): Promise<number>;
}

/** Synchronous compression with one reused context: for worker threads (zstd-worker.ts), never the main thread. */
export interface ZstdNativeCompressor {
  /** As ZstdNativeDecoder.compressAsync, on the calling thread. */
  compress(dst: Uint8Array, src: Uint8Array, level: number): number;
}

/**
 * Async decodes running at once (koffi refuses more than a few dozen; the libuv pool has 4 threads
 * by default): further requests wait in a queue.
 */
const MAX_ASYNC = 8;

const ARCH_64 = new Set(['x64', 'arm64', 'ppc64', 'riscv64', 'loong64', 's390x', 'mips64el']);

let loaded: ZstdNativeDecoder | null | undefined;

interface KoffiFunc {
  (...args: unknown[]): unknown;
  async(...args: unknown[]): void;
}
interface KoffiLike {
  load(path: string): { func(definition: string): KoffiFunc };
}

function moduleRequire(): NodeJS.Require {
  const url = (import.meta as { url?: string }).url;
  if (typeof url === 'string' && url !== '') return createRequire(url);
  return require;
}

/** A size_t result of ZSTD_decompress as a byte count (>= 0) or -(error code). */
function toResult(r: unknown): number {
  if (typeof r === 'bigint') {
    // ZSTD errors are (size_t)-code; koffi returns values above 2^53 as BigInt.
    return r >= 2n ** 63n ? -Number(2n ** 64n - r) : Number(r);
  }
  return r as number;
}

/** The native decoder, or null when unavailable or disabled. Never throws. */
export function loadZstdNative(): ZstdNativeDecoder | null {
  if (!nativeAllowed()) return null;
  if (loaded === undefined) loaded = tryLoad();
  return loaded;
}

/** libzstd through koffi, or null. */
function loadLibrary(): ReturnType<KoffiLike['load']> | null {
  if (process.platform !== 'linux' || !ARCH_64.has(process.arch)) return null;
  try {
    const koffi = moduleRequire()('koffi') as KoffiLike;
    return koffi.load('libzstd.so.1');
  } catch {
    return null;
  }
}

let compressor: ZstdNativeCompressor | null | undefined;

/**
 * The synchronous compressor (one ZSTD_CCtx for the thread, reused: ZSTD_compressCCtx resets it
 * without clearing its tables), or null when unavailable or disabled. Never throws.
 */
export function loadZstdNativeCompressor(): ZstdNativeCompressor | null {
  if (!nativeAllowed()) return null;
  if (compressor === undefined) {
    compressor = null;
    try {
      const lib = loadLibrary();
      if (lib) {
        const createCCtx = lib.func('void *ZSTD_createCCtx()');
        const comp = lib.func(
          'size_t ZSTD_compressCCtx(void *cctx, void *dst, size_t dstCapacity, const void *src, size_t srcSize, int level)',
        );
        const cctx = createCCtx();
        if (cctx) compressor = { compress: (dst, src, level) => toResult(comp(cctx, dst, dst.length, src, src.length, level)) };
      }
    } catch {
      compressor = null;
    }
  }
  return compressor;
}

function tryLoad(): ZstdNativeDecoder | null {
  try {
    const lib = loadLibrary();
    if (!lib) return null;
    const dec = lib.func('size_t ZSTD_decompress(void *dst, size_t dstCapacity, const void *src, size_t srcSize)');
    const createCCtx = lib.func('void *ZSTD_createCCtx()');
    const comp = lib.func(
      'size_t ZSTD_compressCCtx(void *cctx, void *dst, size_t dstCapacity, const void *src, size_t srcSize, int level)',
    );
    const calls = new Limiter(MAX_ASYNC);
    // One compression context per call in flight (at most MAX_ASYNC), reused: no per-cluster
    // context allocation. Never freed: they live as long as the process.
    const contexts: unknown[] = [];
    /** Runs `start` (a koffi async call given its callback) and resolves with its result. */
    const call = (start: (done: (err: unknown, r: unknown) => void) => void): Promise<number> =>
      new Promise((resolve, reject) => {
        start((err, r) => {
          if (err) reject(err instanceof Error ? err : new Error(String(err)));
          else resolve(toResult(r));
        });
      });
    return {
      decompress: (dst, src) => toResult(dec(dst, dst.length, src, src.length)),
      decompressAsync: (dst, src) => calls.run(() => call((done) => dec.async(dst, dst.length, src, src.length, done))),
      compressAsync: (dst, src, level) =>
        calls.run(async () => {
          const cctx = contexts.pop() ?? createCCtx();
          if (!cctx) throw new Error('ZSTD_createCCtx failed');
          try {
            return await call((done) => comp.async(cctx, dst, dst.length, src, src.length, level, done));
          } finally {
            contexts.push(cctx);
          }
        }),
    };
  } catch {
    return null;
  }
}
