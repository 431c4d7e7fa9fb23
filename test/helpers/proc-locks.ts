// Image locks as the kernel shows them (/proc/locks), and background processes that hold images
// (a qemu-io sleeping on an image: a VM's stand-in; a slow convert), for the image-locking tests.

import { spawn, type ChildProcess } from 'node:child_process';
import { closeSync, openSync, readFileSync, statSync } from 'node:fs';
import { loadNative } from '../../src/io/native.js';
import { setTimeout as sleep } from 'node:timers/promises';
import { afterAll } from 'vitest';

/** How /proc/locks names a file: device (hex major:minor) and inode; undefined when it does not exist. */
function lockId(file: string): string | undefined {
  const st = statSync(file, { throwIfNoEntry: false });
  if (!st) return undefined;
  const major = Math.floor(st.dev / 256) & 0xfff;
  const minor = (st.dev & 0xff) | (Math.floor(st.dev / 4096) & 0xfff00);
  return ` ${major.toString(16).padStart(2, '0')}:${minor.toString(16).padStart(2, '0')}:${st.ino} `;
}

/**
 * The OFD lock bytes held on each of `files` by anyone (sorted, one entry per byte and holder;
 * "W" marks an exclusive lock); none for a file that does not exist. One read of /proc/locks.
 */
export function lockBytesOf(files: string[]): string[][] {
  const ids = files.map(lockId);
  const out = files.map((): string[] => []);
  // /proc/locks can be long (every lock of the machine): only lines naming our files are split.
  for (const line of readFileSync('/proc/locks', 'utf8').split('\n')) {
    const k = ids.findIndex((id) => id !== undefined && line.includes(id));
    if (k < 0) continue;
    const f = line.trim().split(/\s+/);
    // "N: OFDLCK ADVISORY READ -1 fe:00:1234 100 100"; waiters ("N: -> ...") hold nothing.
    if (f[1] !== 'OFDLCK') continue;
    const start = Number(f[6]);
    const end = f[7] === 'EOF' ? start : Number(f[7]);
    for (let b = start; b <= end; b++) out[k]!.push(f[3] === 'WRITE' ? `${b}W` : String(b));
  }
  return out.map((bytes) => bytes.sort());
}

/** lockBytesOf for one file. */
export function lockBytes(file: string): string[] {
  return lockBytesOf([file])[0]!;
}

/**
 * Which of QEMU's lock bytes (100-104, 200-204) someone holds on `file`, asked of the kernel with
 * F_OFD_GETLK: cheap where /proc/locks is long, so waits poll this and read /proc/locks once.
 */
export function probeBytes(file: string): string[] {
  const ops = loadNative()?.ofdLocks;
  if (!ops) throw new Error('OFD lock probing needs the native binding');
  let fd: number;
  try {
    fd = openSync(file, 'r');
  } catch {
    return []; // not created yet
  }
  try {
    const held: string[] = [];
    for (const base of [100, 200]) {
      for (let i = 0; i < 5; i++) if (ops.test(fd, base + i) === 1) held.push(String(base + i));
    }
    return held;
  } finally {
    closeSync(fd);
  }
}

/** A process started in the background; stop() kills it by pid (idempotent) and waits for its exit. */
export interface Background {
  child: ChildProcess;
  stderr(): string;
  stop(): Promise<void>;
}

/** Every background process not yet stopped: killed after the file's tests even when a test timed out mid-way. */
const running = new Set<Background>();
afterAll(async () => {
  await Promise.all([...running].map((p) => p.stop()));
});
// And if the test process ends without its hooks, synchronously as it exits.
process.once('exit', () => {
  for (const p of running) {
    if (p.child.pid === undefined || p.child.exitCode !== null) continue;
    try {
      process.kill(p.child.pid, 'SIGKILL');
    } catch {
      // already gone
    }
  }
});

/** Starts `cmd args` in `cwd` (stdout discarded, stderr kept). */
export function background(cmd: string, args: string[], cwd: string, env: NodeJS.ProcessEnv = {}): Background {
  const child = spawn(cmd, args, { cwd, env: { ...process.env, LC_ALL: 'C', ...env }, stdio: ['ignore', 'ignore', 'pipe'] });
  let err = '';
  child.stderr!.setEncoding('utf8').on('data', (d: string) => (err += d));
  const exited = new Promise<void>((resolve) => {
    // 'close': after the exit and the end of its stderr, so that stderr() is complete.
    child.once('close', () => resolve());
  });
  child.once('error', () => undefined);
  const proc: Background = {
    child,
    stderr: () => err,
    async stop() {
      running.delete(proc);
      if (child.exitCode === null && child.signalCode === null && child.pid !== undefined) {
        try {
          process.kill(child.pid, 'SIGKILL');
        } catch {
          // already gone
        }
      }
      await exited;
    },
  };
  running.add(proc);
  return proc;
}

/**
 * Waits until `ready()` holds, polling; fails (with the process's stderr) if the process exits
 * first. No time limit of its own: the test's timeout bounds it.
 */
export async function waitFor(proc: Background, what: string, ready: () => boolean): Promise<void> {
  for (;;) {
    if (ready()) return;
    if (proc.child.exitCode !== null || proc.child.signalCode !== null) {
      throw new Error(`process exited (${proc.child.exitCode ?? proc.child.signalCode}) before ${what}: ${proc.stderr()}`);
    }
    await sleep(25);
  }
}

/**
 * qemu-io holding `files[0]` open (with `opts`, e.g. ['-r'] or ['-r', '-U']) until stopped; resolves
 * once every one of `files` (the image, its backing files, its data file) shows its locks.
 */
export async function holdWithQemuIo(
  files: string[], format: 'qcow2' | 'raw', opts: string[], cwd: string,
): Promise<Background> {
  const proc = background('qemu-io', ['-f', format, ...opts, '-c', 'sleep 100000000', files[0]!], cwd);
  try {
    // QEMU takes its lock bytes one fcntl at a time: wait until they stop changing, or a probe
    // between two of them sees half the set (a CI run saw byte 100 without 101).
    await settledLocks(proc, files, (bytes) => bytes.every((b) => b.length > 0));
  } catch (e) {
    await proc.stop();
    throw e;
  }
  return proc;
}

/**
 * Waits until the lock bytes on `files` satisfy `ready` and stay the same in several probes in a
 * row (a command past its opening steps, which take and drop locks), then returns them as
 * /proc/locks shows them.
 */
export async function settledLocks(proc: Background, files: string[], ready: (bytes: string[][]) => boolean): Promise<string[][]> {
  let last = '';
  let same = 0;
  for (;;) {
    let bytes: string[][] = [];
    await waitFor(proc, `locks on ${files.join(', ')}`, () => {
      bytes = files.map(probeBytes);
      return ready(bytes);
    });
    const key = JSON.stringify(bytes);
    same = key === last ? same + 1 : 0;
    last = key;
    if (same >= 3) return lockBytesOf(files);
    await sleep(50);
  }
}
