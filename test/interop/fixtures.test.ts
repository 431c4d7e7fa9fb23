// The committed fixture images (fixtures/make-fixtures.sh): qimg's whole-disk read must hash to
// what `qemu-img convert -O raw` hashed to when the fixtures were made. Needs no QEMU.

import { readFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { describe, expect, it } from 'vitest';
import { sha256, withImage } from '../helpers/qemu.js';

const fixtures = join(dirname(fileURLToPath(import.meta.url)), '..', '..', 'fixtures');
const sums = readFileSync(join(fixtures, 'raw.sha256'), 'utf8')
  .trim()
  .split('\n')
  .map((l) => {
    const [hash, name] = l.split(/\s+/) as [string, string];
    const [file, snapshot] = name.split('@') as [string, string | undefined];
    return { hash, file, snapshot };
  });

describe('committed fixtures read to the bytes qemu-img converted them to', () => {
  for (const { hash, file, snapshot } of sums) {
    it(`${file}${snapshot ? ` snapshot ${snapshot}` : ''}`, async () => {
      const format = file.endsWith('.raw') ? 'raw' : 'qcow2';
      await withImage(join(fixtures, file), { format, ...(snapshot ? { snapshot: { name: snapshot } } : {}) }, async (image) => {
        expect(sha256(await image.read(0, image.virtualSize))).toBe(hash);
      });
    });
  }
});
