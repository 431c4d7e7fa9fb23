// After tsup: gives the CLI bundle (dist/cli-main.cjs) a fresh build id and makes the V8 code
// cache the `qimg` executable loads with it (dist/cli-main.cache; see src/cli/launch.ts), by running
// a few commands over small images in a temporary directory, each adding what it compiled.
//
//   node scripts/code-cache.mjs [dist directory]
//
// Without a cache the CLI still works (compiling from source), so any failure here is a warning.

import { execFileSync, spawnSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';

const MARK = '\n//# qimg-build-id=';
const dist = path.resolve(process.argv[2] ?? 'dist');
const bundle = path.join(dist, 'cli-main.cjs');
const cache = path.join(dist, 'cli-main.cache');
const cli = path.join(dist, 'cli.cjs');

let source = readFileSync(bundle, 'utf8');
const at = source.lastIndexOf(MARK);
if (at >= 0) source = source.slice(0, at);
writeFileSync(bundle, `${source}${MARK}${randomBytes(16).toString('hex')}\n`);
rmSync(cache, { force: true });

const dir = mkdtempSync(path.join(os.tmpdir(), 'qimg-code-cache-'));
const qimg = (...args) => execFileSync(process.execPath, [cli, ...args], { cwd: dir, env: { ...process.env, QIMG_CODE_CACHE_WRITE: '1' }, stdio: 'pipe' });
try {
  const raw = Buffer.alloc(4 << 20);
  for (let i = 0; i < raw.length; i += 4096) raw.fill((i >> 12) + 1, i, i + 2048);
  writeFileSync(path.join(dir, 'a.raw'), raw);
  // The commands run most, and only those: every function in the cache is materialized at start-up
  // (~3 MiB of heap for this set), used or not.
  qimg('create', '-q', '-f', 'qcow2', 'new.qcow2', '64M');
  qimg('convert', '-f', 'raw', '-O', 'qcow2', 'a.raw', 'a.qcow2');
  qimg('convert', '-f', 'qcow2', '-O', 'raw', 'a.qcow2', 'b.raw');
  qimg('info', 'a.qcow2');
  // The cache must now be accepted by a run with the flags a user's run has.
  const used = spawnSync(process.execPath, [cli, 'info', 'a.qcow2'], { cwd: dir, env: { ...process.env, QIMG_CODE_CACHE_DEBUG: '1' }, encoding: 'utf8' });
  if (!used.stderr.includes('code cache used')) throw new Error(`the cache made is not used: ${used.stderr.trim()}`);
} catch (e) {
  console.warn(`code-cache: no code cache (${e instanceof Error ? e.message.split('\n')[0] : e})`);
  rmSync(cache, { force: true });
} finally {
  rmSync(dir, { recursive: true, force: true });
}
