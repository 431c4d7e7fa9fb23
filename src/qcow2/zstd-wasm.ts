// zstd through the WebAssembly build in @bokuweb/zstd-wasm, synchronous once loaded.
// Used in-thread and inside the worker threads (zstd-worker.ts).

import type * as ZstdWasmModule from '@bokuweb/zstd-wasm';
import { FormatError } from '../errors.js';
import { readZstdFrame } from './zstd-frame.js';

/** QEMU compresses with a fresh ZSTD_CCtx, i.e. ZSTD_CLEVEL_DEFAULT. */
export const ZSTD_DEFAULT_LEVEL = 3;

let loading: Promise<void> | undefined;
/** The library, set once loadZstdWasm has finished (imported on first use: it costs start-up time). */
let zstdWasm: typeof ZstdWasmModule | undefined;

/** Instantiates the WebAssembly module once per thread. */
export function loadZstdWasm(): Promise<void> {
  loading ??= import('@bokuweb/zstd-wasm')
    .then(async (mod) => {
      await mod.init();
      zstdWasm = mod;
    })
    .catch((err: unknown) => {
      loading = undefined;
      throw err;
    });
  return loading;
}

function loaded(): typeof ZstdWasmModule {
  if (!zstdWasm) throw new Error('zstd is not loaded: call loadZstdWasm() first');
  return zstdWasm;
}

/**
 * Decompresses the zstd frame(s) at the start of `src` into exactly `dst.length` bytes,
 * the way QEMU's qcow2_zstd_decompress does: frames are consumed until dst is full,
 * bytes after that are ignored, and the last frame used must end exactly at the end of dst.
 * Call loadZstdWasm() first.
 */
export function zstdDecompressSync(src: Uint8Array, dst: Uint8Array): void {
  let inPos = 0;
  let outPos = 0;
  while (outPos < dst.length) {
    const frame = readZstdFrame(src, inPos);
    if (typeof frame === 'string') {
      throw new FormatError(`Invalid zstd compressed cluster: ${frame} at byte ${inPos} after ${outPos} of ${dst.length} bytes`, {
        inputOffset: inPos,
        outputBytes: outPos,
      });
    }
    if (!frame.skippable) {
      const room = dst.length - outPos;
      if (frame.contentSize !== null && frame.contentSize > room) {
        throw new FormatError(`Invalid zstd compressed cluster: frame holds ${frame.contentSize} bytes where ${room} remain`, {
          inputOffset: inPos,
        });
      }
      if (frame.dictionaryId !== 0) {
        throw new FormatError(`Invalid zstd compressed cluster: frame needs dictionary ${frame.dictionaryId}`, { inputOffset: inPos });
      }
      let out: Uint8Array;
      try {
        // Capacity: the declared content size, else `defaultHeapSize`. An empty room with an
        // unknown size still needs a non-zero capacity for the call to mean anything.
        out = loaded().decompress(src.subarray(inPos, inPos + frame.length), { defaultHeapSize: Math.max(room, 1) });
      } catch (err) {
        throw new FormatError(`Invalid zstd compressed cluster: ${(err as Error).message}`, { inputOffset: inPos });
      }
      if (out.length > room) {
        throw new FormatError(`Invalid zstd compressed cluster: frame yields more than the ${room} bytes that remain`, { inputOffset: inPos });
      }
      dst.set(out, outPos);
      outPos += out.length;
    }
    inPos += frame.length;
  }
}

/** One zstd frame (content size recorded, no checksum, as QEMU writes), or null if longer than maxLength. */
export function zstdCompressSync(src: Uint8Array, maxLength: number, level = ZSTD_DEFAULT_LEVEL): Uint8Array | null {
  const out = loaded().compress(src, level);
  return out.length <= maxLength ? out : null;
}
