// What the side-by-side benchmarks share: options, the cached 2 GiB ext4 image and its qemu-made
// copies, timing under /usr/bin/time -v, medians. Never part of the test run.

import { execFileSync, spawnSync } from 'node:child_process';
import { cpSync, existsSync, lstatSync, mkdirSync, readdirSync, rmSync } from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

export const here = path.dirname(fileURLToPath(import.meta.url));
export const root = path.resolve(here, '..');
export const out = path.join(here, 'out');
mkdirSync(out, { recursive: true });

export const args = process.argv.slice(2);
/** `--name value` from the command line, or `dflt`. */
export const opt = (name, dflt) => {
  const i = args.indexOf(`--${name}`);
  return i >= 0 ? args[i + 1] : dflt;
};
export const log = (...a) => console.error('[bench]', ...a);

/** The built CLI to time (`--cli` picks another build); exits when it is missing. */
export function requireCli() {
  const cli = path.resolve(opt('cli', path.join(root, 'dist', 'cli.cjs')));
  if (!existsSync(cli)) {
    console.error('dist/cli.cjs is missing: run `npm run build` first');
    process.exit(1);
  }
  return cli;
}

const TIME = '/usr/bin/time';

/** The cached benchmark images: a 2 GiB ext4 image of real files and qemu-img's qcow2 copies of it. */
export const ext4 = path.join(out, 'ext4-2g.raw');
export const images = {
  raw: ext4,
  qcow2: path.join(out, 'ext4-2g.qcow2'),
  zlib: path.join(out, 'ext4-2g-zlib.qcow2'),
  zstd: path.join(out, 'ext4-2g-zstd.qcow2'),
};

/** Copies regular files from /usr into dest until `budget` bytes are copied. */
function fillTree(dest, budget) {
  let copied = 0;
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
  for (const s of ['/usr/lib', '/usr/share', '/usr/bin']) walk(s);
  return copied;
}

/** Builds (once) the ext4 image from `dataBytes` of real files (mke2fs -d) and its qcow2/zlib/zstd copies. */
export function buildExt4Images(dataBytes) {
  if (!existsSync(ext4)) {
    const tree = path.join(out, 'tree');
    rmSync(tree, { recursive: true, force: true });
    mkdirSync(tree, { recursive: true });
    log(`copying ~${(dataBytes / 1e9).toFixed(1)} GB of real files into ${tree}`);
    const copied = fillTree(tree, dataBytes);
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

/**
 * Runs cmd under /usr/bin/time -v: wall seconds (measured here), user/sys CPU seconds, peak RSS
 * (KiB); a failing command gives `{ error }`.
 */
export function timed(cmd, cmdArgs) {
  if (!existsSync(TIME)) throw new Error('/usr/bin/time is missing: apt-get install time');
  const t0 = process.hrtime.bigint();
  const r = spawnSync(TIME, ['-v', cmd, ...cmdArgs], { encoding: 'utf8', maxBuffer: 64 << 20 });
  const seconds = Number(process.hrtime.bigint() - t0) / 1e9;
  if (r.status !== 0) {
    const err = r.stderr.split('\n').filter((l) => !/^\s|^Command (exited|being timed)/.test(l) && l.trim()).join('\n');
    return { error: `exit ${r.status}: ${err}` };
  }
  const rss = /Maximum resident set size \(kbytes\): (\d+)/.exec(r.stderr);
  const user = /User time \(seconds\): ([\d.]+)/.exec(r.stderr);
  const sys = /System time \(seconds\): ([\d.]+)/.exec(r.stderr);
  if (!rss || !user || !sys) throw new Error(`cannot parse /usr/bin/time output:\n${r.stderr}`);
  return { seconds, rssKiB: Number(rss[1]), user: Number(user[1]), sys: Number(sys[1]) };
}

export const median = (xs) => {
  const s = [...xs].sort((a, b) => a - b);
  return s.length % 2 ? s[(s.length - 1) / 2] : (s[s.length / 2 - 1] + s[s.length / 2]) / 2;
};

/** Per-tool summary of timed runs: all wall times, medians of wall/user/sys/CPU, peak RSS. */
export function toolEntry(runs) {
  return {
    seconds: runs.map((r) => r.seconds),
    medianSeconds: median(runs.map((r) => r.seconds)),
    medianUser: median(runs.map((r) => r.user)),
    medianSys: median(runs.map((r) => r.sys)),
    medianCpu: median(runs.map((r) => r.user + r.sys)),
    peakRssKiB: Math.max(...runs.map((r) => r.rssKiB)),
  };
}
