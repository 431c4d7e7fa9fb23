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
