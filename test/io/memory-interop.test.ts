// The README's promise that the library runs without a file system (MemoryStorage, memoryGate),
// judged by the real qemu-img: a qcow2 chain made and written entirely in memory is written out to
// real files and QEMU must find it clean and read the bytes the model says; and a chain QEMU made
// is loaded into memory and qimg must read what qemu-img reads.

import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { beforeAll, describe, expect, it } from 'vitest';
import { createImage } from '../../src/create.js';
import { memoryGate } from '../../src/io/gate.js';
import { MemoryStorage } from '../../src/io/memory.js';
import type { Storage } from '../../src/io/storage.js';
import { openImage } from '../../src/open.js';
import {
  KiB, MiB, assertBytesEqual, expectSameBytes, expectSameMap, prng, qemuImg, qemuImgResult, qemuIo, referenceRaw, tmpDir,
} from '../helpers/qemu.js';

const dir = tmpDir('qimg-memio-');
const SIZE = 4 * MiB;

/** The backing file QEMU makes: data in the first, third and last MiB, a zero cluster, a compressed cluster. */
async function makeBase(file: string): Promise<void> {
  await qemuImg(['create', '-q', '-f', 'qcow2', file, String(SIZE)], { cwd: dir });
  await qemuIo(file, ['write -P 0x11 0 1M', 'write -P 0x22 2M 512k', 'write -z 2304k 64k', 'write -c -P 0x33 3M 64k', 'write -P 0x44 4032k 64k'], { cwd: dir });
}

function randomBytes(n: number, seed: number): Uint8Array {
  const r = prng(seed);
  return Uint8Array.from({ length: n }, () => (r() * 256) | 0);
}

/** Every storage's bytes written out to a real file of the same name under dir. */
function writeOut(storages: Map<string, Storage>): void {
  for (const [name, s] of storages) writeFileSync(join(dir, name), (s as MemoryStorage).toUint8Array());
}

beforeAll(async () => {
  await makeBase('base.qcow2');
});

describe('a qcow2 made and written on MemoryStorage, judged by qemu-img', () => {
  // name: (backing, data file) as the image names them; relative names, resolved as QEMU resolves
  // them from the directory the files are written to (qemu-img runs there: QEMU 7.2 opens a
  // relative data file name from the working directory).
  const cases = [
    { name: 'backing file and external data file', file: 'top.qcow2', backing: true, dataFile: 'top.data', dataFileRaw: false },
    { name: 'external data file with data_file_raw', file: 'rawdf.qcow2', backing: false, dataFile: 'rawdf.data', dataFileRaw: true },
  ];
  it.each(cases.map((c) => [c.name, c] as const))('%s', async (_n, c) => {
    const storages = new Map<string, Storage>();
    storages.set('base.qcow2', new MemoryStorage(new Uint8Array(readFileSync(join(dir, 'base.qcow2'))), { name: 'base.qcow2' }));
    const gate = memoryGate(storages);
    const top = new MemoryStorage(undefined, { name: c.file });
    storages.set(c.file, top);
    await createImage(top, {
      format: 'qcow2',
      ...(c.backing ? { backingFile: 'base.qcow2', backingFormat: 'qcow2' } : { size: SIZE }),
      dataFile: c.dataFile,
      dataFileRaw: c.dataFileRaw,
      gate,
    });
    expect([...storages.keys()].sort(), 'the data file was created through the gate').toEqual(['base.qcow2', c.dataFile, c.file].sort());

    // The model: what QEMU reads from the backing file (zeros without one), then our writes.
    const model = c.backing ? new Uint8Array(await referenceRaw(join(dir, 'base.qcow2'))) : new Uint8Array(SIZE);
    const { image } = await openImage(top, { readOnly: false, gate });
    const writes: [number, Uint8Array][] = [
      [4 * KiB, randomBytes(8 * KiB, 1)], // inside the backing's first MiB: copy-on-write of the cluster's rest
      [1 * MiB - 100, randomBytes(300, 2)], // across a cluster boundary, half over backing data, half over nothing
      [2 * MiB + 64 * KiB, randomBytes(128 * KiB, 3)], // two whole clusters over backing data
      [3 * MiB + 10, randomBytes(5000, 4)], // over the backing's compressed cluster
    ];
    for (const [off, data] of writes) {
      await image.write(off, data);
      model.set(data, off);
    }
    // Zeroes over backing data: must read as zeros, not as the backing's bytes.
    await image.writeZeroes(2 * MiB + 256 * KiB, 128 * KiB);
    model.fill(0, 2 * MiB + 256 * KiB, 2 * MiB + 384 * KiB);
    await image.close();

    writeOut(storages);
    const check = await qemuImgResult(['check', '--output=json', c.file], { cwd: dir });
    const report = JSON.parse(check.stdout) as Record<string, unknown>;
    expect({ code: check.code, leaks: report.leaks ?? 0, corruptions: report.corruptions ?? 0, errors: report['check-errors'] ?? 0 }, check.stdout)
      .toEqual({ code: 0, leaks: 0, corruptions: 0, errors: 0 });

    const info = JSON.parse((await qemuImg(['info', '--output=json', c.file], { cwd: dir })).stdout) as Record<string, unknown>;
    const specific = (info['format-specific'] as { data: Record<string, unknown> }).data;
    expect({
      backing: info['backing-filename'],
      backingFormat: info['backing-filename-format'],
      dataFile: specific['data-file'],
      dataFileRaw: specific['data-file-raw'],
      size: info['virtual-size'],
    }).toEqual({
      backing: c.backing ? 'base.qcow2' : undefined,
      backingFormat: c.backing ? 'qcow2' : undefined,
      dataFile: c.dataFile,
      dataFileRaw: c.dataFileRaw,
      size: SIZE,
    });

    // QEMU's bytes of the whole chain equal the model; qemu-img compare agrees.
    assertBytesEqual(`${c.file} as qemu-img reads it`, 0, await referenceRaw(join(dir, c.file), { cwd: dir }), model);
    writeFileSync(join(dir, `${c.file}.model`), model);
    const cmp = await qemuImgResult(['compare', '-f', 'qcow2', '-F', 'raw', c.file, `${c.file}.model`], { cwd: dir });
    expect(cmp.stdout + cmp.stderr).toBe('Images are identical.\n');

    if (c.backing) {
      // Only the clusters written are the top's own: the rest still comes from the backing file
      // (depth 1 in QEMU's map), so the writes did not copy the backing file wholesale.
      const map = JSON.parse((await qemuImg(['map', '--output=json', c.file], { cwd: dir })).stdout) as { start: number; length: number; depth: number }[];
      const depthAt = (off: number): number | undefined => map.find((e) => e.start <= off && off < e.start + e.length)?.depth;
      expect([0, 64 * KiB, 1 * MiB, 2 * MiB, 2 * MiB + 64 * KiB, 2 * MiB + 256 * KiB, 3 * MiB, 4032 * KiB].map(depthAt)).toEqual([0, 1, 0, 1, 0, 0, 0, 1]);
    }
  });
});

describe('a chain qemu-img made, loaded into MemoryStorage, read by qimg', () => {
  // The memory storages carry the real files' absolute names, so that QEMU's tools can look at the
  // same chain while qimg reads it from memory alone (memoryGate serves the backing and data file).
  it('reads the bytes and block status qemu-img reads', async () => {
    const top = join(dir, 'qtop.qcow2');
    const data = join(dir, 'qtop.data');
    await qemuImg(['create', '-q', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', '-o', `data_file=${data}`, top], { cwd: dir });
    await qemuIo(top, ['write -P 0x55 60k 8k', 'write -z 2M 64k', 'write -P 0x66 3M 1M'], { cwd: dir });
    const storages = new Map<string, Storage>();
    for (const f of ['base.qcow2', 'qtop.data']) {
      const path = join(dir, f);
      storages.set(path, new MemoryStorage(new Uint8Array(readFileSync(path)), { name: path, readOnly: true }));
    }
    const { image } = await openImage(new MemoryStorage(new Uint8Array(readFileSync(top)), { name: top, readOnly: true }), { gate: memoryGate(storages) });
    try {
      expect(image.backing?.storage.name).toBe(join(dir, 'base.qcow2'));
      await expectSameBytes(image, top, { randomReads: 16 });
      await expectSameMap(image, top, 'qcow2');
    } finally {
      await image.close();
    }
  });
});
