// Convert benchmark: qimg convert vs qemu-img convert, side by side in the same run.
//
//   npm run build && node bench/convert.mjs [--runs 5] [--only raw-qcow2,qcow2-raw,...] [--cli dist/cli.cjs]
//                                           [--verify all|first] [--markdown] [--out results-convert.json]
//
// Uses bench/read.mjs's cached 2 GiB ext4 image (bench/out/ext4-2g.raw: real files from /usr put
// in with `mke2fs -t ext4 -d`) and its qcow2 / zlib / zstd copies made by qemu-img, building them
// the same way when missing; plus a 1 TiB qcow2 with a few MiB written by qemu-io (for peak RSS).
// Each case runs qimg (`node dist/cli.cjs convert ...`) and qemu-img with the same arguments, one
// warm-up each, then --runs alternating runs each under /usr/bin/time -v (wall time, user+sys CPU,
// peak RSS). Before every run of either tool the target is removed and the file systems synced
// (outside the timed part). Every output is checked with `qemu-img compare` against the source,
// outside the timed part too (--verify first: only the warm-up outputs). When qimg fails a case (a feature not there yet) the case is recorded as pending with
// qimg's error, and qemu-img's times are still measured. Prints a table with ratios qimg/qemu-img
// and the targets (uncompressed within 1.5x, compressed writing at most 0.5x, compressed reading
// within 1.2x, qimg peak RSS < 100 MiB), writes bench/out/results-convert.json. Never part of the
// test run.

import { execFileSync, spawnSync } from 'node:child_process';
import { cpSync, existsSync, lstatSync, mkdirSync, readdirSync, rmSync, statSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { args, buildExt4Images, images as ext4Images, log, opt, out, requireCli, root, timed, toolEntry } from './lib.mjs';

const RUNS = Number(opt('runs', 5));
const DATA_BYTES = Number(opt('data-mb', 1200)) * 1e6;
const VERIFY = opt('verify', 'all');
const MARKDOWN = args.includes('--markdown');
const RESULTS = path.join(out, opt('out', 'results-convert.json'));
const cli = requireCli();

// ---- images (cached; built as bench/read.mjs builds them) -------------------------------------

const images = { ...ext4Images, sparse1t: path.join(out, 'sparse-1t.qcow2') };

function buildImages() {
  buildExt4Images(DATA_BYTES);
  if (!existsSync(images.sparse1t)) {
    const tmp = images.sparse1t + '.tmp';
    execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', tmp, '1T']);
    const writes = [];
    for (let i = 0; i < 16; i++) writes.push('-c', `write -P ${0x10 + i} ${i * 64 + 3}G 256k`);
    writes.push('-c', 'write -P 0x77 0 1M', '-c', 'write -z 1M 1M', '-c', `write -P 0x78 ${2 ** 40 - 2 ** 20} 1M`);
    execFileSync('qemu-io', ['-f', 'qcow2', ...writes, tmp], { stdio: 'ignore' });
    execFileSync('mv', [tmp, images.sparse1t]);
  }
}

// ---- timing ------------------------------------------------------------------------------------

function verify(c, target) {
  const t0 = process.hrtime.bigint();
  const r = spawnSync('qemu-img', ['compare', '-f', c.srcFmt, '-F', c.outFmt, c.src, target], { encoding: 'utf8' });
  const seconds = Number(process.hrtime.bigint() - t0) / 1e9;
  const ok = r.status === 0 && r.stdout.trim() === 'Images are identical.';
  if (!ok) log(`VERIFY FAILED ${c.name} ${path.basename(target)}: exit ${r.status} ${r.stdout}${r.stderr}`);
  return { ok, seconds };
}

// ---- cases -------------------------------------------------------------------------------------

const cases = [
  { id: 'raw-qcow2', name: 'raw → qcow2', src: images.raw, srcFmt: 'raw', outFmt: 'qcow2', opts: [], kind: 'uncompressed' },
  { id: 'qcow2-raw', name: 'qcow2 → raw', src: images.qcow2, srcFmt: 'qcow2', outFmt: 'raw', opts: [], kind: 'uncompressed' },
  { id: 'raw-zlib', name: 'raw → qcow2 -c (zlib)', src: images.raw, srcFmt: 'raw', outFmt: 'qcow2', opts: ['-c'], kind: 'compress' },
  { id: 'raw-zstd', name: 'raw → qcow2 -c zstd', src: images.raw, srcFmt: 'raw', outFmt: 'qcow2', opts: ['-c', '-o', 'compression_type=zstd'], kind: 'compress' },
  { id: 'zlib-raw', name: 'zlib qcow2 → raw', src: images.zlib, srcFmt: 'qcow2', outFmt: 'raw', opts: [], kind: 'decompress' },
  { id: 'zstd-raw', name: 'zstd qcow2 → raw', src: images.zstd, srcFmt: 'qcow2', outFmt: 'raw', opts: [], kind: 'decompress' },
  { id: '1t-qcow2', name: '1 TiB sparse qcow2 → qcow2', src: images.sparse1t, srcFmt: 'qcow2', outFmt: 'qcow2', opts: [], kind: 'sparse' },
  { id: '1t-raw', name: '1 TiB sparse qcow2 → raw', src: images.sparse1t, srcFmt: 'qcow2', outFmt: 'raw', opts: [], kind: 'sparse' },
];
const TARGET_RATIO = { uncompressed: 1.5, compress: 0.5, decompress: 1.2, sparse: undefined };
const RSS_LIMIT_MIB = 100;
const ONLY = opt('only', cases.map((c) => c.id).join(',')).split(',');

function benchCase(c) {
  const target = path.join(out, `convert-out.${c.outFmt}`);
  const cmdArgs = ['convert', '-f', c.srcFmt, '-O', c.outFmt, ...c.opts, c.src, target];
  const tools = {
    qimg: () => timed(process.execPath, [cli, ...cmdArgs]),
    'qemu-img': () => timed('qemu-img', cmdArgs),
  };
  const res = { qimg: [], 'qemu-img': [] };
  const verified = { qimg: [], 'qemu-img': [] };
  const verifySeconds = [];
  const pending = {};
  const runOnce = (t, record) => {
    rmSync(target, { force: true });
    // The previous run's 1.2 GB of dirty pages would otherwise be written back during this one,
    // taking CPU from whichever tool runs next.
    spawnSync('sync');
    const r = tools[t]();
    if (r.error) {
      pending[t] = r.error;
      return;
    }
    if (record) res[t].push(r);
    if (!record || VERIFY === 'all') {
      const v = verify(c, target);
      verified[t].push(v.ok);
      verifySeconds.push(v.seconds);
    }
  };
  // Warm-up (page cache, JIT), checked.
  for (const t of Object.keys(tools)) runOnce(t, false);
  for (let i = 0; i < RUNS; i++) {
    for (const t of i % 2 ? ['qemu-img', 'qimg'] : ['qimg', 'qemu-img']) {
      if (pending[t]) continue;
      runOnce(t, true);
    }
  }
  rmSync(target, { force: true });
  if (pending['qemu-img']) throw new Error(`qemu-img failed ${c.name}: ${pending['qemu-img']}`);
  return {
    command: cmdArgs.map((a) => (a === c.src || a === target ? path.relative(root, a) : a)).join(' '),
    sourceFileSize: statSync(c.src).size,
    qimg: pending.qimg ? { pending: pending.qimg } : toolEntry(res.qimg),
    qemuImg: toolEntry(res['qemu-img']),
    verified: { qimg: verified.qimg.length > 0 && verified.qimg.every(Boolean), qemuImg: verified['qemu-img'].every(Boolean), compares: verified.qimg.length + verified['qemu-img'].length },
    verifySeconds: verifySeconds.reduce((a, b) => a + b, 0),
  };
}

// ---- main --------------------------------------------------------------------------------------

buildImages();
const results = {
  date: new Date().toISOString(),
  host: {
    cpus: os.cpus().length,
    cpuModel: os.cpus()[0]?.model,
    node: process.version,
    qemuImg: execFileSync('qemu-img', ['--version'], { encoding: 'utf8' }).split('\n')[0],
    // The commit the benchmarked CLI was built from (its checkout, e.g. a worktree given with --cli).
    cliGitHead: spawnSync('git', ['rev-parse', '--short', 'HEAD'], { cwd: path.dirname(cli), encoding: 'utf8' }).stdout.trim(),
  },
  runs: RUNS,
  verify: VERIFY,
  cli: path.relative(root, cli),
  loadAverageAtStart: os.loadavg(),
  targets: { ratio: TARGET_RATIO, qimgPeakRssMiB: RSS_LIMIT_MIB },
  cases: {},
};

const rows = [];
for (const c of cases) {
  if (!ONLY.includes(c.id)) continue;
  log(`${c.name}: warm-up + ${RUNS} alternating runs each`);
  const e = benchCase(c);
  const limit = TARGET_RATIO[c.kind];
  const q = e.qimg.pending ? undefined : e.qimg;
  const ratio = q ? q.medianSeconds / e.qemuImg.medianSeconds : undefined;
  const rssMiB = q ? q.peakRssKiB / 1024 : undefined;
  e.ratio = ratio;
  e.meetsRatio = ratio === undefined || limit === undefined ? undefined : ratio <= limit;
  e.meetsRss = rssMiB === undefined ? undefined : rssMiB < RSS_LIMIT_MIB;
  results.cases[c.id] = { name: c.name, kind: c.kind, ...e };
  if (q === undefined) log(`${c.name}: qimg pending: ${e.qimg.pending}`);
  const cpu = (t) => `${t.medianUser.toFixed(2)}+${t.medianSys.toFixed(2)}`;
  rows.push([
    c.name,
    q ? q.medianSeconds.toFixed(2) : 'pending',
    e.qemuImg.medianSeconds.toFixed(2),
    ratio !== undefined ? `${ratio.toFixed(2)}x` : '–',
    limit !== undefined ? `≤ ${limit}x${e.meetsRatio === undefined ? '' : e.meetsRatio ? ' ✓' : ' ✗'}` : '–',
    q ? cpu(q) : '–',
    cpu(e.qemuImg),
    q ? `${rssMiB.toFixed(0)}${e.meetsRss ? ' ✓' : ' ✗'}` : '–',
    (e.qemuImg.peakRssKiB / 1024).toFixed(0),
    `${q ? (e.verified.qimg ? 'yes' : 'NO') : '–'}/${e.verified.qemuImg ? 'yes' : 'NO'}`,
  ]);
}
results.loadAverageAtEnd = os.loadavg();
const header = ['convert', 'qimg s', 'qemu-img s', 'ratio', 'target', 'qimg u+s', 'qemu-img u+s', 'qimg RSS MiB (< 100)', 'qemu-img RSS MiB', 'identical (qimg/qemu-img)'];
const title = `qimg convert vs qemu-img convert, 2 GiB ext4 image (1.2 GB of files) and a 1 TiB sparse qcow2; median of ${RUNS} alternating runs (qimg ${results.host.cliGitHead}, ${results.host.cpus} CPUs ${results.host.cpuModel ?? ''}, Node ${results.host.node}, ${results.host.qemuImg}, ${results.date.slice(0, 10)}, load ${results.loadAverageAtStart.map((x) => x.toFixed(1)).join(' ')})`;
console.log(title);
if (MARKDOWN) {
  console.log(`| ${header.join(' | ')} |`);
  console.log(`| ${header.map((_, i) => (i === 0 ? '---' : '---:')).join(' | ')} |`);
  for (const r of rows) console.log(`| ${r.join(' | ')} |`);
} else {
  const widths = header.map((h, i) => Math.max(h.length, ...rows.map((r) => r[i].length)));
  const line = (r) => r.map((cell, i) => (i === 0 ? cell.padEnd(widths[i]) : cell.padStart(widths[i]))).join('  ');
  console.log(line(header));
  for (const r of rows) console.log(line(r));
}
for (const [id, e] of Object.entries(results.cases)) if (e.qimg.pending) console.log(`pending ${id}: ${e.qimg.pending}`);
writeFileSync(RESULTS, JSON.stringify(results, null, 2) + '\n');
console.log(`results: ${path.relative(process.cwd(), RESULTS)}`);
