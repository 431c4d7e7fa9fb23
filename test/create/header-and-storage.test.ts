// The header writer (parse -> serialise gives back QEMU's cluster 0 byte for byte; unknown
// extensions and header fields survive), creation on in-memory storages through a memory gate,
// and a property: random option sets lay out exactly as qemu-img's.

import { readFileSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import fc from 'fast-check';
import { beforeAll, describe, expect, it } from 'vitest';
import { createImage } from '../../src/create.js';
import { memoryGate } from '../../src/io/gate.js';
import { MemoryStorage } from '../../src/io/memory.js';
import type { Storage } from '../../src/io/storage.js';
import { openImage } from '../../src/open.js';
import { parseHeader } from '../../src/qcow2/header.js';
import { QEMU_FEATURE_NAMES, serializeHeader } from '../../src/qcow2/header-write.js';
import { checkProperty } from '../helpers/property.js';
import { qemuImg, qemuImgResult, qemuIo, run, tmpDir } from '../helpers/qemu.js';

const dir = tmpDir('qimg-create-hdr-');

describe('serializeHeader writes cluster 0 as qcow2_update_header does', () => {
  beforeAll(async () => {
    await qemuImg(['create', '-q', '-f', 'qcow2', join(dir, 'base.qcow2'), '1M'], { cwd: dir });
  });
  const variants: [string, string[]][] = [
    ['defaults', []],
    ['v2 with backing', ['-o', 'compat=0.10', '-b', 'base.qcow2', '-F', 'qcow2']],
    ['backing, data file, zstd, lazy, extended L2', ['-o', 'data_file=d.raw,compression_type=zstd,lazy_refcounts=on,extended_l2=on', '-b', 'base.qcow2', '-F', 'qcow2']],
    ['512-byte clusters (no feature table)', ['-o', 'cluster_size=512', '-b', 'base.qcow2', '-F', 'qcow2']],
    ['data_file_raw', ['-o', 'data_file=d2.raw,data_file_raw=on']],
  ];
  for (const [name, args] of variants) {
    it(name, async () => {
      const file = join(dir, `h-${name.replace(/\W+/g, '-')}.qcow2`);
      await qemuImg(['create', '-q', '-f', 'qcow2', ...args, file, '1M'], { cwd: dir });
      const bytes = readFileSync(file);
      const clusterSize = 2 ** bytes.readUInt32BE(20);
      const head = new Uint8Array(bytes.subarray(0, clusterSize));
      const header = parseHeader(head);
      expect(Buffer.from(serializeHeader(header))).toEqual(Buffer.from(head));
      if (header.version === 3 && clusterSize > 4096) expect(header.featureNames).toEqual(QEMU_FEATURE_NAMES);
    });
  }

  it('keeps unknown extensions and unknown header fields', () => {
    const header = parseHeader(serializeHeader({
      version: 3, clusterBits: 16, size: 1 << 20, cryptMethod: 0, l1Size: 1, l1TableOffset: 0x30000,
      refcountTableOffset: 0x10000, refcountTableClusters: 1, nbSnapshots: 0, snapshotsOffset: 0,
      incompatibleFeatures: 0n, compatibleFeatures: 0n, autoclearFeatures: 0n, refcountOrder: 4, compressionType: 0,
      unknownHeaderFields: new Uint8Array([1, 2, 3, 4, 5, 6, 7, 8]),
      extensions: [{ type: 0x12345678, data: new Uint8Array([9, 8, 7]) }],
      backingFile: 'backing.img', backingFormat: 'raw',
    }));
    expect(header.headerLength).toBe(120);
    expect([...header.unknownHeaderFields]).toEqual([1, 2, 3, 4, 5, 6, 7, 8]);
    expect(header.extensions.map((e) => e.type)).toEqual([0xe2792aca, 0x6803f857, 0x12345678]);
    expect([...header.extensions[2]!.data]).toEqual([9, 8, 7]);
    expect(header.backingFile).toBe('backing.img');
    expect(header.backingFormat).toBe('raw');
    // Rewriting is stable.
    const again = serializeHeader(header);
    expect(Buffer.from(serializeHeader(parseHeader(again)))).toEqual(Buffer.from(again));
  });
});

describe('creating on storages other than files', () => {
  it('qcow2 over a backing file in memory: the base\'s data shows through, for qimg and for qemu-img', async () => {
    // Its own base, made by QEMU, with data the overlay must show (zeros alone would read the
    // same with the backing file never opened).
    const base = join(dir, 'mem-base.qcow2');
    await qemuImg(['create', '-q', '-f', 'qcow2', base, '1M']);
    await qemuIo(base, ['write -P 0x5a 64k 4k', 'write -P 0xa5 1020k 4k']);
    const storages = new Map<string, Storage>();
    const gate = memoryGate(storages);
    storages.set('/vm/mem-base.qcow2', new MemoryStorage(new Uint8Array(readFileSync(base)), { name: '/vm/mem-base.qcow2' }));
    const target = new MemoryStorage(undefined, { name: '/vm/mem-top.qcow2' });
    const result = await createImage(target, { format: 'qcow2', backingFile: 'mem-base.qcow2', backingFormat: 'qcow2', gate });
    // The size comes from the backing file, opened through the gate.
    expect(result.virtualSize).toBe(1 << 20);
    expect(result.header?.backingFile).toBe('mem-base.qcow2');
    const expected = new Uint8Array(1 << 20);
    expected.fill(0x5a, 64 * 1024, 68 * 1024);
    expected.fill(0xa5, 1020 * 1024, 1024 * 1024);
    const { image } = await openImage(target, { gate });
    try {
      expect(image.backing?.storage.name).toBe('/vm/mem-base.qcow2');
      expect(Buffer.from(await image.read(0, 1 << 20)).equals(Buffer.from(expected))).toBe(true);
    } finally {
      await image.close();
    }
    // QEMU reads the header qimg wrote in memory as an empty overlay of the same base.
    const top = join(dir, 'mem-top.qcow2');
    writeFileSync(top, target.toUint8Array());
    const [cmp, check] = await Promise.all([
      run('qemu-img', ['compare', '-f', 'qcow2', '-F', 'qcow2', top, base]),
      run('qemu-img', ['check', top]),
    ]);
    expect(`${cmp.code} ${cmp.stdout}${cmp.stderr}`).toBe('0 Images are identical.\n');
    expect(check.stdout).toContain('No errors were found on the image.');
  });

  it('qcow2 with a raw data file created through the gate', async () => {
    const storages = new Map<string, Storage>();
    const gate = memoryGate(storages);
    const withData = new MemoryStorage(undefined, { name: '/vm/d.qcow2' });
    const r2 = await createImage(withData, { format: 'qcow2', size: 1 << 20, dataFile: '/vm/d.raw', dataFileRaw: true, gate });
    expect(r2.dataFileLength).toBe(1 << 20);
    expect(await storages.get('/vm/d.raw')!.size()).toBe(1 << 20);
  });

  it('raw in memory', async () => {
    const target = new MemoryStorage(undefined, { name: 'r.raw' });
    const r = await createImage(target, { format: 'raw', size: 1000, preallocation: 'full' });
    expect(r.virtualSize).toBe(1024);
    expect(await target.size()).toBe(1024);
  });
});

describe('property: random option sets lay out as qemu-img lays them out', () => {
  it('cmp-identical files and a clean check', async () => {
    const arb = fc.record({
      clusterBits: fc.integer({ min: 9, max: 21 }),
      refcountOrder: fc.integer({ min: 0, max: 6 }),
      sectors: fc.integer({ min: 0, max: 1 << 16 }),
      sizeShift: fc.integer({ min: 0, max: 14 }),
      preallocation: fc.constantFrom('off', 'metadata', 'falloc', 'full', undefined),
      extendedL2: fc.boolean(),
      lazy: fc.boolean(),
    });
    let n = 0;
    await checkProperty({ name: 'create layout', runs: 20 }, arb, async (o) => {
      const clusterSize = 2 ** o.clusterBits;
      const extendedL2 = o.extendedL2 && clusterSize >= 16384;
      // Preallocated images are written out and compared byte for byte (cmp reads them whole):
      // up to 4 MiB of data, and metadata preallocation up to 256 clusters (several L2 tables
      // with small clusters) but 16 MiB at most. Unpreallocated ones can be huge: only their
      // metadata is written.
      const full = o.preallocation === 'falloc' || o.preallocation === 'full';
      const wanted = o.sectors * 512 * (full ? 1 : 2 ** o.sizeShift);
      const size = o.preallocation === 'metadata' ? Math.min(wanted, clusterSize * 256, 16 << 20) : full ? Math.min(wanted, 4 << 20) : wanted;
      const opts = [`cluster_size=${clusterSize}`, `refcount_bits=${2 ** o.refcountOrder}`, `extended_l2=${extendedL2 ? 'on' : 'off'}`, `lazy_refcounts=${o.lazy ? 'on' : 'off'}`];
      if (o.preallocation) opts.push(`preallocation=${o.preallocation}`);
      const ours = join(dir, `prop-${n}.ours`);
      const theirs = join(dir, `prop-${n}.qemu`);
      n++;
      const [mine, q] = await Promise.all([
        createImage(ours, {
          format: 'qcow2', size, clusterSize, refcountBits: 2 ** o.refcountOrder, extendedL2, lazyRefcounts: o.lazy,
          ...(o.preallocation ? { preallocation: o.preallocation as 'off' } : {}),
        }).then(() => null, (e: Error) => e),
        qemuImgResult(['create', '-q', '-f', 'qcow2', '-o', opts.join(','), theirs, String(size)]),
      ]);
      if (q.code !== 0) {
        // Sizes past what the L1 table can map for the cluster size: both refuse, in the same words.
        expect(mine?.message, `${JSON.stringify(o)}: qemu-img refused (${q.stderr.trim()}), qimg created it`).toBeDefined();
        expect(`qemu-img: ${theirs}: ${mine!.message}\n`, JSON.stringify(o)).toBe(q.stderr);
        rmSync(ours, { force: true });
        rmSync(theirs, { force: true });
        return;
      }
      if (mine) throw mine;
      const [cmp, check] = await Promise.all([run('cmp', [ours, theirs]), run('qemu-img', ['check', ours])]);
      expect(cmp.code, `${JSON.stringify(o)}: ${cmp.stdout}${cmp.stderr}`).toBe(0);
      expect(check.stdout, JSON.stringify(o)).toContain('No errors were found on the image.');
      rmSync(ours);
      rmSync(theirs);
    });
  }, 240_000);
});
