// The header writer (parse -> serialise gives back QEMU's cluster 0 byte for byte; unknown
// extensions and header fields survive), creation on in-memory storages through a memory gate,
// and a property: random option sets lay out exactly as qemu-img's.

import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import { createImage } from '../../src/create.js';
import { memoryGate } from '../../src/io/gate.js';
import { MemoryStorage } from '../../src/io/memory.js';
import type { Storage } from '../../src/io/storage.js';
import { openImage } from '../../src/open.js';
import { parseHeader } from '../../src/qcow2/header.js';
import { QEMU_FEATURE_NAMES, serializeHeader } from '../../src/qcow2/header-write.js';
import { qemuImg, run, tmpDir } from '../helpers/qemu.js';

const dir = tmpDir('qimg-create-hdr-');

describe('serializeHeader writes cluster 0 as qcow2_update_header does', () => {
  const variants: [string, string[]][] = [
    ['defaults', []],
    ['v2 with backing', ['-o', 'compat=0.10', '-b', 'base.qcow2', '-F', 'qcow2']],
    ['backing, data file, zstd, lazy, extended L2', ['-o', 'data_file=d.raw,compression_type=zstd,lazy_refcounts=on,extended_l2=on', '-b', 'base.qcow2', '-F', 'qcow2']],
    ['512-byte clusters (no feature table)', ['-o', 'cluster_size=512', '-b', 'base.qcow2', '-F', 'qcow2']],
    ['data_file_raw', ['-o', 'data_file=d2.raw,data_file_raw=on']],
  ];
  for (const [name, args] of variants) {
    it(name, async () => {
      await qemuImg(['create', '-q', '-f', 'qcow2', join(dir, 'base.qcow2'), '1M'], { cwd: dir });
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
  it('qcow2 with a data file and a backing file in memory, then read back', async () => {
    const storages = new Map<string, Storage>();
    const gate = memoryGate(storages);
    const baseBytes = readFileSync(join(dir, 'base.qcow2'));
    storages.set('/vm/base.qcow2', new MemoryStorage(new Uint8Array(baseBytes), { name: '/vm/base.qcow2' }));
    const target = new MemoryStorage(undefined, { name: '/vm/top.qcow2' });
    const result = await createImage(target, { format: 'qcow2', backingFile: 'base.qcow2', backingFormat: 'qcow2', gate });
    expect(result.virtualSize).toBe(1 << 20);
    expect(result.header?.backingFile).toBe('base.qcow2');
    const { image } = await openImage(target, { gate });
    expect(image.virtualSize).toBe(1 << 20);
    expect(await image.read(0, 4096)).toEqual(new Uint8Array(4096));
    await image.close();

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
    await fc.assert(
      fc.asyncProperty(
        fc.record({
          clusterBits: fc.integer({ min: 9, max: 21 }),
          refcountOrder: fc.integer({ min: 0, max: 6 }),
          sectors: fc.integer({ min: 0, max: 1 << 16 }),
          sizeShift: fc.integer({ min: 0, max: 14 }),
          preallocation: fc.constantFrom('off', 'metadata', 'falloc', 'full', undefined),
          extendedL2: fc.boolean(),
          lazy: fc.boolean(),
        }),
        async (o) => {
          const clusterSize = 2 ** o.clusterBits;
          const extendedL2 = o.extendedL2 && clusterSize >= 16384;
          // Keep preallocated images small; metadata-only ones can be larger.
          const wanted = o.sectors * 512 * (o.preallocation === 'falloc' || o.preallocation === 'full' ? 1 : 2 ** o.sizeShift);
          const size = o.preallocation === 'metadata' ? Math.min(wanted, clusterSize * 256) : o.preallocation === 'falloc' || o.preallocation === 'full' ? Math.min(wanted, 8 << 20) : wanted;
          const opts = [`cluster_size=${clusterSize}`, `refcount_bits=${2 ** o.refcountOrder}`, `extended_l2=${extendedL2 ? 'on' : 'off'}`, `lazy_refcounts=${o.lazy ? 'on' : 'off'}`];
          if (o.preallocation) opts.push(`preallocation=${o.preallocation}`);
          const ours = join(dir, 'prop.ours');
          const theirs = join(dir, 'prop.qemu');
          await createImage(ours, {
            format: 'qcow2', size, clusterSize, refcountBits: 2 ** o.refcountOrder, extendedL2, lazyRefcounts: o.lazy,
            ...(o.preallocation ? { preallocation: o.preallocation as 'off' } : {}),
          });
          await qemuImg(['create', '-q', '-f', 'qcow2', '-o', opts.join(','), theirs, String(size)]);
          const cmp = await run('cmp', [ours, theirs]);
          expect(cmp.code, `${JSON.stringify(o)}: ${cmp.stdout}${cmp.stderr}`).toBe(0);
          const check = await run('qemu-img', ['check', ours]);
          expect(check.stdout).toContain('No errors were found on the image.');
        },
      ),
      { numRuns: 20, seed: 20240601 },
    );
  }, 240_000);
});
