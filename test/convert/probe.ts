// Runs the qimg CLI with test/convert/timer-probe.mjs preloaded, so that a test can wait for the
// moment the rate limiter starts a long wait (a timer no other part of qimg asks for) instead of
// guessing it with a sleep: `qimg convert -r 1k` writes its first 2 MiB request at once and then
// waits half an hour for the next, a point that stays put until the test acts.

import { type ChildProcess, spawn } from 'node:child_process';
import { fileURLToPath, pathToFileURL } from 'node:url';
import { afterAll } from 'vitest';
import { cliPath } from '../cli/harness.js';

const PROBE = pathToFileURL(fileURLToPath(new URL('./timer-probe.mjs', import.meta.url))).href;

/** Children still running when the file's tests end (a test that failed before stopping its child) are killed. */
const live = new Set<ChildProcess>();
afterAll(() => {
  for (const child of live) child.kill('SIGKILL');
});

export interface ProbedExit {
  code: number | null;
  signal: NodeJS.Signals | null;
  stdout: string;
  stderr: string;
}

export interface ProbedRun {
  /**
   * The first timer of at least `minMs` the program asks for; rejects when the program exits
   * without asking for one (with its exit status and output).
   */
  timer(minMs: number): Promise<number>;
  /** Every timer asked for so far, in ms. */
  readonly timers: readonly number[];
  signal(sig: NodeJS.Signals): void;
  exit: Promise<ProbedExit>;
}

export async function qimgProbed(args: string[], cwd: string): Promise<ProbedRun> {
  const child = spawn(process.execPath, ['--import', PROBE, await cliPath(), ...args], {
    cwd,
    env: { ...process.env, LC_ALL: 'C' },
    stdio: ['ignore', 'pipe', 'pipe', 'pipe'],
  });
  live.add(child);
  child.on('exit', () => live.delete(child));
  let stdout = '';
  let stderr = '';
  child.stdout!.on('data', (d: Buffer) => (stdout += d.toString()));
  child.stderr!.on('data', (d: Buffer) => (stderr += d.toString()));
  const timers: number[] = [];
  const waiters: { minMs: number; resolve: (ms: number) => void }[] = [];
  let pending = '';
  (child.stdio[3] as NodeJS.ReadableStream).on('data', (d: Buffer) => {
    pending += d.toString();
    let nl: number;
    while ((nl = pending.indexOf('\n')) >= 0) {
      const m = /^setTimeout (\S+)$/.exec(pending.slice(0, nl));
      pending = pending.slice(nl + 1);
      if (!m) continue;
      const ms = Number(m[1]);
      timers.push(ms);
      for (let i = waiters.length - 1; i >= 0; i--) {
        if (ms >= waiters[i]!.minMs) waiters.splice(i, 1)[0]!.resolve(ms);
      }
    }
  });
  const exit = new Promise<ProbedExit>((resolve, reject) => {
    child.on('error', reject);
    // 'close': the output pipes (and the probe's) are drained too.
    child.on('close', (code, signal) => resolve({ code, signal, stdout, stderr }));
  });
  return {
    timers,
    timer(minMs) {
      const seen = timers.find((ms) => ms >= minMs);
      if (seen !== undefined) return Promise.resolve(seen);
      return new Promise<number>((resolve, reject) => {
        waiters.push({ minMs, resolve });
        void exit.then((e) =>
          reject(new Error(`qimg ${args.join(' ')} exited (${e.code ?? e.signal}) without a timer of ${minMs} ms or more; timers: ${timers.join(', ')}\n${e.stderr}${e.stdout}`)),
        );
      });
    },
    signal(sig) {
      child.kill(sig);
    },
    exit,
  };
}
