// qimg convert -r (rate limit) against qemu-img 7.2. Nothing here measures time:
// - the limiter's schedule, on a virtual clock: which writes it delays, for how long, as QEMU's
//   leaky bucket (util/throttle.c with only bps-write set, as qemu-img convert -r sets it) would;
// - at the CLI: the -r value is parsed and refused as qemu-img does, it reaches the limiter (the
//   program starts the wait the bucket prescribes; seen through a timer probe, not a clock), and a
//   throttled copy gives the same target as qemu-img's.
// bench/rate.mjs times throttled copies of both programs.

import { randomBytes } from 'node:crypto';
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import fc from 'fast-check';
import { beforeAll, describe, expect, it } from 'vitest';
import { MAX_SLEEP_MS, ThrottleAbortedError, WriteThrottle, type ThrottleClock } from '../../src/convert/throttle.js';
import { asQimg, qemuImg, qimg } from '../cli/harness.js';
import { checkProperty } from '../helpers/property.js';
import { tmpDir } from '../helpers/qemu.js';
import { qimgProbed } from './probe.js';

const MiB = 1024 * 1024;
const dir = tmpDir('qimg-rate-');

beforeAll(() => {
  writeFileSync(join(dir, 'src.raw'), randomBytes(4 * MiB));
});

/**
 * Virtual time for a WriteThrottle: sleeps are timers that fire only when the test runs them, in
 * deadline order, each moving the clock to its deadline.
 */
class VirtualClock implements ThrottleClock {
  private t = 0;
  private timers: { at: number; resolve: () => void }[] = [];
  /** Every sleep asked for, in ms. */
  readonly sleeps: number[] = [];

  now(): number {
    return this.t;
  }

  sleep(ms: number, signal?: AbortSignal): Promise<void> {
    this.sleeps.push(ms);
    return new Promise((resolve, reject) => {
      const timer = { at: this.t + ms / 1000, resolve };
      this.timers.push(timer);
      signal?.addEventListener('abort', () => {
        this.timers = this.timers.filter((x) => x !== timer);
        reject(new ThrottleAbortedError());
      }, { once: true });
    });
  }

  get pending(): number {
    return this.timers.length;
  }

  /** Lets promise callbacks run, then fires the timers due by `until` (all of them by default). */
  async run(until = Infinity): Promise<void> {
    for (;;) {
      await new Promise((resolve) => setImmediate(resolve));
      this.timers.sort((a, b) => a.at - b.at);
      const next = this.timers[0];
      if (!next || next.at > until) break;
      this.timers.shift();
      this.t = Math.max(this.t, next.at);
      next.resolve();
    }
    if (until !== Infinity) this.t = Math.max(this.t, until);
  }
}

/** Asks for writes of `sizes` bytes, all at time 0; the virtual times they were admitted at. */
async function schedule(rate: number, sizes: number[]): Promise<{ times: number[]; clock: VirtualClock }> {
  const clock = new VirtualClock();
  const t = new WriteThrottle(rate, { clock });
  const times: number[] = [];
  const admitted = sizes.map((n, i) => t.admit(n).then(() => (times[i] = clock.now())));
  await clock.run();
  await Promise.all(admitted);
  return { times, clock };
}

/**
 * QEMU's rule, worked out on its own: the bucket leaks `rate` bytes a second; a write may start
 * when the bucket holds at most rate / 10 bytes (otherwise it waits until the bucket has leaked
 * down to that), in arrival order, and then adds its size.
 */
function qemuSchedule(rate: number, requests: { at: number; bytes: number }[]): number[] {
  let level = 0;
  let last = 0;
  const out: number[] = [];
  for (const r of requests) {
    let t = Math.max(r.at, last);
    level = Math.max(0, level - (t - last) * rate);
    if (level > rate / 10) {
      t += (level - rate / 10) / rate;
      level = rate / 10;
    }
    last = t;
    level += r.bytes;
    out.push(t);
  }
  return out;
}

/** The throttle waits in whole milliseconds: it admits at most 1 ms after QEMU's instant, never before. */
function expectSchedule(got: number[], want: number[]): void {
  expect(got).toHaveLength(want.length);
  got.forEach((t, i) => {
    const w = want[i]!;
    // Rounding of the float sums (times reach weeks at 1 byte/s), far below a millisecond.
    const eps = 1e-9 + Math.abs(w) * 1e-12;
    const why = `write ${i}: admitted at ${t} s, QEMU's bucket says ${w} s`;
    expect(t, why).toBeGreaterThanOrEqual(w - eps);
    expect(t, why).toBeLessThanOrEqual(w + 0.001 + eps);
  });
}

describe('WriteThrottle: the schedule of QEMU\'s leaky bucket (virtual clock)', () => {
  it('admits writes at once while the bucket holds at most a tenth of a second\'s worth', async () => {
    // 1 MB/s: 50 kB, 50 kB (100 kB = rate/10 exactly: not over it), 50 kB all start at once; the
    // 4th finds 150 kB and waits until 50 kB have leaked.
    const { times, clock } = await schedule(1_000_000, [50_000, 50_000, 50_000, 50_000]);
    expectSchedule(times, [0, 0, 0, 0.05]);
    // Not even a millisecond's wait for the first three.
    expect(times.slice(0, 3)).toEqual([0, 0, 0]);
  });

  it('qemu-img convert\'s 2 MiB requests at -r 2M: the second waits 0.9 s, each later one 1 s more', async () => {
    const { times } = await schedule(2 * MiB, [2 * MiB, 2 * MiB, 2 * MiB, 2 * MiB]);
    expectSchedule(times, [0, 0.9, 1.9, 2.9]);
  });

  it('idle time leaks the bucket', async () => {
    const clock = new VirtualClock();
    const t = new WriteThrottle(2 * MiB, { clock });
    const at: number[] = [];
    await t.admit(2 * MiB);
    await clock.run(1); // the bucket is empty again
    await t.admit(2 * MiB).then(() => at.push(clock.now()));
    await clock.run(1.5); // 1 MiB left: 0.8 MiB over rate/10, 0.4 s to wait
    const third = t.admit(1).then(() => at.push(clock.now()));
    await clock.run();
    await third;
    expectSchedule(at, [1, 1.9]);
  });

  it('a wait longer than a Node timer allows is slept in pieces', async () => {
    // 1 byte/s, 4 MiB in the bucket: ~48 days, more than a 2^31-1 ms timer.
    const { times, clock } = await schedule(1, [4 * MiB, 1]);
    expectSchedule(times, qemuSchedule(1, [{ at: 0, bytes: 4 * MiB }, { at: 0, bytes: 1 }]));
    expect(Math.max(...clock.sleeps)).toBeLessThanOrEqual(MAX_SLEEP_MS);
    expect(clock.sleeps.length).toBeGreaterThan(1);
  });

  it('an abort refuses the waiting writes and every later one; an admitted write is not touched', async () => {
    const clock = new VirtualClock();
    const abort = new AbortController();
    const t = new WriteThrottle(1024, { clock, signal: abort.signal });
    const outcome = (p: Promise<void>): Promise<string> => p.then(() => 'admitted', (e: Error) => e.name);
    const first = outcome(t.admit(2 * MiB));
    const second = outcome(t.admit(2 * MiB));
    const third = outcome(t.admit(1));
    await clock.run(1); // the second waits (~34 minutes); the third queues behind it
    expect(clock.pending).toBe(1);
    abort.abort();
    expect(await Promise.all([first, second, third])).toEqual(['admitted', 'AbortError', 'AbortError']);
    expect(await outcome(t.admit(1))).toBe('AbortError');
    // Its timer was cancelled: nothing is left to keep a process alive.
    expect(clock.pending).toBe(0);
  });

  it('refuses a rate that is not positive', () => {
    for (const r of [0, -1, Number.NaN]) expect(() => new WriteThrottle(r)).toThrow(RangeError);
  });

  it('property: any rate, write sizes and arrival times give QEMU\'s schedule, in arrival order', async () => {
    const arb = fc.record({
      rate: fc.oneof(fc.integer({ min: 1, max: 4096 }), fc.integer({ min: 4096, max: 1 << 30 })),
      requests: fc.array(
        fc.record({
          gap: fc.oneof(fc.constant(0), fc.double({ min: 0, max: 3, noNaN: true })),
          bytes: fc.oneof(fc.integer({ min: 0, max: 4096 }), fc.integer({ min: 0, max: 4 * MiB })),
        }),
        { minLength: 1, maxLength: 20 },
      ),
    });
    await checkProperty({ name: 'WriteThrottle schedule', runs: 300 }, arb, async ({ rate, requests }) => {
      let at = 0;
      const timed = requests.map((r) => ({ at: (at += r.gap), bytes: r.bytes }));
      const clock = new VirtualClock();
      const t = new WriteThrottle(rate, { clock });
      const times: number[] = [];
      const order: number[] = [];
      const admitted: Promise<void>[] = [];
      for (const [i, r] of timed.entries()) {
        // The writes that were due before this one arrives go first.
        await clock.run(r.at);
        admitted.push(t.admit(r.bytes).then(() => {
          times[i] = clock.now();
          order.push(i);
        }));
      }
      await clock.run();
      await Promise.all(admitted);
      expect(order).toEqual(timed.map((_, i) => i));
      expectSchedule(times, qemuSchedule(rate, timed));
    });
  });
});

describe('qimg convert -r', () => {
  it('-r reaches the limiter: the first 2 MiB request is written at once, the next waits as the bucket says', async () => {
    // At 1 KiB/s the second request must wait (2 MiB - 102.4 B) / 1 KiB/s, ~34 minutes: the only
    // timer that long qimg could ask for. The program is then stopped with SIGINT (tested in
    // convert-cli.test.ts); the target holds exactly one request.
    const run = await qimgProbed(['convert', '-r', '1k', '-O', 'raw', 'src.raw', 'slow.raw'], dir);
    const ms = await run.timer(1_000_000);
    // The bucket leaks while the first write runs: the wait is at most the full one.
    expect(ms).toBeLessThanOrEqual(Math.ceil(((2 * MiB - 102.4) / 1024) * 1000));
    run.signal('SIGINT');
    const exit = await run.exit;
    expect(exit.code, exit.stderr).toBe(130);
    const src = readFileSync(join(dir, 'src.raw'));
    const out = readFileSync(join(dir, 'slow.raw'));
    expect(out.length).toBe(src.length);
    // One of the two 2 MiB requests was written (raw targets take them in the order their reads
    // finish); the other never was and reads as zeros.
    const zeros = Buffer.alloc(2 * MiB);
    const request = (k: number): Buffer => out.subarray(k * 2 * MiB, (k + 1) * 2 * MiB);
    const copied = [0, 1].filter((k) => request(k).equals(src.subarray(k * 2 * MiB, (k + 1) * 2 * MiB)));
    expect(copied).toHaveLength(1);
    expect(request(1 - copied[0]!).equals(zeros)).toBe(true);
  }, 30_000);

  it.each([['raw'], ['qcow2']] as const)('-O %s -r 8M: the same target as qemu-img\'s', async (fmt) => {
    // 8 MiB/s lets 0.8 MiB in at once: the second 2 MiB request waits 0.15 s in both programs.
    const [q, r] = await Promise.all([
      qemuImg(['convert', '-r', '8M', '-O', fmt, 'src.raw', `q.${fmt}`], dir),
      qimg(['convert', '-r', '8M', '-O', fmt, 'src.raw', `o.${fmt}`], dir),
    ]);
    expect([q.code, r.code], `${q.stderr}${r.stderr}`).toEqual([0, 0]);
    expect(r.stdout + r.stderr).toBe(q.stdout + q.stderr);
    const cmp = await qemuImg(['compare', '-f', fmt, '-F', fmt, `o.${fmt}`, `q.${fmt}`], dir);
    expect(cmp.stdout).toBe('Images are identical.\n');
  });

  it.each([['1x'], ['-1'], ['99999999999999999999'], ['1.5']])('-r %s is refused as qemu-img refuses it', async (v) => {
    const [q, r] = await Promise.all([
      qemuImg(['convert', '-r', v, '-O', 'raw', 'src.raw', 'eq.raw'], dir),
      qimg(['convert', '-r', v, '-O', 'raw', 'src.raw', 'eo.raw'], dir),
    ]);
    expect({ code: r.code, stdout: r.stdout, stderr: r.stderr }).toEqual({ code: q.code, stdout: q.stdout, stderr: asQimg(q.stderr) });
    expect(q.code).toBe(1);
  });

  it('-r 0 means no limit: the copy completes, as qemu-img\'s', async () => {
    // A limit of 0 bytes/s would never let the second request through (or refuse to start).
    const [q, r] = await Promise.all([
      qemuImg(['convert', '-r', '0', '-O', 'raw', 'src.raw', 'zq.raw'], dir),
      qimg(['convert', '-r', '0', '-O', 'raw', 'src.raw', 'z.raw'], dir),
    ]);
    expect([q.code, r.code], `${q.stderr}${r.stderr}`).toEqual([0, 0]);
    expect(r.stdout + r.stderr).toBe('');
    const cmp = await qemuImg(['compare', '-f', 'raw', '-F', 'raw', 'z.raw', 'src.raw'], dir);
    expect(cmp.stdout).toBe('Images are identical.\n');
  });
});
