// qemu-img's progress line ("    (12.34/100%)\r" on stdout), with QEMU's float arithmetic and its
// rule of printing only after at least min_skip percent of change (and always at 0 and 100).

import { formatFixed } from './cformat.js';
import type { CliOutput } from './common.js';

export class Progress {
  private current = 0;
  private lastPrint = 0;
  private readonly minSkip: number;

  constructor(private readonly out: CliOutput | null, minSkip = 1.0) {
    this.minSkip = Math.fround(minSkip);
  }

  /** qemu_progress_print(delta, max): with max 0, delta is the absolute percentage. */
  print(delta: number, max: number): void {
    const d = Math.fround(delta);
    let current = max === 0 ? d : Math.fround(this.current + Math.fround(Math.fround(d / 100) * max));
    if (current > 100) current = 100;
    this.current = current;
    if (
      current > Math.fround(this.lastPrint + this.minSkip) ||
      current < Math.fround(this.lastPrint - this.minSkip) ||
      current === 100 ||
      current === 0
    ) {
      this.lastPrint = this.current;
      if (this.out) {
        this.out.write(`    (${formatFixed(this.current, 2).padStart(3)}/100%)\r`);
        this.out.flush?.();
      }
    }
  }

  end(): void {
    if (this.out) {
      this.out.write('\n');
      this.out.flush?.();
    }
  }
}

/**
 * qimg's --progress=json: one JSON object per line on stderr,
 * {"type":"progress","done":<bytes>,"total":<bytes>,"percent":<0..100>} (the first request, then
 * at most every 100 ms, and always a last one at 100%; bytes are data bytes handed to copy requests, as
 * qemu-img counts its progress), and {"type":"done"} after a successful convert.
 */
export class JsonProgress {
  private last = -Infinity;
  private lastDone = -1;
  private lastTotal = 0;

  constructor(private readonly out: CliOutput, private readonly intervalMs = 100) {}

  progress(done: number, total: number): void {
    this.lastTotal = total;
    const now = performance.now();
    const finished = done >= total;
    if (!finished && now - this.last < this.intervalMs) return;
    if (finished && done === this.lastDone && total !== 0) return;
    this.last = now;
    this.lastDone = done;
    const percent = total > 0 ? Math.round((10000 * done) / total) / 100 : 100;
    this.write({ type: 'progress', done, total, percent });
  }

  /** The last progress line (100%) if not printed yet, then {"type":"done"}. */
  finish(): void {
    if (this.lastDone !== this.lastTotal) this.progress(this.lastTotal, this.lastTotal);
    this.write({ type: 'done' });
  }

  private write(event: object): void {
    this.out.write(`${JSON.stringify(event)}\n`);
    this.out.flush?.();
  }
}
