// Bad option combinations: qimg refuses them with qemu-img's own message (qemu-img prints
// "qemu-img: <file>: <message>"), whether the message comes before the Formatting line
// (bdrv_img_create) or after it (qcow2_co_create); and refusing creates no file.

import { existsSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { createImage, type CreateImageOptions } from '../../src/create.js';
import { QimgError } from '../../src/errors.js';
import { qemuImg, qemuImgResult, tmpDir } from '../helpers/qemu.js';

const dir = tmpDir('qimg-create-errors-');
const base = join(dir, 'base.qcow2');
const ready = qemuImg(['create', '-q', '-f', 'qcow2', base, '1M']);

interface Bad {
  name: string;
  options: Omit<CreateImageOptions, 'format'> & { format?: string };
  args: string[];
  size?: string;
  /** Whether qemu-img prints the Formatting line before failing. */
  formats: boolean;
}

const bad: Bad[] = [
  { name: 'refcount_bits not a power of two', options: { size: 1 << 20, refcountBits: 3 }, args: ['-o', 'refcount_bits=3'], formats: true },
  { name: 'refcount_bits > 64', options: { size: 1 << 20, refcountBits: 128 }, args: ['-o', 'refcount_bits=128'], formats: true },
  { name: 'refcount_bits != 16 with compat=0.10', options: { size: 1 << 20, refcountBits: 8, compat: '0.10' }, args: ['-o', 'compat=0.10,refcount_bits=8'], formats: true },
  { name: 'extended_l2 with 4k clusters', options: { size: 1 << 20, extendedL2: true, clusterSize: 4096 }, args: ['-o', 'extended_l2=on,cluster_size=4096'], formats: true },
  { name: 'extended_l2 with compat=0.10', options: { size: 1 << 20, extendedL2: true, compat: '0.10' }, args: ['-o', 'extended_l2=on,compat=0.10'], formats: true },
  { name: 'cluster size not a power of two', options: { size: 1 << 20, clusterSize: 1000 }, args: ['-o', 'cluster_size=1000'], formats: true },
  { name: 'cluster size too large', options: { size: 1 << 20, clusterSize: 4 << 20 }, args: ['-o', 'cluster_size=4194304'], formats: true },
  { name: 'cluster size too small', options: { size: 1 << 20, clusterSize: 256 }, args: ['-o', 'cluster_size=256'], formats: true },
  { name: 'data_file_raw without data_file', options: { size: 1 << 20, dataFileRaw: true }, args: ['-o', 'data_file_raw=on'], formats: true },
  {
    name: 'backing file with data_file_raw', options: { size: 1 << 20, dataFile: 'd.raw', dataFileRaw: true, backingFile: base, backingFormat: 'qcow2' },
    args: ['-o', 'data_file=d.raw,data_file_raw=on', '-b', base, '-F', 'qcow2'], formats: true,
  },
  { name: 'data_file with compat=0.10', options: { size: 1 << 20, dataFile: 'd.raw', compat: '0.10' }, args: ['-o', 'data_file=d.raw,compat=0.10'], formats: true },
  { name: 'zstd with compat=0.10', options: { size: 1 << 20, compressionType: 'zstd', compat: '0.10' }, args: ['-o', 'compression_type=zstd,compat=0.10'], formats: true },
  { name: 'lazy_refcounts with compat=0.10', options: { size: 1 << 20, lazyRefcounts: true, compat: '0.10' }, args: ['-o', 'lazy_refcounts=on,compat=0.10'], formats: true },
  { name: 'unknown preallocation mode', options: { size: 1 << 20, preallocation: 'foo' as 'off' }, args: ['-o', 'preallocation=foo'], formats: true },
  { name: 'unknown compat', options: { size: 1 << 20, compat: '0.9' as '1.1' }, args: ['-o', 'compat=0.9'], formats: true },
  { name: 'unknown compression type', options: { size: 1 << 20, compressionType: 'lz4' as 'zlib' }, args: ['-o', 'compression_type=lz4'], formats: true },
  { name: 'backing file and preallocation without extended_l2', options: { size: 1 << 20, backingFile: base, backingFormat: 'qcow2', preallocation: 'metadata' }, args: ['-b', base, '-F', 'qcow2', '-o', 'preallocation=metadata'], formats: true },
  { name: 'backing format without backing file', options: { size: 1 << 20, backingFormat: 'qcow2' }, args: ['-F', 'qcow2'], formats: true },
  { name: 'image too large for 512-byte clusters', options: { size: 2 ** 50, clusterSize: 512 }, args: ['-o', 'cluster_size=512'], size: '1P', formats: true },
  { name: 'raw: metadata preallocation', options: { format: 'raw', size: 1 << 20, preallocation: 'metadata' }, args: ['-o', 'preallocation=metadata'], formats: true },
  { name: 'no size and no backing file', options: {}, args: [], size: '', formats: false },
  { name: 'backing file without backing format', options: { backingFile: base }, args: ['-b', base], size: '', formats: false },
  { name: 'missing backing file', options: { backingFile: join(dir, 'nonexistent'), backingFormat: 'qcow2' }, args: ['-b', join(dir, 'nonexistent'), '-F', 'qcow2'], size: '', formats: false },
  { name: 'empty backing file name', options: { size: 1 << 20, backingFile: '', backingFormat: 'qcow2' }, args: ['-b', '', '-F', 'qcow2'], formats: false },
  { name: 'raw with a backing file', options: { format: 'raw', size: 1 << 20, backingFile: base, backingFormat: 'qcow2' }, args: ['-b', base, '-F', 'qcow2'], formats: false },
];

describe('creation errors are worded as qemu-img words them', () => {
  let n = 0;
  for (const c of bad) {
    it(c.name, async () => {
      await ready;
      const format = (c.options.format ?? 'qcow2') as 'qcow2';
      const file = join(dir, `bad-${n++}.${format}`);
      const args = ['create', '-f', format, ...c.args, file];
      const size = c.size ?? '1M';
      if (size !== '') args.push(size);
      const q = await qemuImgResult(args, { cwd: dir });
      expect(q.code).toBe(1);
      const prefix = `qemu-img: ${file}: `;
      expect(q.stderr.startsWith(prefix), q.stderr).toBe(true);
      const [message, ...hint] = q.stderr.slice(prefix.length).replace(/\n$/, '').split('\n');

      let line: string | undefined;
      let error: unknown;
      try {
        await createImage(file + '.ours', { ...c.options, format, onFormatting: (l) => (line = l) });
      } catch (e) {
        error = e;
      }
      expect(error).toBeInstanceOf(QimgError);
      expect((error as QimgError).message).toBe(message);
      // QEMU's appended hints carry their own trailing newline (or none); the lines compare without it.
      if (hint.length) expect(String((error as QimgError).data.hint).trimEnd()).toBe(hint.join('\n'));
      expect(line !== undefined).toBe(c.formats);
      if (c.formats) expect(line!.replace(`'${file}.ours'`, `'${file}'`)).toBe(q.stdout.trim());
      if (format === 'qcow2') expect(existsSync(file + '.ours')).toBe(false);
    });
  }
});
