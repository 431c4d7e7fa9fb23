// Small helpers for concurrent operations (internal: not part of the public API).

/**
 * Waits until every operation has settled (none left running: buffers they use are free again),
 * then throws the first failure.
 */
export async function settleAll(ops: readonly Promise<unknown>[]): Promise<void> {
  const rs = await Promise.allSettled(ops);
  for (const r of rs) if (r.status === 'rejected') throw r.reason;
}

/** Runs at most `max` operations at once; the others wait, in order, for a place. */
export class Limiter {
  private running = 0;
  private readonly waiting: (() => void)[] = [];

  constructor(private readonly max: number) {}

  async run<T>(op: () => Promise<T>): Promise<T> {
    if (this.running < this.max) this.running++;
    else await new Promise<void>((resolve) => this.waiting.push(resolve));
    try {
      return await op();
    } finally {
      // The place goes straight to the next waiter, if any.
      const next = this.waiting.shift();
      if (next) next();
      else this.running--;
    }
  }
}
