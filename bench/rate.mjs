// Rate-limit benchmark: how long qimg convert -r and qemu-img convert -r take for the same copy.
// Both throttle written bytes with QEMU's leaky bucket (a request may start while the bucket
// holds at most rate/10 bytes), so a throttled copy of N bytes in 2 MiB requests should take
// about (N - 2 MiB - rate/10) / rate seconds in both, and an unthrottled one (-r 0) far less.
// The tests check the limiter's schedule on a virtual clock (test/convert/convert-rate.test.ts);
// this is where the wall-clock times are looked at. Never part of the test run.
//
//   npm run build && node bench/rate.mjs [--runs 3] [--mb 4] [--cli dist/cli.cjs]

import { randomBytes } from 'node:crypto';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { log, median, opt, requireCli, timed } from './lib.mjs';

const RUNS = Number(opt('runs', 3));
const MB = Number(opt('mb', 4));
const cli = requireCli();

const dir = mkdtempSync(path.join(os.tmpdir(), 'qimg-bench-rate-'));
try {
  const src = path.join(dir, 'src.raw');
  writeFileSync(src, randomBytes(MB * 1024 * 1024));
  const cases = [
    { fmt: 'raw', rate: '2M' },
    { fmt: 'qcow2', rate: '4M' },
    { fmt: 'raw', rate: '0' },
  ];
  const rows = [];
  for (const c of cases) {
    const rate = c.rate === '0' ? 0 : Number.parseInt(c.rate, 10) * 1024 * 1024;
    const bytes = MB * 1024 * 1024;
    const expected = rate ? Math.max(0, (bytes - 2 * 1024 * 1024 - rate / 10) / rate) : 0;
    const secs = { qemu: [], qimg: [] };
    for (let i = 0; i < RUNS; i++) {
      for (const tool of ['qemu', 'qimg']) {
        const target = path.join(dir, `out.${c.fmt}`);
        rmSync(target, { force: true });
        const args = ['convert', '-r', c.rate, '-O', c.fmt, src, target];
        const r = tool === 'qemu' ? timed('qemu-img', args) : timed(process.execPath, [cli, ...args]);
        if (r.error) throw new Error(`${tool} ${args.join(' ')}: ${r.error}`);
        secs[tool].push(r.seconds);
      }
    }
    rows.push({ case: `-O ${c.fmt} -r ${c.rate}`, bucketSeconds: expected, qemuImg: median(secs.qemu), qimg: median(secs.qimg) });
    log(`-O ${c.fmt} -r ${c.rate}: qemu-img ${median(secs.qemu).toFixed(2)} s, qimg ${median(secs.qimg).toFixed(2)} s (bucket: ${expected.toFixed(2)} s)`);
  }
  console.log(JSON.stringify(rows, null, 2));
} finally {
  rmSync(dir, { recursive: true, force: true });
}
