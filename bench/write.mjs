// Write-engine benchmark (the issue's target): sequential 1 MiB writes into a new 2 GiB qcow2 must
// run at no less than half the throughput of writing the same data to a raw file with the same code.
//
//   npm run build && node bench/write.mjs [--runs 3] [--gib 2] [--lazy] [--lib dist/index.js] [--no-qemu]
//
// Creates a new qcow2 (createImage; --lazy: lazy_refcounts=on) and a new raw image of the same
// size, opens each writable with openImage and writes the whole disk sequentially in 1 MiB writes
// of non-zero data (one 64 MiB pattern generated once, reused), then flush + close; the timed span
// is open..close. Runs alternate qcow2/raw; the median of each is reported. For reference, times
// `qemu-io -c 'write -P 0x5a <offset> 1G'`... into a new qcow2 and a new raw file the same way (qemu-io
// writes 1 GiB requests, split by the block layer). Files live in bench/out/ and are removed after
// each run (no dirty pages of one run are left to the next; each run ends with its own fsync).
// Prints MB/s and ratios; writes bench/out/results-write.json. Never part of the test run.

import { spawnSync } from 'node:child_process';
import { mkdirSync, rmSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { pathToFileURL } from 'node:url';
import { args, opt, out, root } from './lib.mjs';

const RUNS = Number(opt('runs', 3));
const SIZE = Number(opt('gib', 2)) * 2 ** 30;
const LAZY = args.includes('--lazy');
const QEMU = !args.includes('--no-qemu');
const lib = await import(pathToFileURL(path.resolve(opt('lib', path.join(root, 'dist', 'index.js')))).href);

const CHUNK = 1 << 20;
const PATTERN = 64 << 20;
// Non-zero pseudo-random data, generated once (xorshift32; no byte run is all zeros).
const pattern = new Uint8Array(PATTERN);
{
  const w = new Uint32Array(pattern.buffer);
  let x = 0x9e3779b9;
  for (let i = 0; i < w.length; i++) {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    w[i] = (x >>> 0) | 0x01010101;
  }
}

async function libRun(format) {
  const file = path.join(out, `bench-write.${format}`);
  rmSync(file, { force: true });
  await lib.createImage(file, { format, size: SIZE, ...(format === 'qcow2' && LAZY ? { lazyRefcounts: true } : {}) });
  const t0 = process.hrtime.bigint();
  const { image } = await lib.openImage(file, { readOnly: false, format });
  for (let pos = 0; pos < SIZE; pos += CHUNK) {
    const at = pos % PATTERN;
    await image.write(pos, pattern.subarray(at, at + CHUNK));
  }
  await image.flush();
  await image.close();
  const secs = Number(process.hrtime.bigint() - t0) / 1e9;
  rmSync(file, { force: true });
  return secs;
}

function qemuRun(format) {
  const file = path.join(out, `bench-qemu.${format}`);
  rmSync(file, { force: true });
  const c = spawnSync('qemu-img', ['create', '-q', '-f', format, ...(format === 'qcow2' && LAZY ? ['-o', 'lazy_refcounts=on'] : []), file, String(SIZE)]);
  if (c.status !== 0) throw new Error(`qemu-img create: ${c.stderr}`);
  const t0 = process.hrtime.bigint();
  // -t writeback then an explicit flush, as the library run ends with flush + close.
  // One request may not exceed 2 GiB - 512: 1 GiB requests.
  const cmds = [];
  for (let pos = 0; pos < SIZE; pos += 2 ** 30) cmds.push('-c', `write -P 0x5a ${pos} ${Math.min(2 ** 30, SIZE - pos)}`);
  const r = spawnSync('qemu-io', ['-f', format, '-t', 'writeback', ...cmds, '-c', 'flush', file]);
  const secs = Number(process.hrtime.bigint() - t0) / 1e9;
  if (r.status !== 0 || /error|failed/i.test(String(r.stdout) + String(r.stderr))) throw new Error(`qemu-io: ${r.stdout}${r.stderr}`);
  rmSync(file, { force: true });
  return secs;
}

const median = (xs) => {
  const s = [...xs].sort((a, b) => a - b);
  return s.length % 2 ? s[(s.length - 1) / 2] : (s[s.length / 2 - 1] + s[s.length / 2]) / 2;
};
const mbps = (secs) => SIZE / 1e6 / secs;

const times = { qimgQcow2: [], qimgRaw: [], qemuQcow2: [], qemuRaw: [] };
await libRun('raw'); // warm-up (page cache, JIT)
for (let r = 0; r < RUNS; r++) {
  const order = r % 2 === 0 ? ['qcow2', 'raw'] : ['raw', 'qcow2'];
  for (const f of order) times[f === 'qcow2' ? 'qimgQcow2' : 'qimgRaw'].push(await libRun(f));
  if (QEMU) for (const f of order) times[f === 'qcow2' ? 'qemuQcow2' : 'qemuRaw'].push(qemuRun(f));
  console.error(`run ${r + 1}/${RUNS}: ${Object.entries(times).map(([k, v]) => `${k} ${v.at(-1)?.toFixed(2) ?? '-'}s`).join(', ')}`);
}

const result = {
  date: new Date().toISOString(),
  sizeBytes: SIZE,
  chunkBytes: CHUNK,
  runs: RUNS,
  lazyRefcounts: LAZY,
  cpus: os.cpus().length,
  loadavg: os.loadavg(),
  seconds: times,
  medianMBps: Object.fromEntries(Object.entries(times).filter(([, v]) => v.length).map(([k, v]) => [k, mbps(median(v))])),
};
const m = result.medianMBps;
result.ratios = {
  qimgQcow2OverRaw: m.qimgQcow2 / m.qimgRaw,
  ...(QEMU ? { qemuQcow2OverRaw: m.qemuQcow2 / m.qemuRaw, qimgQcow2OverQemuQcow2: m.qimgQcow2 / m.qemuQcow2, qimgRawOverQemuRaw: m.qimgRaw / m.qemuRaw } : {}),
};
result.targetMet = result.ratios.qimgQcow2OverRaw >= 0.5;
writeFileSync(path.join(out, LAZY ? 'results-write-lazy.json' : 'results-write.json'), JSON.stringify(result, null, 2) + '\n');

console.log(`sequential 1 MiB writes, ${SIZE / 2 ** 30} GiB, median of ${RUNS}${LAZY ? ' (lazy_refcounts=on)' : ''}`);
for (const [k, v] of Object.entries(m)) console.log(`  ${k.padEnd(10)} ${v.toFixed(0).padStart(6)} MB/s`);
for (const [k, v] of Object.entries(result.ratios)) console.log(`  ${k.padEnd(24)} ${v.toFixed(2)}`);
console.log(`  target (qcow2 >= 0.5x raw): ${result.targetMet ? 'met' : 'NOT met'}`);
