// Worker-thread entry: runs zstd off the main thread (see zstd-pool.ts). Started with
// workerData { engine: 'native' | 'wasm' } it compresses batches from shared buffers
// (ZstdBatchPool) with the system libzstd (synchronous koffi calls) or the WebAssembly build,
// one reused context either way; without it, it serves ZstdWorkerPool's single requests.
// Built by tsup to dist/zstd-worker.js, next to index.js/index.cjs/cli-main.cjs.

import { parentPort, workerData } from 'node:worker_threads';
import { loadZstdWasm, zstdCompressSync, zstdCompressInto, zstdDecompressSync } from './zstd-wasm.js';
import { loadZstdNativeCompressor } from './zstd-native.js';
import { zstdRoom, type ZstdBatchRequest, type ZstdBatchResponse, type ZstdRequest, type ZstdResponse } from './zstd-protocol.js';

const port = parentPort;
const engine = (workerData as { engine?: 'native' | 'wasm' } | null)?.engine;
if (port && engine) {
  let ready: Promise<Compress | null> | undefined;
  port.on('message', (req: ZstdBatchRequest) => {
    ready ??= compressorFor(engine);
    void ready.then(
      (compress) => port.postMessage(compressBatch(req, compress)),
      (err: unknown) => port.postMessage({ lane: req.lane, ok: false, message: (err as Error)?.message ?? String(err) }),
    );
  });
} else if (port) {
  port.on('message', (req: ZstdRequest) => {
    void handle(req).then(
      (res) => port.postMessage(res, res.ok && res.data ? [res.data] : []),
      (err: unknown) => port.postMessage(errorResponse(req.id, err)),
    );
  });
}

/** Compresses src into dst; the frame's length or -(ZSTD error code). */
type Compress = (dst: Uint8Array, src: Uint8Array, level: number) => number;

async function compressorFor(kind: 'native' | 'wasm'): Promise<Compress | null> {
  if (kind === 'native') {
    const native = loadZstdNativeCompressor();
    return native ? (dst, src, level) => native.compress(dst, src, level) : null;
  }
  await loadZstdWasm();
  return zstdCompressInto;
}

function compressBatch(req: ZstdBatchRequest, compress: Compress | null): ZstdBatchResponse {
  if (!compress) return { lane: req.lane, ok: false, message: 'libzstd could not be loaded in the worker' };
  const sizes: number[] = [];
  let inPos = 0;
  let outPos = 0;
  for (const length of req.lengths) {
    const room = zstdRoom(length);
    const src = new Uint8Array(req.input, inPos, length);
    const dst = new Uint8Array(req.output, outPos, room);
    sizes.push(compress(dst, src, req.level));
    inPos += length;
    outPos += room;
  }
  return { lane: req.lane, ok: true, sizes };
}

async function handle(req: ZstdRequest): Promise<ZstdResponse> {
  await loadZstdWasm();
  const src = new Uint8Array(req.src);
  if (req.op === 'decompress') {
    const dst = new Uint8Array(req.length);
    zstdDecompressSync(src, dst);
    return { id: req.id, ok: true, data: dst.buffer };
  }
  const out = zstdCompressSync(src, req.length, req.level);
  if (!out) return { id: req.id, ok: true, data: null };
  // `out` is a fresh copy from the library; send its buffer when it is exactly the data.
  const buf = out.byteOffset === 0 && out.byteLength === out.buffer.byteLength ? out.buffer : out.slice().buffer;
  return { id: req.id, ok: true, data: buf as ArrayBuffer };
}

function errorResponse(id: number, err: unknown): ZstdResponse {
  const e = err as { name?: string; message?: string; data?: Record<string, unknown> };
  return { id, ok: false, name: e?.name ?? 'Error', message: e?.message ?? String(err), data: e?.data ?? {} };
}
