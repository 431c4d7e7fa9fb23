// Cluster codec benchmark (not part of the test run).
//
// Part 1, zstd compression of 64 KiB clusters of the ext4 bench image (bench/out/ext4-2g.raw, else
// binaries from /usr/bin) the ways qimg can run it, with what a convert cares about on a small
// machine: wall-clock throughput, CPU per cluster, and main-thread time per cluster (event loop
// CPU time: what the main thread no longer has for file I/O and the write engine).
//   (a) koffi .async per cluster (libzstd on the libuv pool)   (b) ZstdBatchPool: libzstd in
//   worker threads, batches through shared memory   (c) synchronous koffi in this thread (one core:
//   libzstd's own speed)   (d) the WebAssembly fallbacks.
// Part 2, every codec's compress/decompress speed and ratio on binaries and text (as before).
//
// Usage: npm run build && node bench/codecs.mjs [--seconds 2] [--clusters 2048] [--only zstd]

import { build } from 'esbuild';
import { existsSync, mkdtempSync, openSync, readSync, closeSync, readFileSync, readdirSync, statSync, rmSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { performance } from 'node:perf_hooks';
import zlib from 'node:zlib';
import { pathToFileURL } from 'node:url';
import { ext4, opt, root } from './lib.mjs';

const CLUSTER = 65536;
const SECONDS = Number(opt('seconds', 2));
const NCLUSTERS = Number(opt('clusters', 2048));
const ONLY = opt('only', '');
const INFLIGHT = 16;

// Build the TS sources next to each other as tsup does (the pools look for zstd-worker.js beside the module).
const out = mkdtempSync(path.join(root, 'node_modules', '.cache', 'qimg-bench-'));
await build({
  entryPoints: {
    compression: 'src/qcow2/compression.ts', 'zstd-worker': 'src/qcow2/zstd-worker.ts',
    'zstd-pool': 'src/qcow2/zstd-pool.ts', 'zstd-native': 'src/qcow2/zstd-native.ts', 'zstd-wasm': 'src/qcow2/zstd-wasm.ts',
  },
  bundle: true, platform: 'node', format: 'esm', target: 'node20', outdir: out, outExtension: { '.js': '.js' },
  packages: 'external', logLevel: 'error',
});
process.on('exit', () => rmSync(out, { recursive: true, force: true }));
const imp = (name) => import(pathToFileURL(path.join(out, `${name}.js`)).href);
const { CodecRegistry } = await imp('compression');
const { ZstdBatchPool, ZstdWorkerPool } = await imp('zstd-pool');
const { loadZstdNative, loadZstdNativeCompressor } = await imp('zstd-native');
const wasm = await imp('zstd-wasm');
const workerPath = path.join(out, 'zstd-worker.js');

// ---- data
function clustersOfFile(file, limit, from = 0) {
  const res = [];
  let fd;
  try { fd = openSync(file, 'r'); } catch { return res; }
  const buf = Buffer.alloc(CLUSTER);
  for (let pos = from; res.length < limit; pos += CLUSTER) {
    if (readSync(fd, buf, 0, CLUSTER, pos) < CLUSTER) break;
    if (buf.some((b) => b !== 0)) res.push(new Uint8Array(buf));
  }
  closeSync(fd);
  return res;
}
const bigBins = () => readdirSync('/usr/bin').map((f) => path.join('/usr/bin', f))
  .filter((f) => { try { const s = statSync(f); return s.isFile() && s.size > 1 << 20; } catch { return false; } });
let image = existsSync(ext4) ? clustersOfFile(ext4, NCLUSTERS) : [];
let imageName = `${path.basename(ext4)}, first ${image.length} non-zero clusters`;
if (image.length === 0) {
  for (const f of bigBins()) { image = image.concat(clustersOfFile(f, NCLUSTERS - image.length)); if (image.length >= NCLUSTERS) break; }
  imageName = `/usr/bin binaries (${image.length} clusters; bench/out/ext4-2g.raw is missing)`;
}
const mb = (n) => (n * CLUSTER) / 1e6;
/** CPU time of the main thread alone in µs (Linux /proc; the event loop's busy time counts waiting for a core too). */
function mainCpuUs() {
  try {
    const f = readFileSync(`/proc/self/task/${process.pid}/stat`, 'utf8').split(') ')[1].split(' ');
    return ((Number(f[11]) + Number(f[12])) * 1e6) / 100; // utime + stime, in clock ticks of 10 ms
  } catch { return NaN; }
}

/**
 * Runs `compressMany(batch)` over the clusters for SECONDS, with `depth` batches of `batch`
 * clusters in flight (as a convert: 8 requests of 8 clusters); returns MB/s and per-cluster costs.
 */
async function measure(compressMany, { batch = 8, depth = 8 } = {}) {
  for (let i = 0; i < 4; i++) await compressMany(image.slice(i * batch, (i + 1) * batch));
  let n = 0;
  let bytesOut = 0;
  const main0 = mainCpuUs();
  const cpu0 = process.cpuUsage();
  const t0 = performance.now();
  const deadline = t0 + SECONDS * 1000;
  const lane = async () => {
    while (performance.now() < deadline) {
      const i = (n += batch) - batch;
      const chunk = Array.from({ length: batch }, (_, k) => image[(i + k) % image.length]);
      for (const r of await compressMany(chunk)) bytesOut += r ? r.length : CLUSTER;
    }
  };
  await Promise.all(Array.from({ length: depth }, lane));
  const ms = performance.now() - t0;
  const cpu = process.cpuUsage(cpu0);
  return { mbps: mb(n) / (ms / 1000), ratio: (n * CLUSTER) / bytesOut, mainUs: (mainCpuUs() - main0) / n, cpuUs: (cpu.user + cpu.system) / n, wallUs: (ms * 1000) / n };
}

const perCluster = (one) => (chunks) => Promise.all(chunks.map(one));
const row = (name, r) => console.log(name.padEnd(46), r.ratio.toFixed(3).padStart(6), r.mbps.toFixed(0).padStart(7), r.wallUs.toFixed(0).padStart(8), r.cpuUs.toFixed(0).padStart(8), r.mainUs.toFixed(1).padStart(8));

console.log(`node ${process.version}, ${os.availableParallelism()} cores, ${SECONDS} s per case; libzstd ${loadZstdNative() ? 'loaded' : 'missing'}`);
if (!ONLY || ONLY === 'zstd') {
  console.log(`\n== zstd level 3 compression of 64 KiB clusters: ${imageName}`);
  console.log('8 batches of 8 clusters in flight (per-cluster APIs get the same 64 calls at once)');
  console.log('case'.padEnd(46), 'ratio'.padStart(6), '  MB/s', 'wall µs', ' CPU µs', 'main µs', '  (per cluster; main: main-thread CPU)');
  const native = loadZstdNative();
  if (native) {
    const scratch = [];
    row('(a) koffi .async per cluster (libuv pool)', await measure(perCluster(async (src) => {
      const dst = scratch.pop() ?? new Uint8Array(CLUSTER + 512);
      try { const n = await native.compressAsync(dst, src, 3); return dst.slice(0, n); } finally { scratch.push(dst); }
    })));
    for (const threads of [2, 1]) {
      for (const batchBytes of [512 << 10, 128 << 10]) {
        const pool = new ZstdBatchPool({ workerPath, engine: 'native', threads, batchBytes });
        row(`(b) libzstd workers: ${threads}, ≤${batchBytes >> 16} clusters/message`, await measure(perCluster((s) => pool.compress(s, CLUSTER - 1, 3))));
        await pool.close();
      }
    }
    const sync = loadZstdNativeCompressor();
    {
      const pool = new ZstdBatchPool({ workerPath, engine: 'native', threads: 1, inline: (d, s, l) => sync.compress(d, s, l) });
      row('(b) libzstd: 1 worker + this thread when busy', await measure(perCluster((s) => pool.compress(s, CLUSTER - 1, 3))));
      await pool.close();
    }
    const dst = new Uint8Array(CLUSTER + 512);
    row('(c) koffi sync in this thread (1 core)', await measure(perCluster(async (src) => dst.slice(0, sync.compress(dst, src, 3))), { depth: 1 }));
  }
  await wasm.loadZstdWasm();
  for (const threads of [2, 1]) {
    const pool = new ZstdBatchPool({ workerPath, engine: 'wasm', threads });
    row(`(d) WebAssembly batch workers: ${threads}`, await measure(perCluster((s) => pool.compress(s, CLUSTER - 1, 3))));
    await pool.close();
  }
  const old = new ZstdWorkerPool({ workerPath, threads: 2 });
  row('(d) WebAssembly per-cluster messages: 2 (before)', await measure(perCluster(async (s) => { const r = await old.compress(s, CLUSTER - 1, 3); return r && new Uint8Array(r); })));
  await old.close();
  const d2 = new Uint8Array(CLUSTER + 512);
  row('(d) WebAssembly in this thread, reused context', await measure(perCluster(async (s) => d2.slice(0, wasm.zstdCompressInto(d2, s, 3))), { depth: 1 }));

  if (native) {
    console.log('\n== zstd decompression of the same clusters (one call per cluster, 16 in flight)');
    const frames = [];
    const sync = loadZstdNativeCompressor();
    const tmp = new Uint8Array(CLUSTER + 512);
    for (const c of image) frames.push(tmp.slice(0, sync.compress(tmp, c, 3)));
    const dsts = Array.from({ length: INFLIGHT }, () => new Uint8Array(CLUSTER));
    const dec = async (name, fn, depth) => {
      let n = 0;
      const main0 = mainCpuUs();
      const t0 = performance.now();
      const lane = async (j) => { while (performance.now() - t0 < SECONDS * 1000) { const i = n++; await fn(frames[i % frames.length], dsts[j]); } };
      await Promise.all(Array.from({ length: depth }, (_, j) => lane(j)));
      const ms = performance.now() - t0;
      console.log(name.padEnd(46), (mb(n) / (ms / 1000)).toFixed(0).padStart(7), 'MB/s', ((mainCpuUs() - main0) / n).toFixed(1).padStart(7), 'main-thread CPU µs/cluster');
    };
    await dec('koffi .async per cluster (codec default)', (f, d) => wasm.zstdDecompressNativeAsync(f, d, native), INFLIGHT);
    await dec('koffi sync in this thread', async (f, d) => wasm.zstdDecompressSync(f, d, native), 1);
    await dec('WebAssembly in this thread', async (f, d) => wasm.zstdDecompressSync(f, d), 1);
  }
}

if (!ONLY || ONLY === 'all') {
  // ---- part 2: every codec on binaries and text, skipping all-zero clusters
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
  let binary = [];
  for (const f of bigBins().slice(0, 8)) binary = binary.concat(clustersOfFile(f, 128 - binary.length));
  const sets = {
    binary,
    text: Array.from({ length: Math.min(128, Math.floor(textBlob.length / CLUSTER)) }, (_, i) => new Uint8Array(textBlob.subarray(i * CLUSTER, (i + 1) * CLUSTER))),
  };
  const zlibOpts = { windowBits: 12, level: -1, memLevel: 9 };
  const inflOpts = { windowBits: 12, finishFlush: zlib.constants.Z_SYNC_FLUSH };
  const poolOpts = { workerPath, threads: 2 };
  const zstdWorkers = await new CodecRegistry({ zstdWorkers: 'workers', zstdPool: poolOpts }).get('zstd');
  const zstdThread = await new CodecRegistry({ zstdWorkers: 'thread' }).get('zstd');
  const zstdAuto = await new CodecRegistry({ zstdPool: poolOpts }).get('zstd');
  const zlibCodec = await new CodecRegistry().get('zlib');
  const cases = [];
  const C = (name, compress, decompress, concurrent) => cases.push({ name, compress, decompress, concurrent });
  C('node:zlib async (codec)', (s) => zlibCodec.compress(s, CLUSTER - 1), (c, d) => zlibCodec.decompress(c, d), true);
  C('node:zlib sync', (s) => zlib.deflateRawSync(s, zlibOpts), (c, d) => { d.set(zlib.inflateRawSync(c, inflOpts)); }, false);
  C('zstd wasm in-thread', (s) => zstdThread.compress(s, CLUSTER - 1), (c, d) => zstdThread.decompress(c, d), false);
  C('zstd wasm workers', (s) => zstdWorkers.compress(s, CLUSTER - 1), (c, d) => zstdWorkers.decompress(c, d), true);
  C('zstd auto (default)', (s) => zstdAuto.compress(s, CLUSTER - 1), (c, d) => zstdAuto.decompress(c, d), true);

  async function time(fn, items, concurrent) {
    for (let i = 0; i < Math.min(8, items.length); i++) await fn(items[i], i);
    let n = 0;
    const t0 = performance.now();
    const deadline = t0 + SECONDS * 1000;
    const lane = async () => { while (performance.now() < deadline) { const i = n++; await fn(items[i % items.length], i); } };
    await Promise.all(Array.from({ length: concurrent ? INFLIGHT : 1 }, lane));
    const ms = performance.now() - t0;
    return { mbps: mb(n) / (ms / 1000), usPer: (ms * 1000) / n };
  }
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
      const ok = compressed.map((c, i) => c.length < CLUSTER ? i : -1).filter((i) => i >= 0);
      const dt = await time((_, i) => k.decompress(junked[ok[i % ok.length]], dsts[i % INFLIGHT]), ok, k.concurrent);
      console.log(k.name.padEnd(32), (items.length * CLUSTER / total).toFixed(2).padStart(6), ct.mbps.toFixed(0).padStart(14), ct.usPer.toFixed(0).padStart(8), dt.mbps.toFixed(0).padStart(16), dt.usPer.toFixed(0).padStart(8));
    }
  }
}
