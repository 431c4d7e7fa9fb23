// Internal snapshot benchmark: `snapshot -c` on an image with 1 GiB allocated in 64 KiB clusters
// (16384 data clusters, 2 L2 tables), qimg and qemu-img side by side, then `snapshot -d`. The
// target: qimg's work beyond Node's start (its time less `qimg --version`'s) under 0.2 s.
// Each tool works on its own copy; every run creates a snapshot of a new name (the cost of a
// create does not grow with the snapshots already there: it walks the active tables only).
// Never part of the test run.
//
//   npm run build && node bench/snapshot.mjs [--runs 5] [--cli dist/cli.cjs]

import { execFileSync } from 'node:child_process';
import { copyFileSync, mkdtempSync, rmSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { log, median, opt, requireCli, timed } from './lib.mjs';

const RUNS = Number(opt('runs', 5));
const cli = requireCli();

const dir = mkdtempSync(path.join(os.tmpdir(), 'qimg-bench-snapshot-'));
try {
  const base = path.join(dir, 'base.qcow2');
  execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', base, '1G']);
  log('filling 1 GiB with qemu-io');
  execFileSync('qemu-io', ['-c', 'write -P 0x5a 0 1G', base], { stdio: 'ignore' });
  const img = { qemu: path.join(dir, 'qemu.qcow2'), qimg: path.join(dir, 'qimg.qcow2') };
  copyFileSync(base, img.qemu);
  copyFileSync(base, img.qimg);
  const run = (tool, args) => {
    const r = tool === 'qemu' ? timed('qemu-img', args) : timed(process.execPath, [cli, ...args]);
    if (r.error) throw new Error(`${tool} ${args.join(' ')}: ${r.error}`);
    return r;
  };
  const cpu = (r) => r.user + r.sys;
  const rows = [];
  const start = [];
  for (let i = 0; i < RUNS; i++) start.push(run('qimg', ['--version']));
  const nodeStart = { seconds: median(start.map((r) => r.seconds)), cpu: median(start.map(cpu)) };
  for (const action of ['-c', '-d']) {
    const res = { qemu: [], qimg: [] };
    for (let i = 0; i < RUNS; i++) {
      for (const tool of ['qemu', 'qimg']) res[tool].push(run(tool, ['snapshot', action, `s${i}`, img[tool]]));
    }
    const q = { seconds: median(res.qemu.map((r) => r.seconds)), cpu: median(res.qemu.map(cpu)) };
    const o = { seconds: median(res.qimg.map((r) => r.seconds)), cpu: median(res.qimg.map(cpu)) };
    const beyondStart = o.seconds - nodeStart.seconds;
    rows.push({
      case: `snapshot ${action}, 1 GiB allocated, 64 KiB clusters`,
      qemuImgSeconds: q.seconds,
      qimgSeconds: o.seconds,
      ratio: o.seconds / q.seconds,
      qimgBeyondNodeStartSeconds: beyondStart,
      qemuImgCpu: q.cpu,
      qimgCpuBeyondNodeStart: o.cpu - nodeStart.cpu,
    });
    log(`snapshot ${action}: qemu-img ${q.seconds.toFixed(3)} s, qimg ${o.seconds.toFixed(3)} s (ratio ${(o.seconds / q.seconds).toFixed(2)}; ` +
      `beyond Node's start: ${beyondStart.toFixed(3)} s wall, ${(o.cpu - nodeStart.cpu).toFixed(3)} s CPU)`);
  }
  // Both images must still be clean after the runs.
  for (const tool of ['qemu', 'qimg']) execFileSync('qemu-img', ['check', '-q', img[tool]]);
  console.log(JSON.stringify({ nodeStart, rows }, null, 2));
} finally {
  rmSync(dir, { recursive: true, force: true });
}
