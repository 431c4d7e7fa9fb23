// Our decoders against compressed clusters QEMU wrote, and QEMU-side decoders
// (Python's zlib with wbits -12, the zstd CLI) against our encoders.

import { mkdtempSync, readFileSync, readdirSync, rmSync, writeFileSync, mkdirSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { getCodec, type CompressionType } from '../../src/qcow2/compression.js';
import { CLUSTER, compressedClusters, hasTool, makeData, run, type DataKind } from './helpers.js';

const FIXTURES = path.join(import.meta.dirname ?? path.dirname(new URL(import.meta.url).pathname), 'fixtures');
const KINDS: DataKind[] = ['pattern', 'text', 'mixed'];
const TYPES: CompressionType[] = ['zlib', 'zstd'];
const haveQemu = hasTool('qemu-img') && hasTool('qemu-io');
const tmp = mkdtempSync(path.join(os.tmpdir(), 'qimg-codec-'));
afterAll(() => rmSync(tmp, { recursive: true, force: true }));

/** Writes each kind of data as one compressed cluster with qemu-io; returns the stored cluster bytes by kind. */
function qemuClusters(type: CompressionType): Map<DataKind, Uint8Array> {
  const img = path.join(tmp, `${type}.qcow2`);
  run('qemu-img', ['create', '-q', '-f', 'qcow2', '-o', `compression_type=${type},cluster_size=${CLUSTER}`, img, '1M']);
  const args: string[] = [];
  KINDS.forEach((kind, i) => {
    const file = path.join(tmp, `${kind}.raw`);
    writeFileSync(file, makeData(kind));
    args.push('-c', `write -c -s ${file} ${i * CLUSTER} ${CLUSTER}`);
  });
  run('qemu-io', [...args, img]);
  const { compressionType, clusters } = compressedClusters(img);
  expect(compressionType).toBe(type === 'zlib' ? 0 : 1);
  expect(clusters.length).toBe(KINDS.length);
  return new Map(clusters.map((c) => [KINDS[c.guestOffset / CLUSTER]!, c.bytes]));
}

describe.each(TYPES)('%s: clusters written by QEMU', (type) => {
  it.skipIf(!haveQemu)('decompress to the data qemu-io wrote (live qemu-img)', async () => {
    const codec = await getCodec(type);
    const clusters = qemuClusters(type);
    if (process.env.QIMG_WRITE_FIXTURES) {
      mkdirSync(FIXTURES, { recursive: true });
      for (const [kind, bytes] of clusters) writeFileSync(path.join(FIXTURES, `qemu-${type}-${kind}.bin`), bytes);
    }
    for (const kind of KINDS) {
      const bytes = clusters.get(kind)!;
      const dst = new Uint8Array(CLUSTER);
      await codec.decompress(bytes, dst);
      expect(Buffer.from(dst).equals(Buffer.from(makeData(kind))), kind).toBe(true);
    }
  });

  it('decompress committed QEMU fixtures', async () => {
    const codec = await getCodec(type);
    const files = readdirSync(FIXTURES).filter((f) => f.startsWith(`qemu-${type}-`));
    expect(files.length).toBe(KINDS.length);
    for (const file of files) {
      const kind = file.slice(`qemu-${type}-`.length, -'.bin'.length) as DataKind;
      const dst = new Uint8Array(CLUSTER);
      await codec.decompress(readFileSync(path.join(FIXTURES, file)), dst);
      expect(Buffer.from(dst).equals(Buffer.from(makeData(kind))), file).toBe(true);
    }
  });
});

describe('our output in QEMU-compatible decoders', () => {
  const havePython = hasTool('python3');
  it.skipIf(!havePython)('zlib: Python zlib.decompressobj(-12) (QEMU inflateInit2(-12)) reads our deflate', async () => {
    const codec = await getCodec('zlib');
    for (const kind of KINDS) {
      const data = makeData(kind);
      const c = (await codec.compress(data, CLUSTER - 1))!;
      expect(c).not.toBeNull();
      // Append junk as a sector-rounded read would, and demand exactly one cluster back.
      const input = Buffer.concat([c, Buffer.alloc(511, 0xa5)]);
      const out = run(
        'python3',
        ['-c', 'import sys,zlib; d=zlib.decompressobj(-12); sys.stdout.buffer.write(d.decompress(sys.stdin.buffer.read(), 65536)); assert d.eof'],
        input,
      );
      expect(out.equals(Buffer.from(data)), kind).toBe(true);
    }
  });

  const haveZstd = hasTool('zstd');
  it.skipIf(!haveZstd)('zstd: the zstd CLI reads our frames', async () => {
    const codec = await getCodec('zstd');
    for (const kind of KINDS) {
      const data = makeData(kind);
      const c = (await codec.compress(data, CLUSTER - 1))!;
      expect(c).not.toBeNull();
      const out = run('zstd', ['-d', '-c', '-q'], c);
      expect(out.equals(Buffer.from(data)), kind).toBe(true);
    }
  });

  it.skipIf(!haveQemu)('round trip through a QEMU image: our compressed cluster patched over QEMU\'s reads back in qemu-img', async () => {
    // Replace QEMU's compressed bytes with ours (when ours fit in the same sectors) and let QEMU read them.
    let patched = 0;
    for (const type of TYPES) {
      const codec = await getCodec(type);
      const img = path.join(tmp, `patch-${type}.qcow2`);
      run('qemu-img', ['create', '-q', '-f', 'qcow2', '-o', `compression_type=${type}`, img, '1M']);
      const data = makeData('text');
      const file = path.join(tmp, 'text.raw');
      writeFileSync(file, data);
      run('qemu-io', ['-c', `write -c -s ${file} 0 ${CLUSTER}`, img]);
      const [cluster] = compressedClusters(img).clusters;
      const ours = (await codec.compress(data, CLUSTER - 1))!;
      if (ours.length > cluster!.bytes.length) continue; // would need the writer; sizes are normally equal
      const buf = readFileSync(img);
      buf.set(ours, cluster!.hostOffset);
      writeFileSync(img, buf);
      const raw = path.join(tmp, `patch-${type}.raw`);
      run('qemu-img', ['convert', '-f', 'qcow2', '-O', 'raw', img, raw]);
      expect(readFileSync(raw).subarray(0, CLUSTER).equals(Buffer.from(data)), type).toBe(true);
      patched++;
    }
    expect(patched).toBe(TYPES.length);
  });
});
