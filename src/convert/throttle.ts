// qemu-img convert -r: the target's write throughput limited to a number of bytes per second, as
// QEMU's throttling does it (util/throttle.c, one leaky bucket for bytes written): the bucket leaks
// `rate` bytes per second; a request may start once the bucket holds at most a tenth of a second's
// worth, and then adds its length. Requests are admitted in the order they arrive (QEMU queues
// throttled requests), so the writes a caller issues in order still reach the target in order.

const now = (): number => performance.now() / 1000;

export class WriteThrottle {
  private level = 0;
  private last = now();
  private queue: Promise<void> = Promise.resolve();

  constructor(private readonly rate: number) {
    if (!(rate > 0)) throw new RangeError(`rate must be positive (got ${rate})`);
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
      const t = now();
      this.level = Math.max(0, this.level - (t - this.last) * this.rate);
      this.last = t;
      const extra = this.level - this.rate / 10;
      if (extra <= 0) break;
      await new Promise((resolve) => setTimeout(resolve, Math.max(1, Math.ceil((extra / this.rate) * 1000))));
    }
    this.level += bytes;
  }
}
