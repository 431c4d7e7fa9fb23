// Creation interop: for each option set, qimg and the real `qemu-img create` make the same image.
// Each case compares the "Formatting ..." line, `qemu-img info --output=json` (everything but the
// directory in names), the host allocation of the files (length, data and unwritten ranges, and
// st_blocks = actual-size up to the file system's own extent bookkeeping: test/helpers/host-alloc.ts),
// the files byte for byte, `qemu-img check` (clean, no leaks), and that qimg's own reader opens the
// result.

import { copyFileSync, mkdirSync, writeFileSync } from 'node:fs';
import { isAbsolute, join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { createImage, type CreateImageOptions } from '../../src/create.js';
import { createFileGate } from '../../src/io/gate.js';
import type { StorageGate } from '../../src/io/storage.js';
import { loadNative } from '../../src/io/native.js';
import { openImage } from '../../src/open.js';
import { compareHostAllocation, expectSameFileBytes, takeActualSize } from '../helpers/host-alloc.js';
import { MiB, TiB, qemuImg, qemuInfo, run, tmpDir } from '../helpers/qemu.js';

const root = tmpDir('qimg-create-');
/** Without fallocate (no koffi, or QIMG_NO_NATIVE=1) qimg writes falloc preallocation as zeros. */
const fallocEmulated = loadNative() === null;
const oursDir = join(root, 'ours');
const qemuDir = join(root, 'qemu');
mkdirSync(oursDir);
mkdirSync(qemuDir);

// Backing images, the same in both directories (so names and headers match byte for byte).
const setup = (async () => {
  await qemuImg(['create', '-q', '-f', 'qcow2', join(qemuDir, 'base.qcow2'), '3M']);
  await run('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x5a 0 1M', join(qemuDir, 'base.qcow2')]);
  copyFileSync(join(qemuDir, 'base.qcow2'), join(oursDir, 'base.qcow2'));
  const raw = Buffer.alloc(2_000_000);
  for (let i = 0; i < raw.length; i++) raw[i] = (i * 2654435761) >>> 24;
  writeFileSync(join(qemuDir, 'base.raw'), raw);
  writeFileSync(join(oursDir, 'base.raw'), raw);
  mkdirSync(join(qemuDir, 'sub'));
  mkdirSync(join(oursDir, 'sub'));
})();

/** Names inside images (data files) resolve in our directory, as qemu-img resolves them in its cwd. */
const fileGate = createFileGate();
const oursGate: StorageGate = {
  open: (name, options) =>
    fileGate.open(isAbsolute(name) || options.relativeTo ? name : join(oursDir, name), options),
  resolveName: fileGate.resolveName,
};

interface Case {
  name: string;
  options: Omit<CreateImageOptions, 'format'> & { format?: 'qcow2' | 'raw' };
  /** qemu-img create arguments between `create` and the file name. */
  args: string[];
  /** The size argument ('' = none). */
  size: string;
}

const K = 1024;
const cases: Case[] = [
  { name: 'defaults', options: { size: MiB }, args: [], size: '1M' },
  { name: 'size 0', options: { size: 0 }, args: [], size: '0' },
  { name: 'size 1000 (rounded up to 1024)', options: { size: 1000 }, args: [], size: '1000' },
  { name: 'size 12345678 (rounded up to 512)', options: { size: 12345678 }, args: [], size: '12345678' },
  { name: 'compat=0.10', options: { size: MiB, compat: '0.10' }, args: ['-o', 'compat=0.10'], size: '1M' },
  { name: 'compat=1.1 given', options: { size: MiB, compat: '1.1' }, args: ['-o', 'compat=1.1'], size: '1M' },
  { name: 'cluster_size=512', options: { size: 64 * MiB, clusterSize: 512 }, args: ['-o', 'cluster_size=512'], size: '64M' },
  { name: 'cluster_size=4k', options: { size: 1024 * MiB, clusterSize: 4 * K }, args: ['-o', 'cluster_size=4k'], size: '1G' },
  { name: 'cluster_size=2M', options: { size: 1024 * MiB, clusterSize: 2 * MiB }, args: ['-o', 'cluster_size=2M'], size: '1G' },
  ...[1, 2, 4, 8, 32, 64].map((b): Case => ({
    name: `refcount_bits=${b}`, options: { size: 1024 * MiB, refcountBits: b }, args: ['-o', `refcount_bits=${b}`], size: '1G',
  })),
  { name: 'lazy_refcounts=on', options: { size: MiB, lazyRefcounts: true }, args: ['-o', 'lazy_refcounts=on'], size: '1M' },
  { name: 'extended_l2=on', options: { size: MiB, extendedL2: true }, args: ['-o', 'extended_l2=on'], size: '1M' },
  { name: 'compression_type=zstd', options: { size: MiB, compressionType: 'zstd' }, args: ['-o', 'compression_type=zstd'], size: '1M' },
  {
    name: 'every v3 feature at once',
    options: { size: MiB, lazyRefcounts: true, extendedL2: true, compressionType: 'zstd', refcountBits: 8, compat: '1.1', clusterSize: 32 * K },
    args: ['-o', 'lazy_refcounts=on,extended_l2=on,compression_type=zstd,refcount_bits=8,compat=1.1,cluster_size=32k'], size: '1M',
  },
  { name: 'preallocation=metadata', options: { size: MiB, preallocation: 'metadata' }, args: ['-o', 'preallocation=metadata'], size: '1M' },
  { name: 'preallocation=metadata, odd size', options: { size: 12345678, preallocation: 'metadata' }, args: ['-o', 'preallocation=metadata'], size: '12345678' },
  { name: 'preallocation=metadata, size 1000', options: { size: 1000, preallocation: 'metadata' }, args: ['-o', 'preallocation=metadata'], size: '1000' },
  { name: 'preallocation=falloc', options: { size: MiB, preallocation: 'falloc' }, args: ['-o', 'preallocation=falloc'], size: '1M' },
  { name: 'preallocation=full', options: { size: MiB, preallocation: 'full' }, args: ['-o', 'preallocation=full'], size: '1M' },
  { name: 'preallocation=full, odd size', options: { size: 3 * MiB + 512, preallocation: 'full' }, args: ['-o', 'preallocation=full'], size: '3146240' },
  {
    name: 'metadata, extended_l2, odd size (COW tail to the subcluster end)',
    options: { size: 12345678, extendedL2: true, preallocation: 'metadata' }, args: ['-o', 'extended_l2=on,preallocation=metadata'], size: '12345678',
  },
  { name: 'full, extended_l2', options: { size: MiB, extendedL2: true, preallocation: 'full' }, args: ['-o', 'extended_l2=on,preallocation=full'], size: '1M' },
  // Refcount-table growth during creation: small clusters with wide refcounts.
  {
    name: 'metadata, 512-byte clusters, 64-bit refcounts (refcount table grows)',
    options: { size: 16 * MiB, clusterSize: 512, refcountBits: 64, preallocation: 'metadata' },
    args: ['-o', 'cluster_size=512,refcount_bits=64,preallocation=metadata'], size: '16M',
  },
  {
    name: 'full, 512-byte clusters, 64-bit refcounts',
    options: { size: 16 * MiB, clusterSize: 512, refcountBits: 64, preallocation: 'full' },
    args: ['-o', 'cluster_size=512,refcount_bits=64,preallocation=full'], size: '16M',
  },
  {
    name: 'falloc, 512-byte clusters, 1-bit refcounts',
    options: { size: 16 * MiB, clusterSize: 512, refcountBits: 1, preallocation: 'falloc' },
    args: ['-o', 'cluster_size=512,refcount_bits=1,preallocation=falloc'], size: '16M',
  },
  {
    name: 'metadata, 4k clusters, 1-bit refcounts',
    options: { size: 256 * MiB, clusterSize: 4 * K, refcountBits: 1, preallocation: 'metadata' },
    args: ['-o', 'cluster_size=4k,refcount_bits=1,preallocation=metadata'], size: '256M',
  },
  {
    name: '4 GiB, 512-byte clusters, 64-bit refcounts (L1 needs new refcount blocks)',
    options: { size: 4096 * MiB, clusterSize: 512, refcountBits: 64 }, args: ['-o', 'cluster_size=512,refcount_bits=64'], size: '4G',
  },
  { name: 'metadata, 2M clusters, 4 GiB', options: { size: 4096 * MiB, clusterSize: 2 * MiB, preallocation: 'metadata' }, args: ['-o', 'cluster_size=2M,preallocation=metadata'], size: '4G' },
  { name: '16 TiB', options: { size: 16 * TiB }, args: [], size: '16T' },
  { name: '16 TiB, 2M clusters', options: { size: 16 * TiB, clusterSize: 2 * MiB }, args: ['-o', 'cluster_size=2M'], size: '16T' },
  { name: '64 GiB, 512-byte clusters', options: { size: 64 * 1024 * MiB, clusterSize: 512 }, args: ['-o', 'cluster_size=512'], size: '64G' },
  // Backing files.
  { name: 'backing qcow2 with -F, size from the backing file', options: { backingFile: 'base.qcow2', backingFormat: 'qcow2' }, args: ['-b', 'base.qcow2', '-F', 'qcow2'], size: '' },
  { name: 'backing raw with -F, size from the backing file (rounded to 512)', options: { backingFile: 'base.raw', backingFormat: 'raw' }, args: ['-b', 'base.raw', '-F', 'raw'], size: '' },
  { name: 'backing with an explicit larger size', options: { size: 5_000_000, backingFile: 'base.qcow2', backingFormat: 'qcow2' }, args: ['-b', 'base.qcow2', '-F', 'qcow2'], size: '5000000' },
  { name: 'backing, compat=0.10', options: { backingFile: 'base.qcow2', backingFormat: 'qcow2', compat: '0.10' }, args: ['-b', 'base.qcow2', '-F', 'qcow2', '-o', 'compat=0.10'], size: '' },
  { name: 'backing, 512-byte clusters (no feature table)', options: { backingFile: 'base.qcow2', backingFormat: 'qcow2', clusterSize: 512 }, args: ['-b', 'base.qcow2', '-F', 'qcow2', '-o', 'cluster_size=512'], size: '' },
  { name: 'relative backing name from a subdirectory', options: { backingFile: '../base.qcow2', backingFormat: 'qcow2' }, args: ['-b', '../base.qcow2', '-F', 'qcow2'], size: '', },
  {
    name: 'backing with extended_l2 and preallocation=metadata',
    options: { size: MiB + 512, backingFile: 'base.raw', backingFormat: 'raw', extendedL2: true, preallocation: 'metadata' },
    args: ['-b', 'base.raw', '-F', 'raw', '-o', 'extended_l2=on,preallocation=metadata'], size: '1049088',
  },
  // External data files.
  { name: 'data_file', options: { size: MiB, dataFile: 'DATA' }, args: ['-o', 'data_file=DATA'], size: '1M' },
  { name: 'data_file, data_file_raw=on', options: { size: MiB, dataFile: 'DATA', dataFileRaw: true }, args: ['-o', 'data_file=DATA,data_file_raw=on'], size: '1M' },
  { name: 'data_file_raw=on, size 1000', options: { size: 1000, dataFile: 'DATA', dataFileRaw: true }, args: ['-o', 'data_file=DATA,data_file_raw=on'], size: '1000' },
  { name: 'data_file, metadata, odd size', options: { size: 12345678, dataFile: 'DATA', preallocation: 'metadata' }, args: ['-o', 'data_file=DATA,preallocation=metadata'], size: '12345678' },
  { name: 'data_file, falloc', options: { size: MiB, dataFile: 'DATA', preallocation: 'falloc' }, args: ['-o', 'data_file=DATA,preallocation=falloc'], size: '1M' },
  { name: 'data_file, full', options: { size: MiB, dataFile: 'DATA', preallocation: 'full' }, args: ['-o', 'data_file=DATA,preallocation=full'], size: '1M' },
  { name: 'data_file, size 0', options: { size: 0, dataFile: 'DATA' }, args: ['-o', 'data_file=DATA'], size: '0' },
  {
    // 16M: 512 L2 tables and several refcount blocks already (qemu-img syncs once per L2 table, so
    // each 16M costs it some 2000 fdatasyncs).
    name: 'data_file_raw, 512-byte clusters', options: { size: 16 * MiB, dataFile: 'DATA', dataFileRaw: true, clusterSize: 512 },
    args: ['-o', 'data_file=DATA,data_file_raw=on,cluster_size=512'], size: '16M',
  },
  // The Formatting line shows file-protocol options too.
  {
    name: 'nocow and extent_size_hint in the line, preallocation=off given, data_file_raw=off given',
    options: { size: MiB, nocow: false, extentSizeHint: MiB, preallocation: 'off', dataFile: 'DATA', dataFileRaw: false },
    args: ['-o', 'nocow=off,extent_size_hint=1M,preallocation=off,data_file=DATA,data_file_raw=off'], size: '1M',
  },
  // raw
  { name: 'raw', options: { format: 'raw', size: MiB }, args: [], size: '1M' },
  { name: 'raw, size 1000', options: { format: 'raw', size: 1000 }, args: [], size: '1000' },
  { name: 'raw, size 0', options: { format: 'raw', size: 0 }, args: [], size: '0' },
  { name: 'raw, falloc', options: { format: 'raw', size: MiB, preallocation: 'falloc' }, args: ['-o', 'preallocation=falloc'], size: '1M' },
  { name: 'raw, falloc, 3000 bytes', options: { format: 'raw', size: 3000, preallocation: 'falloc' }, args: ['-o', 'preallocation=falloc'], size: '3000' },
  { name: 'raw, full', options: { format: 'raw', size: 12345678, preallocation: 'full' }, args: ['-o', 'preallocation=full'], size: '12345678' },
];

/** info JSON with our directory replaced by qemu's (names differ only by it). */
function normalise(info: Record<string, unknown>): Record<string, unknown> {
  return JSON.parse(JSON.stringify(info).split(oursDir).join(qemuDir)) as Record<string, unknown>;
}

describe('qimg create makes what qemu-img create makes', () => {
  for (const c of cases) {
    it(c.name, async () => {
      await setup;
      const format = c.options.format ?? 'qcow2';
      const sub = c.name.startsWith('relative') ? 'sub/' : '';
      const ext = format === 'qcow2' ? 'qcow2' : 'raw';
      const fileName = `${c.name.replace(/[^a-z0-9]+/gi, '-')}.${ext}`;
      const ours = join(oursDir, sub + fileName);
      const theirs = join(qemuDir, sub + fileName);
      let line = '';
      const args = ['create', '-f', format, ...c.args, sub + fileName];
      if (c.size !== '') args.push(c.size);
      const [result, q] = await Promise.all([
        createImage(ours, {
          ...c.options, format, gate: oursGate,
          onFormatting: (l) => {
            line = l;
          },
        }),
        qemuImg(args, { cwd: qemuDir }),
      ]);
      expect(line.split(oursDir + '/').join('')).toBe(q.stdout.trim());
      expect(result.formatting).toBe(line);

      // Host allocation before qemu-img info: its FIEMAP sync settles delayed allocation, so the
      // actual-size info reads is final.
      const [allocOurs, allocTheirs] = await compareHostAllocation(ours, theirs, `${c.name}: image`, { fallocEmulated });
      expect(result.fileLength).toBe(allocTheirs.length);
      const dataFiles = c.options.dataFile
        ? compareHostAllocation(join(oursDir, c.options.dataFile), join(qemuDir, c.options.dataFile), `${c.name}: data file`, { fallocEmulated })
        : undefined;

      const [infoOurs, infoTheirs] = await Promise.all([
        qemuInfo(ours, ['-f', format]).then(normalise),
        qemuInfo(theirs, ['-f', format]),
        // The files, byte for byte (as cmp, reading where either has data).
        expectSameFileBytes(allocOurs, allocTheirs, `${c.name}: image`),
        dataFiles?.then(async ([da, db]) => {
          expect(result.dataFileLength).toBe(db.length);
          await expectSameFileBytes(da, db, `${c.name}: data file`);
        }),
        format === 'qcow2' ? expectChecksClean(ours) : undefined,
        // And our reader opens it (the qemu-img checks are what count).
        openImage(ours, { format, gate: oursGate, noBacking: true }).then(async ({ image }) => {
          try {
            expect(image.virtualSize).toBe(result.virtualSize);
          } finally {
            await image.close();
          }
        }),
      ]);

      // qemu-img info, all of it; actual-size is each file's st_blocks * 512, compared above.
      delete infoOurs.filename;
      delete infoTheirs.filename;
      takeActualSize(infoOurs, allocOurs, `${c.name}: qimg's image`);
      takeActualSize(infoTheirs, allocTheirs, `${c.name}: qemu-img's image`);
      expect(infoOurs).toEqual(infoTheirs);
      expect(result.virtualSize).toBe(infoTheirs['virtual-size']);
    });
  }
});

/** qemu-img check, JSON and human: clean, no leaks. */
async function expectChecksClean(file: string): Promise<void> {
  const [check, human] = await Promise.all([
    run('qemu-img', ['check', '--output=json', file], { cwd: oursDir }),
    run('qemu-img', ['check', file], { cwd: oursDir }),
  ]);
  expect(check.code, check.stdout + check.stderr).toBe(0);
  const report = JSON.parse(check.stdout) as Record<string, unknown>;
  expect(report['check-errors']).toBe(0);
  expect(report.leaks ?? 0).toBe(0);
  expect(report.corruptions ?? 0).toBe(0);
  expect(human.stdout).toContain('No errors were found on the image.');
}
