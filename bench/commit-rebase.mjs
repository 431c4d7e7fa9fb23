// Commit and rebase benchmark: qimg and qemu-img side by side on copies of the same inputs.
//  - commit: an overlay holding --gb GiB of data (64 KiB clusters) committed into its backing file
//    (empty, half the size: it is grown as well); the overlay is emptied afterwards;
//  - rebase: an empty overlay over old.qcow2 (--gb GiB of data) rebased onto new.qcow2, which
//    differs from it in every other 64 KiB cluster (safe mode: half the clusters are copied).
// Median wall time of --runs runs each, ratios qimg / qemu-img printed (below 1: qimg faster).
// Never part of the test run.
//
//   npm run build && node bench/commit-rebase.mjs [--runs 3] [--gb 1] [--cli dist/cli.cjs]

import { execFileSync } from 'node:child_process';
import { copyFileSync, mkdtempSync, rmSync, statSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { log, median, opt, requireCli, timed } from './lib.mjs';

const RUNS = Number(opt('runs', 3));
const GB = Number(opt('gb', 1));
const cli = requireCli();
const size = `${GB * 1024}M`;

const dir = mkdtempSync(path.join(opt('dir', os.tmpdir()), 'qimg-bench-commit-'));
const p = (f) => path.join(dir, f);
const img = (...a) => execFileSync('qemu-img', a, { cwd: dir, stdio: ['ignore', 'ignore', 'inherit'] });
const io = (file, cmds) => execFileSync('qemu-io', ['-f', 'qcow2', ...cmds.flatMap((c) => ['-c', c]), file], { cwd: dir, stdio: ['ignore', 'ignore', 'inherit'] });

try {
  log(`making inputs in ${dir} (${GB} GiB)`);
  // commit inputs
  img('create', '-q', '-f', 'qcow2', 'cbase.qcow2', `${GB * 512}M`);
  img('create', '-q', '-f', 'qcow2', '-b', 'cbase.qcow2', '-F', 'qcow2', 'ctop.qcow2', size);
  io('ctop.qcow2', [`write -P 0x5a 0 ${size}`]);
  // rebase inputs: old has pattern 1 everywhere; new has pattern 1 in even clusters, 2 in odd ones.
  img('create', '-q', '-f', 'qcow2', 'old.qcow2', size);
  io('old.qcow2', [`write -P 1 0 ${size}`]);
  img('create', '-q', '-f', 'qcow2', 'new.qcow2', size);
  io('new.qcow2', [`write -P 1 0 ${size}`]);
  const clusters = (GB * 1024 * 1024) / 64;
  const cmds = [];
  for (let c = 1; c < clusters; c += 2) cmds.push(`write -P 2 ${c * 64}k 64k`);
  for (let i = 0; i < cmds.length; i += 4096) io('new.qcow2', cmds.slice(i, i + 4096));
  img('create', '-q', '-f', 'qcow2', '-b', 'old.qcow2', '-F', 'qcow2', 'rtop.qcow2', size);
  log(`inputs: ctop ${statSync(p('ctop.qcow2')).size} bytes, new ${statSync(p('new.qcow2')).size} bytes`);

  const results = {};
  const bench = (name, prepare, args, verify) => {
    const secs = { qemu: [], qimg: [] };
    for (let i = 0; i < RUNS; i++) {
      for (const tool of ['qemu', 'qimg']) {
        prepare();
        const r = tool === 'qemu' ? timed('qemu-img', args) : timed(process.execPath, [cli, ...args]);
        if (r.error) throw new Error(`${tool} ${args.join(' ')}: ${r.error}`);
        verify();
        secs[tool].push(r.seconds);
        log(`${name} ${tool} run ${i + 1}: ${r.seconds.toFixed(2)} s (user ${r.user} s, sys ${r.sys} s, RSS ${(r.rssKiB / 1024).toFixed(0)} MiB)`);
      }
    }
    const q = median(secs.qemu);
    const o = median(secs.qimg);
    results[name] = { qemuImg: q, qimg: o, ratio: o / q };
  };

  bench(
    `commit (${GB} GiB of data)`,
    () => {
      copyFileSync(p('cbase.qcow2'), p('b.qcow2'));
      execFileSync('cp', ['--sparse=always', p('ctop.qcow2'), p('t.qcow2')]);
      img('rebase', '-u', '-b', 'b.qcow2', '-F', 'qcow2', 't.qcow2');
      execFileSync('sync');
    },
    ['commit', '-q', p('t.qcow2')],
    () => img('check', '-q', p('b.qcow2')),
  );
  bench(
    `rebase (${GB} GiB, half the clusters differ)`,
    () => {
      copyFileSync(p('rtop.qcow2'), p('r.qcow2'));
      execFileSync('sync');
    },
    ['rebase', '-b', 'new.qcow2', '-F', 'qcow2', p('r.qcow2')],
    () => img('check', '-q', p('r.qcow2')),
  );

  console.log('\noperation                                   qemu-img    qimg   ratio (qimg/qemu-img)');
  for (const [name, r] of Object.entries(results)) {
    console.log(`${name.padEnd(42)} ${r.qemuImg.toFixed(2).padStart(8)} s ${r.qimg.toFixed(2).padStart(6)} s   ${r.ratio.toFixed(2)}`);
  }
} finally {
  rmSync(dir, { recursive: true, force: true });
}
