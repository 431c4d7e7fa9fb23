// zstd through the WebAssembly build in @bokuweb/zstd-wasm, synchronous once loaded.
// Used in-thread and inside the worker threads (zstd-worker.ts).

import type * as ZstdWasmModule from '@bokuweb/zstd-wasm';
import { createRequire } from 'node:module';
import path from 'node:path';
import { FormatError } from '../errors.js';
import { readZstdFrame } from './zstd-frame.js';
import type { ZstdNativeDecoder } from './zstd-native.js';

/** QEMU compresses with a fresh ZSTD_CCtx, i.e. ZSTD_CLEVEL_DEFAULT. */
export const ZSTD_DEFAULT_LEVEL = 3;

let loading: Promise<void> | undefined;
/** The library, set once loadZstdWasm has finished (imported on first use: it costs start-up time). */
let zstdWasm: typeof ZstdWasmModule | undefined;

/** Instantiates the WebAssembly module once per thread. */
export function loadZstdWasm(): Promise<void> {
  // require, not import(): the package is CommonJS either way (its "main"), and the CLI bundle
  // runs as a vm.Script (src/cli/launch.ts) where import() would need an experimental loader.
  loading ??= Promise.resolve()
    .then(async () => {
      const mod = packageRequire()('@bokuweb/zstd-wasm') as typeof ZstdWasmModule;
      await mod.init();
      zstdWasm = mod;
    })
    .catch((err: unknown) => {
      loading = undefined;
      throw err;
    });
  return loading;
}

/** require for this module's packages: createRequire in ESM, CommonJS's own in the CJS bundles. */
function packageRequire(): NodeJS.Require {
  const url = (import.meta as { url?: string }).url;
  return typeof url === 'string' && url !== '' ? createRequire(url) : require;
}

function loaded(): typeof ZstdWasmModule {
  if (!zstdWasm) throw new Error('zstd is not loaded: call loadZstdWasm() first');
  return zstdWasm;
}

/** One frame to decode: its bytes and where its output goes (outPos, at most `capacity` bytes). */
interface FramePlan {
  bytes: Uint8Array;
  inPos: number;
  capacity: number;
}

/** Checks the frame at inPos; null for a skippable frame (no output). */
function planFrame(src: Uint8Array, inPos: number, outPos: number, dst: Uint8Array): { length: number; plan: FramePlan | null } {
  const frame = readZstdFrame(src, inPos);
  if (typeof frame === 'string') {
    throw new FormatError(`Invalid zstd compressed cluster: ${frame} at byte ${inPos} after ${outPos} of ${dst.length} bytes`, {
      inputOffset: inPos,
      outputBytes: outPos,
    });
  }
  if (frame.skippable) return { length: frame.length, plan: null };
  const room = dst.length - outPos;
  if (frame.contentSize !== null && frame.contentSize > room) {
    throw new FormatError(`Invalid zstd compressed cluster: frame holds ${frame.contentSize} bytes where ${room} remain`, {
      inputOffset: inPos,
    });
  }
  if (frame.dictionaryId !== 0) {
    throw new FormatError(`Invalid zstd compressed cluster: frame needs dictionary ${frame.dictionaryId}`, { inputOffset: inPos });
  }
  // Capacity: the declared content size, else the room left (never 0: the loop stops when full).
  const capacity = frame.contentSize ?? Math.max(room, 1);
  return { length: frame.length, plan: { bytes: src.subarray(inPos, inPos + frame.length), inPos, capacity } };
}

/** The WebAssembly decode of one frame into dst at outPos; returns the bytes written. */
function wasmDecodeFrame(plan: FramePlan, dst: Uint8Array, outPos: number): number {
  const room = dst.length - outPos;
  let out: Uint8Array;
  try {
    out = loaded().decompress(plan.bytes, { defaultHeapSize: plan.capacity });
  } catch (err) {
    throw new FormatError(`Invalid zstd compressed cluster: ${(err as Error).message}`, { inputOffset: plan.inPos });
  }
  if (out.length > room) {
    throw new FormatError(`Invalid zstd compressed cluster: frame yields more than the ${room} bytes that remain`, { inputOffset: plan.inPos });
  }
  dst.set(out, outPos);
  return out.length;
}

/** The result of a native decode of one frame, checked as wasmDecodeFrame checks its own. */
function nativeResult(r: number, plan: FramePlan): number {
  if (r < 0) {
    // The same words as the WebAssembly build's error (which shows the code as a negative int).
    throw new FormatError(`Invalid zstd compressed cluster: Failed to compress with code ${r}`, { inputOffset: plan.inPos });
  }
  return r;
}

/** The native decode target: capacity bytes at outPos (capacity never exceeds the room left). */
function nativeTarget(plan: FramePlan, dst: Uint8Array, outPos: number): Uint8Array {
  return dst.subarray(outPos, outPos + plan.capacity);
}

/**
 * Decompresses the zstd frame(s) at the start of `src` into exactly `dst.length` bytes,
 * the way QEMU's qcow2_zstd_decompress does: frames are consumed until dst is full,
 * bytes after that are ignored, and the last frame used must end exactly at the end of dst.
 * With `native` (zstd-native.ts) frames are decoded by the system libzstd, else by the
 * WebAssembly build: call loadZstdWasm() first.
 */
export function zstdDecompressSync(src: Uint8Array, dst: Uint8Array, native: ZstdNativeDecoder | null = null): void {
  let inPos = 0;
  let outPos = 0;
  while (outPos < dst.length) {
    const { length, plan } = planFrame(src, inPos, outPos, dst);
    if (plan) {
      outPos += native
        ? nativeResult(native.decompress(nativeTarget(plan, dst, outPos), plan.bytes), plan)
        : wasmDecodeFrame(plan, dst, outPos);
    }
    inPos += length;
  }
}

/** zstdDecompressSync with the native decoder, each frame decoded on a libuv thread. */
export async function zstdDecompressNativeAsync(src: Uint8Array, dst: Uint8Array, native: ZstdNativeDecoder): Promise<void> {
  let inPos = 0;
  let outPos = 0;
  while (outPos < dst.length) {
    const { length, plan } = planFrame(src, inPos, outPos, dst);
    if (plan) outPos += nativeResult(await native.decompressAsync(nativeTarget(plan, dst, outPos), plan.bytes), plan);
    inPos += length;
  }
}

/** One zstd frame (content size recorded, no checksum, as QEMU writes), or null if longer than maxLength. */
export function zstdCompressSync(src: Uint8Array, maxLength: number, level = ZSTD_DEFAULT_LEVEL): Uint8Array | null {
  const out = loaded().compress(src, level);
  return out.length <= maxLength ? out : null;
}

/** The parts of the package's Emscripten module that zstdCompressInto uses. */
interface EmscriptenZstd {
  HEAPU8: Uint8Array;
  _malloc(size: number): number;
  _free(ptr: number): void;
  _ZSTD_createCCtx(): number;
  _ZSTD_compress_usingDict(cctx: number, dst: number, dstCapacity: number, src: number, srcSize: number, dict: number, dictSize: number, level: number): number;
}

let emscripten: EmscriptenZstd | null | undefined;

/**
 * The Emscripten module behind @bokuweb/zstd-wasm (its dist/common/module.js, the instance the
 * package's init() set up; the package exports no way to it), or null if its layout differs.
 */
function emscriptenModule(): EmscriptenZstd | null {
  if (emscripten === undefined) {
    emscripten = null;
    try {
      const req = packageRequire();
      const main = req.resolve('@bokuweb/zstd-wasm');
      const m = (req(path.join(path.dirname(main), 'module.js')) as { Module?: EmscriptenZstd }).Module;
      if (m && m.HEAPU8 instanceof Uint8Array && typeof m._malloc === 'function' && typeof m._ZSTD_compress_usingDict === 'function') {
        emscripten = m;
      }
    } catch {
      emscripten = null;
    }
  }
  return emscripten;
}

/** This thread's context and buffers in the WebAssembly heap, kept from call to call. */
const heap = { cctx: 0, src: 0, srcSize: 0, dst: 0, dstSize: 0 };
const NO_DICTIONARY = new Uint8Array(0);
let context: number | undefined;

/**
 * Compresses src into dst as one frame (ZSTD_compressCCtx at `level`: the bytes of
 * zstdCompressSync) with one context and one pair of buffers in the WebAssembly heap kept for the
 * thread; returns the frame's length or -(ZSTD error code) (-70: it does not fit in dst).
 *
 * What it saves, in a worker compressing a convert's clusters: the library's compress() makes and
 * frees a context (~1 MiB at level 3) per call and returns each frame in a fresh ArrayBuffer;
 * V8 collects those only once ~64 MiB of them pile up outside its heap, and that garbage was
 * most of each worker's ~45 MiB during a convert.
 */
export function zstdCompressInto(dst: Uint8Array, src: Uint8Array, level = ZSTD_DEFAULT_LEVEL): number {
  const m = emscriptenModule();
  if (!m) {
    // The package's own API: the same frame, with its garbage.
    const lib = loaded();
    context ??= lib.createCCtx();
    const out = lib.compressUsingDict(context, src, NO_DICTIONARY, level);
    if (out.length > dst.length) return -70; // ZSTD_error_dstSize_tooSmall
    dst.set(out);
    return out.length;
  }
  if (!heap.cctx) heap.cctx = m._ZSTD_createCCtx();
  if (heap.srcSize < src.length) {
    if (heap.src) m._free(heap.src);
    heap.src = m._malloc(src.length);
    heap.srcSize = heap.src ? src.length : 0;
  }
  if (heap.dstSize < dst.length) {
    if (heap.dst) m._free(heap.dst);
    heap.dst = m._malloc(dst.length);
    heap.dstSize = heap.dst ? dst.length : 0;
  }
  if (!heap.cctx || !heap.src || !heap.dst) return -64; // ZSTD_error_memory_allocation
  m.HEAPU8.set(src, heap.src); // HEAPU8 read after the mallocs: growing the memory replaces it
  // size_t is 32 bits here: an error comes back as a small negative number, -(code).
  const n = m._ZSTD_compress_usingDict(heap.cctx, heap.dst, dst.length, heap.src, src.length, 0, 0, level);
  if (n < 0) return n;
  dst.set(m.HEAPU8.subarray(heap.dst, heap.dst + n));
  return n;
}
