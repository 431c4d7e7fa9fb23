import { rmSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import zlib from 'node:zlib';
import { build } from 'esbuild';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { FormatError } from '../../src/errors.js';
import { CodecRegistry, getCodec, type ClusterCodec, type CompressionType } from '../../src/qcow2/compression.js';
import { readZstdFrame } from '../../src/qcow2/zstd-frame.js';
import { ZstdWorkerPool } from '../../src/qcow2/zstd-pool.js';
import { CLUSTER, hasTool, makeData, run, type DataKind } from './helpers.js';

const TYPES: CompressionType[] = ['zlib', 'zstd'];
const KINDS: DataKind[] = ['pattern', 'text', 'mixed'];
const concat = (...parts: Uint8Array[]) => new Uint8Array(Buffer.concat(parts));
const junk = (n: number, seed = 7) => makeData('random', n, seed);

async function expectFormatError(p: Promise<unknown>): Promise<void> {
  await expect(p).rejects.toBeInstanceOf(FormatError);
}

describe.each(TYPES)('%s codec', (type) => {
  let codec: ClusterCodec;
  beforeAll(async () => {
    codec = await getCodec(type);
  });

  it('is cached per registry and reports its type', async () => {
    expect(codec.type).toBe(type);
    expect(await getCodec(type)).toBe(codec);
  });

  it.each(KINDS)('round-trips %s data, with and without trailing garbage', async (kind) => {
    const data = makeData(kind);
    const c = await codec.compress(data, CLUSTER - 1);
    expect(c).not.toBeNull();
    expect(c!.length).toBeLessThan(CLUSTER);
    for (const input of [c!, concat(c!, junk(511)), concat(c!, new Uint8Array(4096)), concat(c!, c!)]) {
      const dst = new Uint8Array(CLUSTER);
      await codec.decompress(input, dst);
      expect(Buffer.from(dst).equals(Buffer.from(data))).toBe(true);
    }
  });

  it('round-trips other cluster sizes (512 B, 2 MiB)', async () => {
    for (const size of [512, 2 << 20]) {
      const data = makeData('text', size, 3);
      const c = (await codec.compress(data, size - 1))!;
      const dst = new Uint8Array(size);
      await codec.decompress(concat(c, junk(100)), dst);
      expect(Buffer.from(dst).equals(Buffer.from(data))).toBe(true);
    }
  });

  it('returns null when the result would not fit', async () => {
    expect(await codec.compress(makeData('random'), CLUSTER - 1)).toBeNull();
    const text = makeData('text');
    const c = (await codec.compress(text, CLUSTER - 1))!;
    expect(await codec.compress(text, c.length)).not.toBeNull();
    expect(await codec.compress(text, c.length - 1)).toBeNull();
  });

  it('rejects garbage, empty and short streams with FormatError', async () => {
    const dst = new Uint8Array(CLUSTER);
    await expectFormatError(codec.decompress(junk(4096), dst));
    await expectFormatError(codec.decompress(new Uint8Array(0), dst));
    const c = (await codec.compress(makeData('text'), CLUSTER - 1))!;
    await expectFormatError(codec.decompress(c.subarray(0, c.length >> 1), dst));
    // A complete stream of less than a cluster.
    const small = (await codec.compress(makeData('text', 1000), 2000))!;
    await expectFormatError(codec.decompress(concat(small, new Uint8Array(1000)), dst));
  });

  it('decompresses many clusters concurrently', async () => {
    const datas = Array.from({ length: 32 }, (_, i) => makeData(i % 2 ? 'text' : 'mixed', CLUSTER, i + 1));
    const cs = await Promise.all(datas.map((d) => codec.compress(d, CLUSTER - 1)));
    const outs = datas.map(() => new Uint8Array(CLUSTER));
    await Promise.all(cs.map((c, i) => codec.decompress(concat(c!, junk(300, i)), outs[i]!)));
    outs.forEach((o, i) => expect(Buffer.from(o).equals(Buffer.from(datas[i]!))).toBe(true));
  });
});

describe('zlib specifics (QEMU qcow2_zlib_decompress)', () => {
  it('compresses as QEMU does: raw deflate, windowBits 12, default level, memLevel 9', async () => {
    const codec = await getCodec('zlib');
    for (const kind of KINDS) {
      const data = makeData(kind);
      const expected = zlib.deflateRawSync(data, { windowBits: 12, level: -1, memLevel: 9 });
      expect(Buffer.from((await codec.compress(data, CLUSTER - 1))!).equals(expected), kind).toBe(true);
    }
  });

  it('accepts a stream cut off after the cluster is full (Z_BUF_ERROR with avail_out == 0)', async () => {
    const codec = await getCodec('zlib');
    const data = makeData('text');
    // Sync-flushed stream without a final block: inflate with Z_FINISH ends in Z_BUF_ERROR.
    const d = zlib.createDeflateRaw({ windowBits: 12 });
    const unfinished = await new Promise<Buffer>((resolve) => {
      d.write(data);
      d.flush(zlib.constants.Z_SYNC_FLUSH, () => resolve(d.read() as Buffer));
    });
    d.destroy();
    const dst = new Uint8Array(CLUSTER);
    await codec.decompress(unfinished, dst);
    expect(Buffer.from(dst).equals(Buffer.from(data))).toBe(true);
  });

  it('takes the first cluster of a stream that yields more (QEMU does too)', async () => {
    const codec = await getCodec('zlib');
    const data = makeData('text', 2 * CLUSTER, 5);
    const c = zlib.deflateRawSync(data, { windowBits: 12 });
    const dst = new Uint8Array(CLUSTER);
    await codec.decompress(c, dst);
    expect(Buffer.from(dst).equals(Buffer.from(data.subarray(0, CLUSTER)))).toBe(true);
  });

  it('accepts back-references longer than the 4 KiB window within the cluster, as QEMU does', async () => {
    // QEMU inflates a cluster in one inflate() call into the whole cluster buffer, and zlib
    // copies matches out of that call's output without consulting the window: qemu-img 7.2
    // reads such a cluster (checked by patching this stream into a qcow2 image).
    const codec = await getCodec('zlib');
    const block = makeData('random', 8192, 9);
    const data = concat(block, block, block, block, block, block, block, block);
    const c = zlib.deflateRawSync(data, { windowBits: 15 });
    const dst = new Uint8Array(data.length);
    await codec.decompress(c, dst);
    expect(Buffer.from(dst).equals(Buffer.from(data))).toBe(true);
  });

  it('rejects a stream that refers to bytes before the cluster', async () => {
    const codec = await getCodec('zlib');
    const block = makeData('random', 8192, 9);
    // Deflated against a preset dictionary: its first matches point before the output's start.
    const c = zlib.deflateRawSync(concat(block, block), { windowBits: 15, dictionary: block });
    await expectFormatError(codec.decompress(c, new Uint8Array(block.length * 2)));
  });
});

describe('zstd specifics (QEMU qcow2_zstd_decompress)', () => {
  it('writes one frame with the content size and no checksum', async () => {
    const codec = await getCodec('zstd');
    const c = (await codec.compress(makeData('text'), CLUSTER - 1))!;
    const frame = readZstdFrame(concat(c, junk(64)), 0);
    expect(frame).toEqual({ length: c.length, skippable: false, contentSize: CLUSTER, dictionaryId: 0 });
  });

  it('reads several frames, skippable frames, and stops once the cluster is full', async () => {
    const codec = await getCodec('zstd');
    const a = makeData('text', 20000, 1);
    const b = makeData('mixed', CLUSTER - 20000, 2);
    const ca = (await codec.compress(a, 1 << 20))!;
    const cb = (await codec.compress(b, 1 << 20))!;
    const skippable = concat(new Uint8Array([0x53, 0x2a, 0x4d, 0x18, 3, 0, 0, 0]), new Uint8Array([1, 2, 3]));
    const dst = new Uint8Array(CLUSTER);
    // After the cluster is full, another complete frame and junk follow; both are ignored.
    await codec.decompress(concat(ca, skippable, cb, ca, junk(200)), dst);
    expect(Buffer.from(dst).equals(Buffer.from(concat(a, b)))).toBe(true);
  });

  it('rejects a frame that would overflow the cluster', async () => {
    const codec = await getCodec('zstd');
    const a = (await codec.compress(makeData('text', 40000), 1 << 20))!;
    await expectFormatError(codec.decompress(concat(a, a), new Uint8Array(CLUSTER)));
  });

  it.skipIf(!hasTool('zstd'))('reads frames without content size, with checksums (zstd CLI, streaming)', async () => {
    const codec = await getCodec('zstd');
    const data = makeData('mixed');
    // From a pipe the CLI does not know the size: no Frame_Content_Size; --check adds the checksum.
    const c = run('sh', ['-c', 'cat | zstd -q -c --check -19'], data);
    const frame = readZstdFrame(c, 0);
    expect(typeof frame === 'object' && frame.contentSize).toBeNull();
    expect(typeof frame === 'object' && frame.length).toBe(c.length);
    const dst = new Uint8Array(CLUSTER);
    await codec.decompress(concat(c, junk(300)), dst);
    expect(Buffer.from(dst).equals(Buffer.from(data))).toBe(true);
    // A corrupted checksum is an error.
    const bad = new Uint8Array(c);
    bad[bad.length - 1]! ^= 0xff;
    await expectFormatError(codec.decompress(bad, new Uint8Array(CLUSTER)));
  });

  it('frame walker reports truncation and bad magic', () => {
    expect(readZstdFrame(new Uint8Array([1, 2, 3, 4, 5]), 0)).toMatch(/magic/);
    expect(readZstdFrame(new Uint8Array([0x28, 0xb5, 0x2f, 0xfd, 0x60, 0, 0xff]), 0)).toMatch(/truncated/);
  });
});

describe('zstd in worker threads (the built dist/zstd-worker.js)', () => {
  let outfile: string;
  let registry: CodecRegistry;
  beforeAll(async () => {
    // Build the worker as tsup would; @bokuweb/zstd-wasm resolves from this repo's node_modules.
    outfile = path.join(process.cwd(), 'node_modules', '.cache', `qimg-zstd-worker-${process.pid}.mjs`);
    await build({ entryPoints: ['src/qcow2/zstd-worker.ts'], bundle: true, platform: 'node', format: 'esm', target: 'node20', outfile, packages: 'external', logLevel: 'silent' });
    registry = new CodecRegistry({ zstdWorkers: 'workers', zstdPool: { workerPath: outfile, threads: 2 } });
  });
  afterAll(() => rmSync(outfile, { force: true }));

  it('the pool starts workers lazily up to its size, and close() stops them', async () => {
    const pool = new ZstdWorkerPool({ workerPath: outfile, threads: 2 });
    expect(pool.size).toBe(0);
    const data = makeData('text');
    const outs = await Promise.all([1, 2, 3, 4].map(() => pool.compress(data, CLUSTER - 1, 3)));
    expect(pool.size).toBe(2);
    const back = new Uint8Array(await pool.decompress(new Uint8Array(outs[3]!), CLUSTER));
    expect(Buffer.from(back).equals(Buffer.from(data))).toBe(true);
    await expect(pool.decompress(junk(100), CLUSTER)).rejects.toBeInstanceOf(FormatError);
    await pool.close();
    expect(pool.size).toBe(0);
  });

  it('compresses and decompresses through workers, and reports format errors', async () => {
    const codec = await registry.get('zstd');
    const datas = KINDS.concat(KINDS).map((k, i) => makeData(k, CLUSTER, i + 1));
    const cs = await Promise.all(datas.map((d) => codec.compress(d, CLUSTER - 1)));
    const inThread = await new CodecRegistry({ zstdWorkers: 'thread' }).get('zstd');
    for (let i = 0; i < datas.length; i++) {
      expect(Buffer.from(cs[i]!).equals(Buffer.from((await inThread.compress(datas[i]!, CLUSTER - 1))!))).toBe(true);
      const dst = new Uint8Array(CLUSTER);
      await codec.decompress(concat(cs[i]!, junk(100)), dst);
      expect(Buffer.from(dst).equals(Buffer.from(datas[i]!))).toBe(true);
    }
    expect(await codec.compress(makeData('random'), CLUSTER - 1)).toBeNull();
    await expectFormatError(codec.decompress(junk(1000), new Uint8Array(CLUSTER)));
  });

  it('leaves Buffer inputs that share memory with other data intact', async () => {
    const codec = await registry.get('zstd');
    const big = Buffer.from(makeData('text', 4 * CLUSTER, 11));
    const parts = [0, 1, 2, 3].map((i) => big.subarray(i * CLUSTER, (i + 1) * CLUSTER));
    const cs = await Promise.all(parts.map((p) => codec.compress(p, CLUSTER - 1)));
    const stored = Buffer.concat(cs.map((c) => Buffer.concat([c!, Buffer.alloc(100)])));
    let off = 0;
    for (let i = 0; i < 4; i++) {
      const dst = new Uint8Array(CLUSTER);
      await codec.decompress(stored.subarray(off), dst);
      off += cs[i]!.length + 100;
      expect(Buffer.from(dst).equals(parts[i]!)).toBe(true);
    }
    // Not detached (transferred to a worker) nor changed.
    expect(big.length).toBe(4 * CLUSTER);
    expect(big.equals(Buffer.from(makeData('text', 4 * CLUSTER, 11)))).toBe(true);
  });

  it('falls back to in-thread when the worker script cannot run', async () => {
    const codec = await new CodecRegistry({ zstdWorkers: 'workers', zstdPool: { workerPath: path.join(os.tmpdir(), 'no-such-worker.mjs') } }).get('zstd');
    const data = makeData('text');
    const c = (await codec.compress(data, CLUSTER - 1))!;
    const dst = new Uint8Array(CLUSTER);
    await codec.decompress(c, dst);
    expect(Buffer.from(dst).equals(Buffer.from(data))).toBe(true);
  });
});
