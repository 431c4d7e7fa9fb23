// qemu-img convert -r: the target's write throughput limited to a number of bytes per second, as
// QEMU's throttling does it (util/throttle.c, one leaky bucket for bytes written): the bucket leaks
// `rate` bytes per second; a request may start once the bucket holds at most a tenth of a second's
// worth, and then adds its length. Requests are admitted in the order they arrive (QEMU queues
// throttled requests), so the writes a caller issues in order still reach the target in order.

/** The time a WriteThrottle runs on: the real clock, or a virtual one in tests. */
export interface ThrottleClock {
  /** Seconds on a monotonic clock. */
  now(): number;
  /**
   * Resolves after `ms` milliseconds; rejects (with the abort error) as soon as `signal` aborts.
   * `ms` is at most MAX_SLEEP_MS.
   */
  sleep(ms: number, signal?: AbortSignal): Promise<void>;
}

/** The longest timer Node keeps (a longer one fires after 1 ms, with a warning): longer waits loop. */
export const MAX_SLEEP_MS = 2 ** 31 - 1;

/** What a write refused by an aborted throttle rejects with (the name convert's callers look for). */
export class ThrottleAbortedError extends Error {
  constructor() {
    super('write not started: the copy was interrupted while it waited for the rate limit');
    this.name = 'AbortError';
  }
}

const realClock: ThrottleClock = {
  now: () => performance.now() / 1000,
  sleep: (ms, signal) =>
    new Promise((resolve, reject) => {
      if (signal?.aborted) {
        reject(new ThrottleAbortedError());
        return;
      }
      const onAbort = (): void => {
        clearTimeout(timer);
        reject(new ThrottleAbortedError());
      };
      const timer = setTimeout(() => {
        signal?.removeEventListener('abort', onAbort);
        resolve();
      }, ms);
      signal?.addEventListener('abort', onAbort, { once: true });
    }),
};

export interface WriteThrottleOptions {
  clock?: ThrottleClock;
  /**
   * Once aborted, no write is admitted any more: those waiting (and any asked for later) reject
   * with ThrottleAbortedError. A write waiting for the limit has not started, so an interrupted
   * copy does not wait out the limit (with `-r 1k` that could be hours).
   */
  signal?: AbortSignal;
}

export class WriteThrottle {
  private readonly clock: ThrottleClock;
  private readonly signal: AbortSignal | undefined;
  private level = 0;
  private last: number;
  private queue: Promise<void> = Promise.resolve();

  constructor(private readonly rate: number, options: WriteThrottleOptions = {}) {
    if (!(rate > 0)) throw new RangeError(`rate must be positive (got ${rate})`);
    this.clock = options.clock ?? realClock;
    this.signal = options.signal;
    this.last = this.clock.now();
  }

  /** Resolves when a write of `bytes` may start (in call order), and counts it. */
  admit(bytes: number): Promise<void> {
    const turn = this.queue.then(() => this.wait(bytes));
    this.queue = turn;
    return turn;
  }

  /** Runs `op` once `bytes` are admitted. */
  run<T>(bytes: number, op: () => Promise<T>): Promise<T> {
    return this.admit(bytes).then(op);
  }

  private async wait(bytes: number): Promise<void> {
    for (;;) {
      if (this.signal?.aborted) throw new ThrottleAbortedError();
      const t = this.clock.now();
      this.level = Math.max(0, this.level - (t - this.last) * this.rate);
      this.last = t;
      const extra = this.level - this.rate / 10;
      if (extra <= 0) break;
      const ms = Math.min(MAX_SLEEP_MS, Math.max(1, Math.ceil((extra / this.rate) * 1000)));
      await this.clock.sleep(ms, this.signal);
    }
    this.level += bytes;
  }
}
