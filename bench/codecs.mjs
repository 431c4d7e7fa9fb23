// Cluster codec benchmark: node:zlib vs WebAssembly zstd (in-thread and worker pool)
// vs native zstd (zstd-napi, if installed), on 64 KiB clusters of binaries and text.
// Usage: node bench/codecs.mjs [seconds-per-case]   (not part of the test run)

import { build } from 'esbuild';
import { mkdtempSync, readFileSync, readdirSync, statSync, rmSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import zlib from 'node:zlib';
import { pathToFileURL } from 'node:url';

const CLUSTER = 65536;
const SECONDS = Number(process.argv[2] ?? 1);
const INFLIGHT = 16;

// Build the TS sources next to each other as tsup does (the pool looks for zstd-worker.js beside the module).
const out = mkdtempSync(path.join(process.cwd(), 'node_modules', '.cache', 'qimg-bench-'));
await build({
  entryPoints: { compression: 'src/qcow2/compression.ts', 'zstd-worker': 'src/qcow2/zstd-worker.ts' },
  bundle: true, platform: 'node', format: 'esm', target: 'node20', outdir: out, outExtension: { '.js': '.js' },
  packages: 'external', logLevel: 'error',
});
process.on('exit', () => rmSync(out, { recursive: true, force: true }));
const { CodecRegistry } = await import(pathToFileURL(path.join(out, 'compression.js')).href);

// ---- data: 64 KiB clusters from binaries and from text, skipping all-zero clusters
function clustersFrom(files, limit) {
  const res = [];
  for (const f of files) {
    let buf;
    try { buf = readFileSync(f); } catch { continue; }
    for (let o = 0; o + CLUSTER <= buf.length && res.length < limit; o += CLUSTER) {
      const c = buf.subarray(o, o + CLUSTER);
      if (c.some((b) => b !== 0)) res.push(new Uint8Array(c));
    }
    if (res.length >= limit) break;
  }
  return res;
}
const binFiles = readdirSync('/usr/bin').map((f) => path.join('/usr/bin', f))
  .filter((f) => { try { const s = statSync(f); return s.isFile() && s.size > 1 << 20; } catch { return false; } }).slice(0, 8);
const textFiles = [];
(function walk(d, depth) {
  for (const e of readdirSync(d, { withFileTypes: true })) {
    if (textFiles.length > 400) return;
    const p = path.join(d, e.name);
    if (e.isDirectory() && depth < 3) walk(p, depth + 1);
    else if (e.isFile() && /\.(h|txt|py|c|js)$/.test(e.name)) textFiles.push(p);
  }
})('/usr/include', 0);
const textBlob = Buffer.concat(textFiles.map((f) => readFileSync(f)));
const sets = {
  binary: clustersFrom(binFiles, 128),
  text: clustersFrom([], 0).concat(Array.from({ length: Math.min(128, Math.floor(textBlob.length / CLUSTER)) }, (_, i) => new Uint8Array(textBlob.subarray(i * CLUSTER, (i + 1) * CLUSTER)))),
};

// ---- codecs under test
const zlibOpts = { windowBits: 12, level: -1, memLevel: 9 };
const inflOpts = { windowBits: 12, finishFlush: zlib.constants.Z_SYNC_FLUSH };
const workerReg = new CodecRegistry({ zstdWorkers: 'workers' });
const threadReg = new CodecRegistry({ zstdWorkers: 'thread' });
const zstdWorkers = await workerReg.get('zstd');
const zstdThread = await threadReg.get('zstd');
const zstdAuto = await new CodecRegistry().get('zstd');
const zlibCodec = await threadReg.get('zlib');
let napi = null;
try {
  const m = await import('zstd-napi');
  napi = m.default ?? m;
} catch { /* optional */ }

const cases = [];
const C = (name, compress, decompress, concurrent) => cases.push({ name, compress, decompress, concurrent });
C('node:zlib async (codec)', (s) => zlibCodec.compress(s, CLUSTER - 1), (c, d) => zlibCodec.decompress(c, d), true);
C('node:zlib async, 1 in flight', (s) => zlibCodec.compress(s, CLUSTER - 1), (c, d) => zlibCodec.decompress(c, d), false);
C('node:zlib sync', (s) => zlib.deflateRawSync(s, zlibOpts), (c, d) => { d.set(zlib.inflateRawSync(c, inflOpts)); }, false);
C('zstd wasm in-thread', (s) => zstdThread.compress(s, CLUSTER - 1), (c, d) => zstdThread.decompress(c, d), false);
C('zstd wasm workers', (s) => zstdWorkers.compress(s, CLUSTER - 1), (c, d) => zstdWorkers.decompress(c, d), true);
C('zstd wasm workers, 1 in flight', (s) => zstdWorkers.compress(s, CLUSTER - 1), (c, d) => zstdWorkers.decompress(c, d), false);
C('zstd wasm auto (default)', (s) => zstdAuto.compress(s, CLUSTER - 1), (c, d) => zstdAuto.decompress(c, d), true);
if (napi) {
  const cctx = new napi.Compressor(); cctx.setParameters({ compressionLevel: 3 });
  const dctx = new napi.Decompressor();
  C('zstd native (zstd-napi) sync', (s) => cctx.compress(s), (c, d) => { d.set(dctx.decompress(c)); }, false);
}

async function time(fn, items, concurrent) {
  // warm-up
  for (let i = 0; i < Math.min(8, items.length); i++) await fn(items[i], i);
  let n = 0;
  const t0 = performance.now();
  const deadline = t0 + SECONDS * 1000;
  if (concurrent) {
    const lane = async () => { while (performance.now() < deadline) { const i = n++; await fn(items[i % items.length], i); } };
    await Promise.all(Array.from({ length: INFLIGHT }, lane));
  } else {
    while (performance.now() < deadline) { const i = n++; await fn(items[i % items.length], i); }
  }
  const ms = performance.now() - t0;
  return { mbps: (n * CLUSTER) / 1e6 / (ms / 1000), usPer: (ms * 1000) / n };
}

console.log(`node ${process.version}, ${os.availableParallelism()} cores, ${SECONDS}s per case, concurrent cases keep ${INFLIGHT} clusters in flight`);
console.log(`data: binary ${sets.binary.length} clusters from ${binFiles.length} files in /usr/bin, text ${sets.text.length} clusters from /usr/include`);
for (const [setName, items] of Object.entries(sets)) {
  console.log(`\n== ${setName} (64 KiB clusters)`);
  console.log('codec'.padEnd(32), 'ratio'.padStart(6), 'compress MB/s'.padStart(14), 'µs/cl'.padStart(8), 'decompress MB/s'.padStart(16), 'µs/cl'.padStart(8));
  for (const k of cases) {
    const compressed = [];
    let total = 0;
    for (const s of items) { const c = new Uint8Array(await k.compress(s) ?? s); compressed.push(c); total += Math.min(c.length, CLUSTER); }
    const junked = compressed.map((c) => { const j = new Uint8Array(c.length + 511); j.set(c); return j; });
    const ct = await time((s) => k.compress(s), items, k.concurrent);
    const dsts = Array.from({ length: INFLIGHT }, () => new Uint8Array(CLUSTER));
    const dec = k.name.includes('native') ? compressed : junked; // the native one-shot API wants exact frames
    const ok = compressed.map((c, i) => c.length < CLUSTER ? i : -1).filter((i) => i >= 0);
    const dt = await time((_, i) => k.decompress(dec[ok[i % ok.length]], dsts[i % INFLIGHT]), ok, k.concurrent);
    console.log(k.name.padEnd(32), (items.length * CLUSTER / total).toFixed(2).padStart(6), ct.mbps.toFixed(0).padStart(14), ct.usPer.toFixed(0).padStart(8), dt.mbps.toFixed(0).padStart(16), dt.usPer.toFixed(0).padStart(8));
  }
}
await workerReg.get('zstd'); // pool workers are unref'd: the process exits on its own
