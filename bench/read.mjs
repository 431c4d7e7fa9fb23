// Read-engine benchmark: qimg vs qemu-img on the same images in the same run.
//
//   npm run build && node bench/read.mjs [--runs 5] [--data-mb 1200] [--only qcow2,zlib,zstd,raw] [--cli dist/cli.cjs]
//
// Builds once (cached under bench/out/) a 2 GiB ext4 file system image filled from real files
// (/usr/lib, /usr/share, /usr/bin, about 1.2 GB) with `mke2fs -t ext4 -d`, then qcow2 copies made
// by qemu-img (plain, -c zlib, -c zstd). Each image is converted to raw by `node dist/cli.cjs
// convert -O raw` and by `qemu-img convert -O raw`, alternating, runs times each after one warm-up
// each, under /usr/bin/time -v (wall time and peak RSS). Also times an in-process whole-disk read
// through the library (dist/index.js). Prints a table with ratios and writes
// bench/out/results-read.json (with user/sys CPU seconds and the load average, since other work on
// the machine skews wall times: compare the ratios of alternating runs). The target file is removed
// before every run of either tool, so neither pays for the other's dirty pages. --cli benchmarks
// another build of the CLI (e.g. a worktree with a proposed patch). Never part of the test run.

import { execFileSync, spawnSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import { cpSync, existsSync, mkdirSync, readdirSync, lstatSync, rmSync, statSync, writeFileSync, openSync, readSync, closeSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { pathToFileURL } from 'node:url';
import { args, buildExt4Images, ext4, images, log, median, opt, out, requireCli, root, timed, toolEntry } from './lib.mjs';

const RUNS = Number(opt('runs', 5));
const DATA_BYTES = Number(opt('data-mb', 1200)) * 1e6;
const ONLY = opt('only', 'qcow2,zlib,zstd,raw').split(',');

const cli = requireCli();

// ---- images (cached) -------------------------------------------------------------------------

const buildImages = () => buildExt4Images(DATA_BYTES);

// ---- timing ----------------------------------------------------------------------------------

function timedPrecise(cmd, cmdArgs) {
  const r = timed(cmd, cmdArgs);
  if (r.error) throw new Error(`${cmd} ${cmdArgs.join(' ')} failed: ${r.error}`);
  return r;
}

function sha256File(file) {
  const h = createHash('sha256');
  const fd = openSync(file, 'r');
  const buf = Buffer.alloc(8 << 20);
  try {
    for (;;) {
      const n = readSync(fd, buf, 0, buf.length, null);
      if (n <= 0) break;
      h.update(buf.subarray(0, n));
    }
  } finally {
    closeSync(fd);
  }
  return h.digest('hex');
}

function benchConvert(name, image) {
  const format = name === 'raw' ? 'raw' : 'qcow2';
  const target = path.join(out, `out-${name}.raw`);
  const tools = {
    qimg: () => timedPrecise(process.execPath, [cli, 'convert', '-f', format, '-O', 'raw', image, target]),
    'qemu-img': () => timedPrecise('qemu-img', ['convert', '-f', format, '-O', 'raw', image, target]),
  };
  const res = { qimg: [], 'qemu-img': [] };
  // Warm-up (page cache, JIT) and a correctness check of the two outputs.
  const digests = {};
  for (const t of Object.keys(tools)) {
    rmSync(target, { force: true });
    tools[t]();
    digests[t] = sha256File(target);
  }
  if (digests.qimg !== digests['qemu-img']) log(`WARNING ${name}: qimg output differs from qemu-img's (sha256 ${digests.qimg} vs ${digests['qemu-img']})`);
  for (let i = 0; i < RUNS; i++) {
    for (const t of i % 2 ? ['qemu-img', 'qimg'] : ['qimg', 'qemu-img']) {
      rmSync(target, { force: true });
      res[t].push(tools[t]());
    }
  }
  rmSync(target, { force: true });
  return { res, identical: digests.qimg === digests['qemu-img'] };
}

/** In-process whole-disk read through the library, 4 MiB at a time (no output file). */
async function benchLibraryRead(name, image) {
  const lib = await import(pathToFileURL(path.join(path.dirname(cli), 'index.js')).href);
  const times = [];
  for (let i = 0; i < RUNS; i++) {
    const { image: img } = await lib.openImage(image, { format: name === 'raw' ? 'raw' : 'qcow2' });
    const buf = new Uint8Array(4 << 20);
    const t0 = process.hrtime.bigint();
    for (let off = 0; off < img.virtualSize; off += buf.length) {
      const n = Math.min(buf.length, img.virtualSize - off);
      await img.readInto(n === buf.length ? buf : buf.subarray(0, n), off);
    }
    times.push(Number(process.hrtime.bigint() - t0) / 1e9);
    await img.close();
  }
  return times;
}

// ---- main ------------------------------------------------------------------------------------

buildImages();
const virtualSize = statSync(ext4).size;
const results = {
  date: new Date().toISOString(),
  host: { cpus: os.cpus().length, cpuModel: os.cpus()[0]?.model, node: process.version, qemuImg: execFileSync('qemu-img', ['--version'], { encoding: 'utf8' }).split('\n')[0] },
  runs: RUNS,
  cli: path.relative(root, cli),
  loadAverageAtStart: os.loadavg(),
  virtualSize,
  images: {},
};
const rows = [];
for (const name of ONLY) {
  const image = images[name];
  if (!image) continue;
  log(`convert -O raw ${path.basename(image)}: ${RUNS} alternating runs each`);
  const { res, identical } = benchConvert(name, image);
  const lib = await benchLibraryRead(name, image);
  const q = median(res.qimg.map((r) => r.seconds));
  const e = median(res['qemu-img'].map((r) => r.seconds));
  const entry = {
    file: path.relative(root, image),
    fileSize: statSync(image).size,
    identicalOutput: identical,
    qimg: toolEntry(res.qimg),
    qemuImg: toolEntry(res['qemu-img']),
    ratio: q / e,
    libraryRead: { seconds: lib, medianSeconds: median(lib), bytesPerSecond: virtualSize / median(lib) },
  };
  results.images[name] = entry;
  rows.push([
    name,
    (entry.fileSize / 2 ** 20).toFixed(0),
    q.toFixed(2),
    e.toFixed(2),
    `${entry.ratio.toFixed(2)}x`,
    (virtualSize / q / 2 ** 20).toFixed(0),
    `${entry.qimg.medianUser.toFixed(2)}+${entry.qimg.medianSys.toFixed(2)}`,
    `${entry.qemuImg.medianUser.toFixed(2)}+${entry.qemuImg.medianSys.toFixed(2)}`,
    (entry.qimg.peakRssKiB / 1024).toFixed(0),
    (entry.qemuImg.peakRssKiB / 1024).toFixed(0),
    (entry.libraryRead.bytesPerSecond / 2 ** 20).toFixed(0),
    identical ? 'yes' : 'NO',
  ]);
}
const header = ['image', 'file MiB', 'qimg s', 'qemu-img s', 'ratio', 'qimg MiB/s', 'qimg u+s', 'qemu u+s', 'qimg RSS MiB', 'qemu RSS MiB', 'lib read MiB/s', 'same out'];
const widths = header.map((h, i) => Math.max(h.length, ...rows.map((r) => r[i].length)));
const line = (r) => r.map((c, i) => c.padStart(widths[i])).join('  ');
console.log(`convert -O raw of a 2 GiB ext4 image, median of ${RUNS} alternating runs (${results.host.cpus} CPUs, ${results.host.node}, ${results.host.qemuImg})`);
console.log(line(header));
for (const r of rows) console.log(line(r));
results.loadAverageAtEnd = os.loadavg();
writeFileSync(path.join(out, 'results-read.json'), JSON.stringify(results, null, 2) + '\n');
console.log(`results: ${path.relative(process.cwd(), path.join(out, 'results-read.json'))}`);
