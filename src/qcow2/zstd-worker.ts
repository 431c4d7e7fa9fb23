// Worker-thread entry: runs WebAssembly zstd off the main thread (see zstd-pool.ts).
// Built by tsup to dist/zstd-worker.js, next to index.js/index.cjs/cli.js.

import { parentPort } from 'node:worker_threads';
import { loadZstdWasm, zstdCompressSync, zstdDecompressSync } from './zstd-wasm.js';
import type { ZstdRequest, ZstdResponse } from './zstd-protocol.js';

const port = parentPort;
if (port) {
  port.on('message', (req: ZstdRequest) => {
    void handle(req).then(
      (res) => port.postMessage(res, res.ok && res.data ? [res.data] : []),
      (err: unknown) => port.postMessage(errorResponse(req.id, err)),
    );
  });
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
