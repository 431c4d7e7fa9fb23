// Read-engine benchmark: qimg vs qemu-img on the same images in the same run.
//
//   npm run build && node bench/read.mjs [--runs 5] [--data-mb 1200] [--only qcow2,zlib,zstd,raw] [--cli dist/cli.js]
//
// Builds once (cached under bench/out/) a 2 GiB ext4 file system image filled from real files
// (/usr/lib, /usr/share, /usr/bin, about 1.2 GB) with `mke2fs -t ext4 -d`, then qcow2 copies made
// by qemu-img (plain, -c zlib, -c zstd). Each image is converted to raw by `node dist/cli.js
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
import { fileURLToPath, pathToFileURL } from 'node:url';

const here = path.dirname(fileURLToPath(import.meta.url));
const root = path.resolve(here, '..');
const out = path.join(here, 'out');
mkdirSync(out, { recursive: true });

const args = process.argv.slice(2);
const opt = (name, dflt) => {
  const i = args.indexOf(`--${name}`);
  return i >= 0 ? args[i + 1] : dflt;
};
const RUNS = Number(opt('runs', 5));
const DATA_BYTES = Number(opt('data-mb', 1200)) * 1e6;
const ONLY = opt('only', 'qcow2,zlib,zstd,raw').split(',');

const cli = path.resolve(opt('cli', path.join(root, 'dist', 'cli.js')));
if (!existsSync(cli)) {
  console.error('dist/cli.js is missing: run `npm run build` first');
  process.exit(1);
}
const TIME = '/usr/bin/time';
if (!existsSync(TIME)) {
  console.error('/usr/bin/time is missing: apt-get install time');
  process.exit(1);
}

const log = (...a) => console.error('[bench]', ...a);

// ---- images (cached) -------------------------------------------------------------------------

const ext4 = path.join(out, 'ext4-2g.raw');
const images = {
  raw: ext4,
  qcow2: path.join(out, 'ext4-2g.qcow2'),
  zlib: path.join(out, 'ext4-2g-zlib.qcow2'),
  zstd: path.join(out, 'ext4-2g-zstd.qcow2'),
};

/** Copies regular files from the source trees into dest until budget bytes are copied. */
function fillTree(dest, budget) {
  let copied = 0;
  const sources = ['/usr/lib', '/usr/share', '/usr/bin'];
  const walk = (dir) => {
    let entries;
    try {
      entries = readdirSync(dir, { withFileTypes: true });
    } catch {
      return;
    }
    for (const e of entries) {
      if (copied >= budget) return;
      const p = path.join(dir, e.name);
      if (p.startsWith(out) || p.startsWith('/usr/lib/node_modules')) continue;
      if (e.isDirectory()) walk(p);
      else if (e.isFile()) {
        let st;
        try {
          st = lstatSync(p);
        } catch {
          continue;
        }
        if (st.size > 200e6) continue;
        const target = path.join(dest, p);
        try {
          mkdirSync(path.dirname(target), { recursive: true });
          cpSync(p, target);
          copied += st.size;
        } catch {
          /* unreadable: skip */
        }
      }
    }
  };
  for (const s of sources) walk(s);
  return copied;
}

function buildImages() {
  if (!existsSync(ext4)) {
    const tree = path.join(out, 'tree');
    rmSync(tree, { recursive: true, force: true });
    mkdirSync(tree, { recursive: true });
    log(`copying ~${(DATA_BYTES / 1e9).toFixed(1)} GB of real files into ${tree}`);
    const copied = fillTree(tree, DATA_BYTES);
    log(`copied ${(copied / 1e9).toFixed(2)} GB; mke2fs -t ext4 -d`);
    execFileSync('mke2fs', ['-q', '-F', '-t', 'ext4', '-d', tree, ext4 + '.tmp', '2G'], { stdio: 'inherit' });
    execFileSync('mv', [ext4 + '.tmp', ext4]);
    rmSync(tree, { recursive: true, force: true });
  }
  const mk = (target, extra) => {
    if (existsSync(target)) return;
    log(`qemu-img convert ${extra.join(' ')} -> ${path.basename(target)}`);
    execFileSync('qemu-img', ['convert', '-f', 'raw', '-O', 'qcow2', ...extra, ext4, target + '.tmp'], { stdio: 'inherit' });
    execFileSync('mv', [target + '.tmp', target]);
  };
  mk(images.qcow2, []);
  mk(images.zlib, ['-c', '-o', 'compression_type=zlib']);
  mk(images.zstd, ['-c', '-o', 'compression_type=zstd']);
}

// ---- timing ----------------------------------------------------------------------------------

/** Runs cmd under /usr/bin/time -v; returns wall seconds and peak RSS (KiB). */
function timed(cmd, cmdArgs) {
  const r = spawnSync(TIME, ['-v', cmd, ...cmdArgs], { encoding: 'utf8', maxBuffer: 64 << 20 });
  if (r.status !== 0) throw new Error(`${cmd} ${cmdArgs.join(' ')} failed (${r.status}):\n${r.stderr}`);
  const wall = /Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (?:(\d+):)?(\d+):([\d.]+)/.exec(r.stderr);
  const rss = /Maximum resident set size \(kbytes\): (\d+)/.exec(r.stderr);
  const user = /User time \(seconds\): ([\d.]+)/.exec(r.stderr);
  const sys = /System time \(seconds\): ([\d.]+)/.exec(r.stderr);
  if (!wall || !rss || !user || !sys) throw new Error(`cannot parse /usr/bin/time output:\n${r.stderr}`);
  const seconds = Number(wall[1] ?? 0) * 3600 + Number(wall[2]) * 60 + Number(wall[3]);
  return { seconds, rssKiB: Number(rss[1]), user: Number(user[1]), sys: Number(sys[1]) };
}

/** Wall time measured here too (time -v has 10 ms resolution). */
function timedPrecise(cmd, cmdArgs) {
  const t0 = process.hrtime.bigint();
  const r = timed(cmd, cmdArgs);
  const t1 = process.hrtime.bigint();
  return { seconds: Number(t1 - t0) / 1e9, rssKiB: r.rssKiB, user: r.user, sys: r.sys };
}

/** Per-tool summary: all wall times, medians of wall/user/sys, peak RSS. */
function toolEntry(runs) {
  return {
    seconds: runs.map((r) => r.seconds),
    medianSeconds: median(runs.map((r) => r.seconds)),
    medianUser: median(runs.map((r) => r.user)),
    medianSys: median(runs.map((r) => r.sys)),
    peakRssKiB: Math.max(...runs.map((r) => r.rssKiB)),
  };
}

const median = (xs) => {
  const s = [...xs].sort((a, b) => a - b);
  return s.length % 2 ? s[(s.length - 1) / 2] : (s[s.length / 2 - 1] + s[s.length / 2]) / 2;
};

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
