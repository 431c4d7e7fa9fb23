import { describe, expect, it } from 'vitest';
import { FormatError } from '../../src/errors.js';
import { loadZstdNative } from '../../src/qcow2/zstd-native.js';
import { loadZstdWasm, zstdCompressSync, zstdDecompressNativeAsync, zstdDecompressSync } from '../../src/qcow2/zstd-wasm.js';
import { CLUSTER, makeData } from './helpers.js';

const native = loadZstdNative();

/** What a decoder makes of src: the bytes, or the error's class and message. */
async function outcome(decode: (dst: Uint8Array) => Promise<void> | void): Promise<string> {
  const dst = new Uint8Array(CLUSTER);
  try {
    await decode(dst);
    return `ok ${Buffer.from(dst).toString('base64')}`;
  } catch (e) {
    return `${(e as Error).constructor.name}: ${(e as Error).message}`;
  }
}

describe.runIf(native !== null)('native zstd decoder (system libzstd)', () => {
  it('decodes exactly as the WebAssembly build, valid and invalid input alike', async () => {
    await loadZstdWasm();
    const inputs: Uint8Array[] = [];
    for (const kind of ['pattern', 'text', 'mixed', 'random'] as const) {
      const c = zstdCompressSync(makeData(kind), CLUSTER * 2)!;
      inputs.push(c, Buffer.concat([c, new Uint8Array(777)]));
      // Corruptions: a flipped byte in the block data, a cut stream, a wrong declared size.
      for (const at of [Math.floor(c.length / 2), c.length - 3, 12]) {
        const bad = new Uint8Array(c);
        bad[at] = bad[at]! ^ 0x5a;
        inputs.push(bad);
      }
      inputs.push(c.subarray(0, c.length - 5));
      const half = zstdCompressSync(makeData(kind).subarray(0, CLUSTER / 2), CLUSTER)!;
      inputs.push(Buffer.concat([half, half]), half);
    }
    for (const src of inputs) {
      const wasm = await outcome((dst) => zstdDecompressSync(src, dst));
      expect(await outcome((dst) => zstdDecompressSync(src, dst, native))).toBe(wasm);
      expect(await outcome((dst) => zstdDecompressNativeAsync(src, dst, native!))).toBe(wasm);
    }
  });

  it('reports failures as FormatError', async () => {
    const dst = new Uint8Array(CLUSTER);
    const bogus = new Uint8Array([0x28, 0xb5, 0x2f, 0xfd, 0x00, 0x00, 0xff, 0xff, 0xff, 0xff]);
    await expect(zstdDecompressNativeAsync(bogus, dst, native!)).rejects.toBeInstanceOf(FormatError);
  });
});

describe.runIf(native !== null)('native zstd decoder under load', () => {
  it('4096 decompressions at once, far more than the calls it keeps in flight, all give the right bytes', async () => {
    await loadZstdWasm();
    const src = zstdCompressSync(makeData('text', 512), 1024)!;
    const outs = Array.from({ length: 4096 }, () => new Uint8Array(512));
    await Promise.all(outs.map((dst) => zstdDecompressNativeAsync(src, dst, native!)));
    for (const o of outs) expect(Buffer.from(o).equals(Buffer.from(makeData('text', 512)))).toBe(true);
  });
});

describe.runIf(native !== null)('native zstd compressor (system libzstd)', () => {
  it('writes one frame with its content size that the WebAssembly build decodes; null-sized when it does not fit', async () => {
    await loadZstdWasm();
    for (const kind of ['pattern', 'text', 'mixed', 'random'] as const) {
      const plain = makeData(kind);
      const dst = new Uint8Array(CLUSTER - 1);
      const n = await native!.compressAsync(dst, plain, 3);
      if (kind === 'random') {
        expect(n).toBe(-70); // ZSTD_error_dstSize_tooSmall: stored uncompressed by the writer
        continue;
      }
      expect(n).toBeGreaterThan(0);
      const frame = dst.subarray(0, n);
      // Frame header descriptor: Frame_Content_Size_flag set (content size recorded, as QEMU writes).
      expect(frame[4]! >> 6).not.toBe(0);
      const out = new Uint8Array(CLUSTER);
      zstdDecompressSync(Buffer.concat([frame, new Uint8Array(300)]), out);
      expect(Buffer.from(out).equals(Buffer.from(plain))).toBe(true);
    }
  });

  it('many concurrent compressions (contexts reused) give the same frames', async () => {
    await loadZstdWasm();
    const plain = makeData('text');
    const outs = await Promise.all(
      Array.from({ length: 200 }, async () => {
        const dst = new Uint8Array(CLUSTER);
        return Buffer.from(dst.subarray(0, await native!.compressAsync(dst, plain, 3)));
      }),
    );
    // Equal, and a frame of the data (a context shared by two calls at once would garble some).
    for (const o of outs) expect(o.equals(outs[0]!)).toBe(true);
    const back = new Uint8Array(CLUSTER);
    zstdDecompressSync(outs[0]!, back);
    expect(Buffer.from(back).equals(Buffer.from(plain))).toBe(true);
  });
});
