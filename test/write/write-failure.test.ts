// A data write that fails after the writer linked its clusters (data writes run outside the
// writer's lock): the writer refuses everything after it and never writes metadata naming the
// failed data, so what qemu-img sees is the image as of the last successful write-out, with at
// worst leaked clusters. The failure is injected at qimg's own Storage interface (a FileStorage
// whose large writes fail once armed, as a full or failing disk would make them); the judge is
// qemu-img check and qemu-io on the real file.

import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { openImage } from '../../src/open.js';
import { FileStorage } from '../../src/io/file.js';
import type { Storage } from '../../src/io/storage.js';
import { IoError } from '../../src/errors.js';
import { KiB, MiB, qemuImg, qemuIo, run, tmpDir } from '../helpers/qemu.js';

const dir = tmpDir('qimg-write-fail-');

/** file's storage, whose writes of at least `minBytes` fail with EIO while `armed`. */
function failingLargeWrites(file: FileStorage, minBytes: number): { storage: Storage; arm(): void } {
  let armed = false;
  const fail = (): Promise<void> =>
    Promise.reject(new IoError(`Could not write to ${file.name}: Input/output error`, { code: 'EIO' }));
  const storage: Storage = {
    name: file.name,
    readOnly: file.readOnly,
    read: (buf, offset) => file.read(buf, offset),
    write: (buf, offset) => (armed && buf.length >= minBytes ? fail() : file.write(buf, offset)),
    writev: (bufs, offset) => (armed && bufs.reduce((n, b) => n + b.length, 0) >= minBytes ? fail() : file.writev(bufs, offset)),
    size: () => file.size(),
    truncate: (size) => file.truncate(size),
    flush: () => file.flush(),
    close: () => file.close(),
  };
  return { storage, arm: () => (armed = true) };
}

async function checkOutput(file: string): Promise<{ code: number; out: string }> {
  const r = await run('qemu-img', ['check', file]);
  return { code: r.code, out: r.stdout + r.stderr };
}

describe('a failed data write leaves the image as of the last write-out', () => {
  for (const concurrent of [false, true]) {
    it(`${concurrent ? 'writes issued together' : 'one write'}: later operations refused, qemu-img check without errors, flushed data intact`, async () => {
      const file = join(dir, `f${concurrent ? 'c' : 's'}.qcow2`);
      await qemuImg(['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=64k', file, '32M']);
      const fs = await FileStorage.open(file, { readOnly: false });
      const { storage, arm } = failingLargeWrites(fs, 256 * KiB);
      const { image } = await openImage(storage, { readOnly: false, format: 'qcow2' });
      await image.write(4 * MiB, new Uint8Array(MiB).fill(0xa5));
      await image.flush();

      arm();
      if (concurrent) {
        const results = await Promise.allSettled([
          image.write(8 * MiB, new Uint8Array(64 * KiB).fill(0x11)), // small: succeeds
          image.write(12 * MiB, new Uint8Array(MiB).fill(0x22)), // fails
          image.write(16 * MiB, new Uint8Array(64 * KiB).fill(0x33)), // queued behind the failure
        ]);
        expect(results[1]!.status).toBe('rejected');
      } else {
        await expect(image.write(12 * MiB, new Uint8Array(MiB).fill(0x22))).rejects.toThrow(/Input\/output error/);
      }
      // Poisoned: nothing more is accepted, and close reports the failure instead of writing metadata.
      await expect(image.write(20 * MiB, new Uint8Array(4 * KiB).fill(0x44))).rejects.toThrow(/Input\/output error/);
      await expect(image.close()).rejects.toThrow(/Input\/output error/);
      await fs.close();

      const chk = await checkOutput(file);
      expect(chk.out).not.toMatch(/^ERROR|corrupt|^\d+ errors were found/m);
      expect(chk.out).toMatch(/No errors were found on the image/);
      expect([0, 3]).toContain(chk.code); // clean, or leaked clusters only
      await qemuIo(file, [`read -P 0xa5 ${4 * MiB} ${MiB}`, `read -P 0 ${12 * MiB} ${MiB}`, `read -P 0 ${20 * MiB} ${4 * KiB}`]);
    });
  }
});
