// Property: random write/discard/write-zeroes/truncate sequences leave every backend equal to a
// plain Uint8Array model, and extents never call a nonzero byte a hole. Through checkProperty
// (test/helpers/property.ts): each backend's seed is printed, QIMG_PROP_SEED=<n> replays it.

import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import fc from 'fast-check';
import { checkProperty } from '../helpers/property.js';
import { discardRange, storageExtents, writeZeroesRange } from '../../src/sparse/extents.js';
import { backends, tempDirFixture } from './backends.js';

const tmp = tempDirFixture();
beforeAll(tmp.setup);
afterAll(tmp.teardown);

const SPACE = 300 * 1024;

type Op =
  | { kind: 'write'; offset: number; length: number; seed: number }
  | { kind: 'discard'; offset: number; length: number }
  | { kind: 'writeZeroes'; offset: number; length: number }
  | { kind: 'truncate'; size: number };

const offset = fc.oneof(fc.integer({ min: 0, max: SPACE }), fc.integer({ min: 0, max: SPACE / 4096 }).map((b) => b * 4096));
const length = fc.oneof(fc.integer({ min: 0, max: 70_000 }), fc.integer({ min: 0, max: 16 }).map((b) => b * 4096));
const op: fc.Arbitrary<Op> = fc.oneof(
  { weight: 4, arbitrary: fc.record({ kind: fc.constant('write' as const), offset, length, seed: fc.integer({ min: 1, max: 250 }) }) },
  { weight: 2, arbitrary: fc.record({ kind: fc.constant('discard' as const), offset, length }) },
  { weight: 1, arbitrary: fc.record({ kind: fc.constant('writeZeroes' as const), offset, length }) },
  { weight: 1, arbitrary: fc.record({ kind: fc.constant('truncate' as const), size: offset }) },
);

class Model {
  bytes = new Uint8Array(0);
  private resize(size: number): void {
    const next = new Uint8Array(size);
    next.set(this.bytes.subarray(0, Math.min(size, this.bytes.length)));
    this.bytes = next;
  }
  apply(o: Op, data?: Uint8Array): void {
    switch (o.kind) {
      case 'write':
        if (o.length > 0 && o.offset + o.length > this.bytes.length) this.resize(o.offset + o.length);
        if (o.length > 0) this.bytes.set(data!, o.offset);
        break;
      case 'discard':
        this.bytes.fill(0, o.offset, Math.min(o.offset + o.length, this.bytes.length));
        break;
      case 'writeZeroes':
        if (o.offset + o.length > this.bytes.length && o.length > 0) this.resize(o.offset + o.length);
        this.bytes.fill(0, o.offset, o.offset + o.length);
        break;
      case 'truncate':
        this.resize(o.size);
        break;
    }
  }
}

function patternFor(length: number, seed: number): Uint8Array {
  const out = new Uint8Array(length);
  for (let i = 0; i < length; i++) out[i] = (i * 13 + seed) % 256;
  return out;
}

for (const backend of backends(tmp.dir)) {
  describe(`Storage model: ${backend.name}`, () => {
    it('equals a Uint8Array model after random operation sequences', async () => {
      const runs = backend.name.startsWith('file') ? 60 : 150;
      await checkProperty({ name: `storage model: ${backend.name}`, runs }, fc.array(op, { maxLength: 25 }), async (ops) => {
        const s = await backend.create();
        const model = new Model();
        try {
          for (const o of ops) {
            let data: Uint8Array | undefined;
            switch (o.kind) {
              case 'write':
                data = patternFor(o.length, o.seed);
                await s.write(data, o.offset);
                break;
              case 'discard':
                await discardRange(s, o.offset, o.length);
                break;
              case 'writeZeroes':
                await writeZeroesRange(s, o.offset, o.length);
                break;
              case 'truncate':
                await s.truncate(o.size);
                break;
            }
            model.apply(o, data);
          }
          const size = await s.size();
          expect(size).toBe(model.bytes.length);
          const actual = new Uint8Array(size + 10);
          expect(await s.read(actual, 0)).toBe(size);
          expect(Buffer.compare(actual.subarray(0, size), model.bytes)).toBe(0);
          const ext = await storageExtents(s, 0, size);
          let pos = 0;
          for (const e of ext) {
            expect(e.offset).toBe(pos);
            if (e.hole) expect(model.bytes.subarray(e.offset, e.offset + e.length).every((b) => b === 0)).toBe(true);
            pos += e.length;
          }
          expect(pos).toBe(size);
        } finally {
          await s.close();
        }
      });
    });
  });
}
