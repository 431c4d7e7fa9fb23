// zstd compression in worker threads, in batches through shared memory (ZstdBatchPool), with
// libzstd (koffi) or the WebAssembly build; frames checked by independent decoders: the zstd CLI
// and qemu-img reading them back from an image.

import { spawnSync } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { pathToFileURL } from 'node:url';
import { build } from 'esbuild';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { CodecRegistry } from '../../src/qcow2/compression.js';
import { loadZstdNative, loadZstdNativeCompressor } from '../../src/qcow2/zstd-native.js';
import { ZstdBatchPool } from '../../src/qcow2/zstd-pool.js';
import { loadZstdWasm, zstdCompressInto, zstdCompressSync } from '../../src/qcow2/zstd-wasm.js';
import { CLUSTER, compressedClusters, hasTool, makeData, run, type DataKind } from './helpers.js';

const haveZstd = hasTool('zstd');
const haveQemu = hasTool('qemu-img') && hasTool('qemu-io');
const ENGINES = (loadZstdNative() ? ['native', 'wasm'] : ['wasm']) as ('native' | 'wasm')[];
const KINDS: DataKind[] = ['pattern', 'text', 'mixed'];

let dir: string;
let workerPath: string;
beforeAll(async () => {
  // Built as tsup builds it (the pool looks for zstd-worker.js next to its module in dist/).
  dir = mkdtempSync(path.join(process.cwd(), 'node_modules', '.cache', 'qimg-zstd-batch-'));
  await build({
    entryPoints: { 'zstd-worker': 'src/qcow2/zstd-worker.ts', 'zstd-pool': 'src/qcow2/zstd-pool.ts' },
    bundle: true, platform: 'node', format: 'esm', target: 'node20', outdir: dir, outExtension: { '.js': '.mjs' },
    packages: 'external', logLevel: 'silent',
  });
  workerPath = path.join(dir, 'zstd-worker.mjs');
});
afterAll(() => rmSync(dir, { recursive: true, force: true }));

/** The zstd CLI's reading of one frame. */
function zstdCli(frame: Uint8Array): Buffer {
  return run('zstd', ['-d', '-c', '-q'], frame);
}

describe.each(ENGINES)('ZstdBatchPool (%s)', (engine) => {
  it.skipIf(!haveZstd)('compresses many clusters at once, in order, into frames the zstd CLI reads', async () => {
    const pool = new ZstdBatchPool({ workerPath, engine, threads: 2, batchBytes: 4 * CLUSTER });
    try {
      const inputs: Uint8Array[] = [];
      for (let i = 0; i < 40; i++) inputs.push(makeData(KINDS[i % KINDS.length]!, CLUSTER, i + 1));
      // Other sizes in the same run: small clusters, and one larger than a whole batch.
      inputs.push(makeData('text', 512, 3), makeData('mixed', 2 * 1024 * 1024, 5), makeData('pattern', 4096));
      const outs = await Promise.all(inputs.map((d) => pool.compress(d, d.length - 1, 3)));
      expect(pool.size).toBe(2);
      outs.forEach((frame, i) => {
        expect(frame, `input ${i}`).not.toBeNull();
        expect(frame![4]! >> 6, 'Frame_Content_Size_flag').not.toBe(0);
        expect(zstdCli(frame!).equals(Buffer.from(inputs[i]!)), `input ${i}`).toBe(true);
      });
    } finally {
      await pool.close();
    }
    expect(pool.size).toBe(0);
  });

  it('gives the same frames as compressing in this thread; null when a frame would not fit', async () => {
    await loadZstdWasm();
    const pool = new ZstdBatchPool({ workerPath, engine, threads: 1 });
    try {
      const native = loadZstdNative();
      for (const kind of KINDS) {
        const data = makeData(kind);
        const frame = (await pool.compress(data, CLUSTER - 1, 3))!;
        let expected: Uint8Array;
        if (engine === 'native') {
          const dst = new Uint8Array(CLUSTER * 2);
          expected = dst.subarray(0, await native!.compressAsync(dst, data, 3));
        } else {
          expected = zstdCompressSync(data, CLUSTER * 2)!;
        }
        expect(Buffer.from(frame).equals(Buffer.from(expected)), kind).toBe(true);
        // A limit just below the frame's length: stored uncompressed by the writer.
        expect(await pool.compress(data, frame.length - 1, 3)).toBeNull();
      }
      expect(await pool.compress(makeData('random'), CLUSTER - 1, 3)).toBeNull();
    } finally {
      await pool.close();
    }
  });

  it.skipIf(!haveQemu)('qemu-img reads its frames from an image', async () => {
    const tmp = mkdtempSync(path.join(os.tmpdir(), 'qimg-batch-'));
    const pool = new ZstdBatchPool({ workerPath, engine, threads: 2 });
    try {
      // QEMU writes three compressed clusters; ours replace them (when they fit the same sectors).
      const img = path.join(tmp, 'a.qcow2');
      run('qemu-img', ['create', '-q', '-f', 'qcow2', '-o', `compression_type=zstd,cluster_size=${CLUSTER}`, img, '1M']);
      const datas = KINDS.map((k, i) => makeData(k, CLUSTER, i + 7));
      const args: string[] = [];
      datas.forEach((d, i) => {
        const file = path.join(tmp, `${i}.raw`);
        writeFileSync(file, d);
        args.push('-c', `write -c -s ${file} ${i * CLUSTER} ${CLUSTER}`);
      });
      run('qemu-io', [...args, img]);
      const ours = await Promise.all(datas.map((d) => pool.compress(d, CLUSTER - 1, 3)));
      let buf = readFileSync(img);
      let patched = 0;
      for (const c of compressedClusters(img).clusters) {
        const frame = ours[c.guestOffset / CLUSTER]!;
        if (frame.length > c.bytes.length) continue;
        const end = c.hostOffset + c.bytes.length; // the last cluster's sectors may end past the file
        if (end > buf.length) buf = Buffer.concat([buf, Buffer.alloc(end - buf.length)]);
        buf.fill(0, c.hostOffset, end);
        buf.set(frame, c.hostOffset);
        patched++;
      }
      expect(patched).toBe(KINDS.length);
      writeFileSync(img, buf);
      const raw = path.join(tmp, 'a.raw');
      run('qemu-img', ['convert', '-f', 'qcow2', '-O', 'raw', img, raw]);
      expect(readFileSync(raw).subarray(0, KINDS.length * CLUSTER).equals(Buffer.concat(datas))).toBe(true);
    } finally {
      await pool.close();
      rmSync(tmp, { recursive: true, force: true });
    }
  });

  it.skipIf(!haveZstd)('lends this thread when every worker lane is busy (inline): queued jobs taken in order, frames in order', async () => {
    await loadZstdWasm();
    const native = loadZstdNativeCompressor();
    const compress = engine === 'native' ? native!.compress.bind(native) : zstdCompressInto;
    // Distinct data for every job (pattern data is the same whatever the seed), so that a frame
    // handed to the wrong job cannot pass for its own.
    const inputs = Array.from({ length: 24 }, (_, i) => makeData(i % 2 ? 'text' : 'mixed', CLUSTER, i + 31));
    inputs.push(makeData('random', CLUSTER, 5));
    const index = new Map(inputs.map((d, i) => [d, i]));
    const inlined: number[] = [];
    const pool = new ZstdBatchPool({
      workerPath, engine, threads: 1, lanes: 1, batchBytes: CLUSTER,
      inline: (dst, src, level) => {
        inlined.push(index.get(src) ?? -1);
        return compress(dst, src, level);
      },
    });
    try {
      const outs = await Promise.all(inputs.map((d) => pool.compress(d, CLUSTER - 1, 3)));
      // One worker with one lane: the first job goes to it (a lane is free then), the next ones
      // wait for it, and this thread takes some of them meanwhile, always the oldest queued job.
      expect(inlined.length, 'jobs compressed in this thread').toBeGreaterThan(0);
      expect(inlined[0], 'the first job went to the worker').toBeGreaterThan(0);
      expect(inlined.every((k, i) => i === 0 || k > inlined[i - 1]!), `queue order: ${inlined.join(',')}`).toBe(true);
      expect(outs[inputs.length - 1]).toBeNull();
      outs.slice(0, -1).forEach((frame, i) => expect(zstdCli(frame!).equals(Buffer.from(inputs[i]!)), `input ${i}`).toBe(true));
    } finally {
      await pool.close();
    }
  });

  it.skipIf(!haveZstd)('keeps this thread out while a worker lane is free', async () => {
    await loadZstdWasm();
    let inlined = 0;
    const pool = new ZstdBatchPool({
      workerPath, engine, threads: 1, lanes: 2, batchBytes: CLUSTER,
      inline: (dst, src, level) => {
        inlined++;
        return zstdCompressInto(dst, src, level);
      },
    });
    try {
      // One cluster per batch: two jobs fill the worker's two lanes exactly.
      const inputs = [1, 2].map((i) => makeData('text', CLUSTER, i));
      const outs = await Promise.all(inputs.map((d) => pool.compress(d, CLUSTER - 1, 3)));
      expect(inlined).toBe(0);
      expect(pool.size).toBe(1);
      outs.forEach((frame, i) => expect(zstdCli(frame!).equals(Buffer.from(inputs[i]!)), `input ${i}`).toBe(true));
    } finally {
      await pool.close();
    }
  });

  it('never keeps the process alive', () => {
    // A script that compresses through the pool and then just ends: its workers are unref'd.
    const script = `
      import { ZstdBatchPool } from ${JSON.stringify(pathToFileURL(path.join(dir, 'zstd-pool.mjs')).href)};
      const pool = new ZstdBatchPool({ workerPath: ${JSON.stringify(workerPath)}, engine: ${JSON.stringify(engine)}, threads: 2 });
      const outs = await Promise.all(Array.from({ length: 20 }, (_, i) => pool.compress(new Uint8Array(65536).fill(i), 65535, 3)));
      console.log(outs.filter((o) => o && o.length > 0).length, pool.size);
    `;
    const file = path.join(dir, `alive-${engine}.mjs`);
    writeFileSync(file, script);
    const res = spawnSync(process.execPath, [file], { timeout: 20_000, encoding: 'utf8', cwd: process.cwd() });
    expect(res.error).toBeUndefined();
    expect(res.stderr).toBe('');
    expect(res.status).toBe(0);
    expect(res.stdout.trim()).toBe('20 2');
  });
});

describe('codec.compressMany', () => {
  it.skipIf(!haveZstd)('zstd through the worker pool: one result per chunk, in order; null for what does not fit', async () => {
    const codec = await new CodecRegistry({ zstdPool: { workerPath, threads: 2 } }).get('zstd');
    const chunks = [...KINDS, 'random' as const, ...KINDS].map((k, i) => makeData(k, CLUSTER, i + 1));
    const outs = await codec.compressMany(chunks, CLUSTER - 1);
    expect(outs.length).toBe(chunks.length);
    outs.forEach((o, i) => {
      if (i === KINDS.length) expect(o).toBeNull();
      else expect(zstdCli(o!).equals(Buffer.from(chunks[i]!)), `chunk ${i}`).toBe(true);
    });
    // And the single-cluster call still works next to it.
    const one = (await codec.compress(chunks[0]!, CLUSTER - 1))!;
    expect(zstdCli(one).equals(Buffer.from(chunks[0]!))).toBe(true);
  });

  it('zlib: raw deflate, one result per chunk', async () => {
    const codec = await new CodecRegistry().get('zlib');
    const chunks = KINDS.map((k) => makeData(k));
    const outs = await codec.compressMany(chunks, CLUSTER - 1);
    for (let i = 0; i < chunks.length; i++) {
      const dst = new Uint8Array(CLUSTER);
      await codec.decompress(outs[i]!, dst);
      expect(Buffer.from(dst).equals(Buffer.from(chunks[i]!))).toBe(true);
    }
    expect(await codec.compressMany([makeData('random')], CLUSTER - 1)).toEqual([null]);
  });
});

describe('zstdCompressInto (WebAssembly, reused context and heap buffers)', () => {
  it('writes the frames of zstdCompressSync; -70 when dst is too small', async () => {
    await loadZstdWasm();
    const dst = new Uint8Array(3 * CLUSTER);
    for (const kind of ['pattern', 'text', 'mixed', 'random'] as const) {
      for (const length of [CLUSTER, 512, 2 * CLUSTER]) {
        const data = makeData(kind, length, 9);
        const n = zstdCompressInto(dst, data, 3);
        expect(n).toBeGreaterThan(0);
        expect(Buffer.from(dst.subarray(0, n)).equals(Buffer.from(zstdCompressSync(data, 4 * CLUSTER)!)), `${kind} ${length}`).toBe(true);
        if (haveZstd) expect(zstdCli(dst.subarray(0, n)).equals(Buffer.from(data))).toBe(true);
      }
    }
    expect(zstdCompressInto(new Uint8Array(CLUSTER - 1), makeData('random'), 3)).toBe(-70);
  });
});
