// qcow2 compressed-cluster codecs (header field compression_type: 0 = zlib, 1 = zstd).
//
// Facts from QEMU's block/qcow2-threads.c:
// - zlib: raw deflate (no zlib header), window 2^12, level Z_DEFAULT_COMPRESSION, memLevel 9.
//   Decompression inflates with windowBits -12 and also accepts Z_BUF_ERROR as long as the
//   output cluster got full, because the stored length is rounded up to whole 512-byte
//   sectors: the input is the stream followed by unrelated bytes.
// - zstd: plain frame(s), default level, no length prefix; decompression streams frames until
//   the cluster is full (the last frame must end there) and ignores the bytes after.
// - Writers give the compressor cluster_size - 1 bytes of room and store the cluster
//   uncompressed when it does not fit.

import zlib from 'node:zlib';
import { Limiter } from '../async.js';
import { FormatError, QimgError } from '../errors.js';
import { zstdRoom } from './zstd-protocol.js';
import { ZstdBatchPool, ZstdWorkerPool, availableParallelism, defaultWorkerPath, type ZstdBatchPoolOptions, type ZstdPoolOptions } from './zstd-pool.js';
import { ZSTD_DEFAULT_LEVEL, loadZstdWasm, zstdCompressInto, zstdDecompressNativeAsync, zstdDecompressSync } from './zstd-wasm.js';
import { loadZstdNative, loadZstdNativeCompressor } from './zstd-native.js';

export type CompressionType = 'zlib' | 'zstd';

export interface ClusterCodec {
  readonly type: CompressionType;
  /** Decompresses `src` (may contain trailing bytes after the stream) into exactly dst.length bytes; throws FormatError (from src/errors.ts) if the stream is invalid or yields fewer bytes. */
  decompress(src: Uint8Array, dst: Uint8Array): Promise<void>;
  /** Compresses one cluster; returns null when the result would not fit in maxLength bytes (QEMU: cluster_size - 1). */
  compress(src: Uint8Array, maxLength: number): Promise<Uint8Array | null>;
  /**
   * compress() for several clusters at once (one result per chunk, in order): with native zstd
   * they go to the worker threads as one batch. The chunks must stay untouched until it settles.
   */
  compressMany(chunks: readonly Uint8Array[], maxLength: number): Promise<(Uint8Array | null)[]>;
}

/** The qcow2 header's compression_type byte for each codec. */
export const COMPRESSION_TYPE_CODES: Readonly<Record<CompressionType, number>> = { zlib: 0, zstd: 1 };

export interface CodecOptions {
  /**
   * Where zstd runs. 'auto' (default): compression in worker threads in batches (ZstdBatchPool,
   * when the built worker script is present) with the system libzstd when it loads
   * (src/qcow2/zstd-native.ts; not with QIMG_NO_NATIVE=1), else on the libuv pool; without libzstd
   * the WebAssembly build, in this thread unless QIMG_ZSTD_THREADS asks for workers (memory, see
   * batchThreads). Decompression: libzstd on the libuv pool, else WebAssembly in this thread (a
   * worker round trip costs more than decoding one cluster; see bench/codecs.mjs).
   * 'thread': WebAssembly in this thread only. 'workers': WebAssembly in workers for both
   * operations (in this thread when the workers cannot run).
   */
  zstdWorkers?: 'auto' | 'thread' | 'workers';
  /** Overrides for the worker pool (tests point workerPath at a freshly built worker). */
  zstdPool?: ZstdPoolOptions;
}

// ---------------------------------------------------------------- zlib

const ZLIB_WINDOW_BITS = 12;

// Why qimg's zlib clusters come out ~2.5% larger than qemu-img's with the same parameters (raw
// deflate, windowBits 12, default level 6, memLevel 9, default strategy): not the parameters but the
// library. node:zlib is Chromium's fork of zlib (process.versions.zlib is "1.3.1-<chromium
// revision>"), QEMU links the system's zlib. The fork changed deflate's match finder for speed (on
// CPUs with SSE4.2 or ARMv8 CRC, as here, its insert_string hashes with CRC32C instead of zlib's
// rolling hash; older revisions also fixed the hash table at 2^15 entries whatever memLevel says),
// so at the same settings it picks other matches: on these 64 KiB clusters with a 4 KiB window,
// slightly worse ones. Measured on the first 4096
// non-zero clusters of bench/out/ext4-2g.raw, each deflated alone: system zlib 1.2.13 (python3
// zlib.compressobj(-1, DEFLATED, -12, 9)) 102,983,356 bytes, node:zlib 105,551,926 (+2.49%);
// of 300 clusters 219 came out larger, 76 smaller, 5 the same size. memLevel barely matters in
// either (node 8 vs 9: +0.07%; system: +0.05%), so no setting of ours closes the gap. The streams are
// plain raw deflate that QEMU reads (test/compression); byte-for-byte QEMU sizes would need the
// system libz (e.g. deflate through koffi like zstd-native.ts), which we do not add.

const inflateOptions: zlib.ZlibOptions = {
  windowBits: ZLIB_WINDOW_BITS,
  // A stream cut short after filling the cluster is what QEMU's Z_BUF_ERROR case accepts;
  // Z_SYNC_FLUSH makes Node return what was produced instead of "unexpected end of file".
  finishFlush: zlib.constants.Z_SYNC_FLUSH,
};

const deflateOptions: zlib.ZlibOptions = {
  windowBits: ZLIB_WINDOW_BITS,
  level: zlib.constants.Z_DEFAULT_COMPRESSION,
  memLevel: 9,
  strategy: zlib.constants.Z_DEFAULT_STRATEGY,
};

/**
 * Deflates running at once on the libuv pool; further requests wait in a queue. Each one holds a
 * zlib stream (~300 KiB of native memory with memLevel 9) and its output: with a whole convert
 * request queued at once (tens of clusters) that was 20 MiB of peak RSS for no speed, and deflates
 * filling every pool thread left file reads waiting behind them.
 */
const deflates = new Limiter(Math.max(2, Number(process.env.QIMG_ZLIB_JOBS) || 4));

function deflateRawAsync(src: Uint8Array): Promise<Buffer> {
  return deflates.run(
    () =>
      new Promise((resolve, reject) => {
        zlib.deflateRaw(src, deflateOptions, (err, out) => {
          if (err) reject(err);
          else resolve(out);
        });
      }),
  );
}

/**
 * Inflates into dst the first dst.length bytes the stream yields (QEMU's single inflate() call
 * into the cluster buffer: a stream going on past the cluster is fine, its rest is never looked
 * at); resolves with the bytes written, fewer when the stream ends early.
 *
 * Output goes straight into dst, chunk by chunk: one chunk one byte larger than the cluster, so
 * a cluster inflates in one pass on the thread pool (the default 16 KiB chunks took five passes
 * per 64 KiB cluster, then zlib.inflateRaw copied them into one more buffer: convert of a zlib
 * image 3.0 s -> 2.2 s on 2 cores, and less garbage for the GC). Bounded: at most one chunk is
 * ever allocated beyond what dst takes.
 */
function inflateRawInto(src: Uint8Array, dst: Uint8Array): Promise<number> {
  return new Promise((resolve, reject) => {
    let total = 0;
    let settled = false;
    const inflater = zlib.createInflateRaw({ ...inflateOptions, chunkSize: Math.max(dst.length + 1, zlib.constants.Z_MIN_CHUNK) });
    const finish = (): void => {
      if (settled) return;
      settled = true;
      inflater.removeAllListeners('data');
      inflater.destroy();
      resolve(total);
    };
    inflater.on('data', (chunk: Buffer) => {
      const n = Math.min(chunk.length, dst.length - total);
      dst.set(n === chunk.length ? chunk : chunk.subarray(0, n), total);
      total += n;
      if (total >= dst.length) finish();
    });
    inflater.on('end', finish);
    inflater.on('error', (err) => {
      if (settled) return;
      settled = true;
      reject(err);
    });
    inflater.end(src);
  });
}

const zlibCodec: ClusterCodec = {
  type: 'zlib',
  async decompress(src, dst) {
    let got: number;
    try {
      got = await inflateRawInto(src, dst);
    } catch (err) {
      throw zlibError(err, dst.length);
    }
    if (got < dst.length) {
      throw new FormatError(`Invalid zlib compressed cluster: stream yields ${got} of ${dst.length} bytes`, {
        outputBytes: got,
      });
    }
  },
  async compress(src, maxLength) {
    const out = await deflateRawAsync(src);
    return out.length <= maxLength ? out : null;
  },
  compressMany(chunks, maxLength) {
    return Promise.all(chunks.map((c) => zlibCodec.compress(c, maxLength)));
  },
};

function zlibError(err: unknown, length: number): FormatError {
  return new FormatError(`Invalid zlib compressed cluster: ${(err as Error).message}`, { clusterBytes: length });
}

// ---------------------------------------------------------------- zstd

let sharedPool: ZstdWorkerPool | null | undefined;
const sharedBatchPools = new Map<'native' | 'wasm', ZstdBatchPool | null>();

/** The process-wide pool on dist/zstd-worker.js; null when that file is absent. */
function defaultPool(): ZstdWorkerPool | null {
  if (sharedPool === undefined) {
    const workerPath = defaultWorkerPath();
    sharedPool = workerPath ? new ZstdWorkerPool({ workerPath }) : null;
  }
  return sharedPool;
}

/** The process-wide compression pool of an engine on dist/zstd-worker.js; null when that file is absent. */
function defaultBatchPool(engine: 'native' | 'wasm'): ZstdBatchPool | null {
  let pool = sharedBatchPools.get(engine);
  if (pool === undefined) {
    const workerPath = defaultWorkerPath();
    const threads = batchThreads(engine);
    pool = workerPath && threads > 0 ? new ZstdBatchPool({ workerPath, engine, threads, inline: inlineCompressor(engine) }) : null;
    sharedBatchPools.set(engine, pool);
  }
  return pool;
}

/**
 * With libzstd, the main thread compresses too when every worker lane is busy (ZstdBatchPool's
 * inline option), in place of one more worker: measured on 2 cores, raw->qcow2 -c zstd of the
 * 2 GiB bench image, 1 worker + inline ~2.3 s at ~96 MiB peak RSS vs 2 workers ~2.5 s at ~105 MiB
 * (the main thread idles most of a convert). QIMG_ZSTD_INLINE=0 turns it off (benchmarks).
 */
function inlineCompressor(engine: 'native' | 'wasm'): ZstdBatchPoolOptions['inline'] {
  if (engine !== 'native' || process.env.QIMG_ZSTD_INLINE === '0') return undefined;
  const c = loadZstdNativeCompressor();
  return c ? (dst, src, level) => c.compress(dst, src, level) : undefined;
}

/**
 * Compression workers: QIMG_ZSTD_THREADS (0: in this thread), else for libzstd one per core but
 * the one the main thread lends (inlineCompressor; a worker holds ~10 MiB), and none for the
 * WebAssembly build: its workers hold ~20 MiB each (the thread, the module's code and heap), and
 * measured on 2 cores (same convert, QIMG_NO_NATIVE=1) compressing in the main thread took 8.9 s
 * at 98-100 MiB peak RSS, 1 worker 9.1 s at 108 MiB, 2 workers 6.7 s at 121 MiB: only in-thread
 * stays in the 100 MiB limit.
 */
function batchThreads(engine: 'native' | 'wasm'): number {
  const env = process.env.QIMG_ZSTD_THREADS;
  if (env !== undefined && env !== '' && Number.isInteger(Number(env)) && Number(env) >= 0) return Number(env);
  const cores = availableParallelism();
  if (engine === 'wasm') return 0;
  return inlineCompressor(engine) ? Math.max(1, cores - 1) : cores;
}

function makeZstdCodec(options: CodecOptions): ClusterCodec {
  const mode = options.zstdWorkers ?? 'auto';
  const native = mode === 'auto' ? loadZstdNative() : null;
  const custom = options.zstdPool;
  // Compression: in worker threads, in batches (ZstdBatchPool), by libzstd when it loads, else by
  // the WebAssembly build.
  let batchPool: ZstdBatchPool | null = null;
  if (mode !== 'thread') {
    const engine = native ? 'native' : 'wasm';
    const workerPath = custom?.workerPath ?? defaultWorkerPath();
    // 'workers' asks for at least one, whatever the machine.
    const threads = custom?.threads ?? (mode === 'workers' ? Math.max(1, batchThreads(engine)) : batchThreads(engine));
    if (workerPath && threads > 0) {
      batchPool = custom?.workerPath || mode === 'workers'
        ? new ZstdBatchPool({ workerPath, engine, threads, inline: inlineCompressor(engine) })
        : defaultBatchPool(engine);
    }
  }
  // Decompression in workers only when asked for (a round trip costs more than decoding one cluster).
  let decompressPool: ZstdWorkerPool | null = null;
  if (mode === 'workers') decompressPool = custom?.workerPath ? new ZstdWorkerPool({ ...custom, workerPath: custom.workerPath }) : defaultPool();
  const scratch: Uint8Array[] = [];
  const codec: ClusterCodec = {
    type: 'zstd',
    async decompress(src, dst) {
      if (native) {
        // On a libuv thread: decoding overlaps the main thread's I/O work (measured on 2 cores:
        // convert of a zstd image 2.04 s in-thread, 1.82 s this way; 2.8 s with WebAssembly).
        await zstdDecompressNativeAsync(src, dst, native);
        return;
      }
      if (decompressPool) {
        try {
          dst.set(new Uint8Array(await decompressPool.decompress(src, dst.length)));
          return;
        } catch (err) {
          if (err instanceof FormatError) throw err;
          decompressPool = null;
        }
      }
      await loadZstdWasm();
      zstdDecompressSync(src, dst);
    },
    async compress(src, maxLength) {
      if (batchPool) {
        try {
          return await batchPool.compress(src, maxLength, ZSTD_DEFAULT_LEVEL);
        } catch {
          // The workers could not run: in-thread from now on (which reports a real libzstd error again).
          batchPool = null;
        }
      }
      if (native) {
        // libzstd on the libuv pool (koffi async calls): ~28 us of main-thread time per cluster,
        // the fallback when there is no worker script (running the TypeScript sources).
        // Room for ZSTD_compressBound (a tighter buffer can fail for a frame that would fit it);
        // scratch buffers are reused (a fresh 64 KiB one per cluster was 20-30 MiB of garbage
        // ArrayBuffers at peak RSS during a convert).
        const room = zstdRoom(src.length);
        let dst = scratch.pop();
        if (!dst || dst.length < room) dst = new Uint8Array(room);
        try {
          const n = await native.compressAsync(dst, src, ZSTD_DEFAULT_LEVEL);
          if (n < 0) throw new QimgError('IO', `zstd compression failed (libzstd error ${-n})`, { zstdError: -n });
          return n <= maxLength ? dst.slice(0, n) : null; // the frame only: queued clusters hold no scratch
        } finally {
          if (scratch.length < 16) scratch.push(dst);
        }
      }
      // In this thread: one reused context and scratch buffer, the frame copied out.
      await loadZstdWasm();
      const room = zstdRoom(src.length);
      let dst = scratch.pop();
      if (!dst || dst.length < room) dst = new Uint8Array(room);
      try {
        const n = zstdCompressInto(dst, src, ZSTD_DEFAULT_LEVEL);
        if (n < 0) throw new QimgError('IO', `zstd compression failed (error ${-n})`, { zstdError: -n });
        return n <= maxLength ? dst.slice(0, n) : null;
      } finally {
        if (scratch.length < 16) scratch.push(dst);
      }
    },
    compressMany(chunks, maxLength) {
      // All calls made at once: the worker pool sends calls made in one synchronous run as one batch.
      return Promise.all(chunks.map((c) => codec.compress(c, maxLength)));
    },
  };
  return codec;
}

// ---------------------------------------------------------------- registry

/**
 * Codecs for one image (or one process, via getCodec). Each codec is created, and its
 * library loaded, on first request.
 */
export class CodecRegistry {
  private readonly codecs = new Map<CompressionType, Promise<ClusterCodec>>();

  constructor(private readonly options: CodecOptions = {}) {}

  get(type: CompressionType): Promise<ClusterCodec> {
    let codec = this.codecs.get(type);
    if (!codec) {
      codec = this.create(type);
      codec.catch(() => this.codecs.delete(type));
      this.codecs.set(type, codec);
    }
    return codec;
  }

  private async create(type: CompressionType): Promise<ClusterCodec> {
    switch (type) {
      case 'zlib':
        return zlibCodec;
      case 'zstd':
        // The WebAssembly build is loaded in this thread only when a call needs it here (each
        // instance holds MiBs of heap; compressing in workers never does).
        return makeZstdCodec(this.options);
      default:
        throw new FormatError(`Unknown compression type ${String(type)}`);
    }
  }
}

const defaultRegistry = new CodecRegistry();

/** The codec for `type` with default options (zstd compression in worker threads when built). */
export function getCodec(type: CompressionType): Promise<ClusterCodec> {
  return defaultRegistry.get(type);
}

/** Diagnostics: the worker script getCodec('zstd') uses (undefined: in-thread only) and how many workers run. */
export function zstdWorkerStatus(): { workerPath: string | undefined; workers: number } {
  const pool = defaultPool();
  return { workerPath: pool?.workerPath, workers: pool?.size ?? 0 };
}

/** Maps the qcow2 header's compression_type byte to a codec name, or undefined for unknown values. */
export function compressionTypeFromCode(code: number): CompressionType | undefined {
  return code === 0 ? 'zlib' : code === 1 ? 'zstd' : undefined;
}
