// qimg convert -r (rate limit) against qemu-img 7.2: the same parsing and errors for the value, and
// a measurable slow-down of the same size as qemu-img's (both throttle written bytes with a leaky
// bucket: 4 MiB in 2 MiB requests at 2 MiB/s wait about 0.9 s), with the same result.

import { randomBytes } from 'node:crypto';
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { beforeAll, describe, expect, it } from 'vitest';
import { asQimg, qemuImg, qimg } from '../cli/harness.js';
import { tmpDir } from '../helpers/qemu.js';

const dir = tmpDir('qimg-rate-');

beforeAll(() => {
  writeFileSync(join(dir, 'src.raw'), randomBytes(4 << 20));
});

async function timed<T>(f: () => Promise<T>): Promise<[T, number]> {
  const t0 = performance.now();
  const r = await f();
  return [r, (performance.now() - t0) / 1000];
}

describe('qimg convert -r', () => {
  it.each([
    ['raw', '2M', 0.85],
    ['qcow2', '4M', 0.35],
  ] as const)('-O %s -r %s slows the copy as qemu-img does', async (fmt, rate, minSeconds) => {
    const [q, qt] = await timed(() => qemuImg(['convert', '-r', rate, '-O', fmt, 'src.raw', `q.${fmt}`], dir));
    const [r, rt] = await timed(() => qimg(['convert', '-r', rate, '-O', fmt, 'src.raw', `o.${fmt}`], dir));
    const [u, ut] = await timed(() => qimg(['convert', '-O', fmt, 'src.raw', `u.${fmt}`], dir));
    expect([q.code, r.code, u.code], r.stderr).toEqual([0, 0, 0]);
    expect(qt).toBeGreaterThan(minSeconds);
    expect(rt).toBeGreaterThan(minSeconds);
    // Same order of magnitude as qemu-img's throttled run, and slower than an unthrottled one.
    expect(rt).toBeLessThan(qt + 1);
    expect(rt).toBeGreaterThan(ut);
    const cmp = await qemuImg(['compare', '-f', fmt, '-F', fmt, `o.${fmt}`, `q.${fmt}`], dir);
    expect(cmp.stdout).toBe('Images are identical.\n');
  });

  it.each([['1x'], ['-1'], ['99999999999999999999'], ['1.5']])('-r %s is refused as qemu-img refuses it', async (v) => {
    const q = await qemuImg(['convert', '-r', v, '-O', 'raw', 'src.raw', 'e.raw'], dir);
    const r = await qimg(['convert', '-r', v, '-O', 'raw', 'src.raw', 'e.raw'], dir);
    expect({ code: r.code, stdout: r.stdout, stderr: r.stderr }).toEqual({ code: q.code, stdout: q.stdout, stderr: asQimg(q.stderr) });
    expect(q.code).toBe(1);
  });

  it('-r 0 means no limit', async () => {
    const [r, rt] = await timed(() => qimg(['convert', '-r', '0', '-O', 'raw', 'src.raw', 'z.raw'], dir));
    expect(r.code).toBe(0);
    expect(rt).toBeLessThan(0.85);
  });
});
