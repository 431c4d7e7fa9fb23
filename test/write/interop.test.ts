// Write engine vs QEMU: images made by qemu-img, written through qimg, then `qemu-img check` must
// be clean (no errors, no leaks), `qemu-img convert -O raw` must equal a byte model of the writes,
// and qemu-io must read chosen ranges back.

import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { openImage } from '../../src/open.js';
import type { Image } from '../../src/image.js';
import { KiB, MiB, prng, qemuImg, qemuIo, qemuMap, referenceRaw, run, tmpDir } from '../helpers/qemu.js';

const dir = tmpDir('qimg-write-');
let seq = 0;

async function expectClean(file: string): Promise<string> {
  const r = await run('qemu-img', ['check', file]);
  const out = r.stdout + r.stderr;
  if (r.code !== 0 || !out.includes('No errors were found on the image.') || /leaked/.test(out)) {
    throw new Error(`qemu-img check is not clean (exit ${r.code}):\n${out}`);
  }
  return out;
}

function bytes(rand: () => number, n: number): Uint8Array {
  const b = new Uint8Array(n);
  const v = new DataView(b.buffer);
  for (let i = 0; i + 4 <= n; i += 4) v.setUint32(i, (rand() * 2 ** 32) >>> 0);
  for (let i = n & ~3; i < n; i++) b[i] = (rand() * 256) | 0;
  return b;
}

/** Compressible data (runs of a byte with some noise) so compressed writes really compress. */
function compressible(rand: () => number, n: number): Uint8Array {
  const b = new Uint8Array(n);
  for (let i = 0; i < n; i += 64) b.fill((rand() * 4) | 0, i, Math.min(n, i + 64));
  b[0] = 0x5a;
  return b;
}

interface Shape {
  opts: string;
  size: number;
  clusterSize: number;
  v2?: boolean;
  backing?: boolean;
  dataFile?: boolean;
}

/** Random writes, zero writes, discards and compressed writes mirrored into a model (QEMU's semantics). */
async function randomOps(image: Image, model: Uint8Array, s: Shape, seed: number, count: number, touched = new Set<number>()): Promise<void> {
  const rand = prng(seed);
  const cs = s.clusterSize;
  const size = s.size;
  const touch = (off: number, len: number): void => {
    for (let c = Math.floor(off / cs); c <= Math.floor((off + len - 1) / cs); c++) touched.add(c);
  };
  for (let k = 0; k < count; k++) {
    const r = rand();
    let off = Math.floor(rand() * size);
    if (rand() < 0.4) off = Math.floor(off / cs) * cs + (rand() < 0.5 ? 0 : Math.floor(rand() * 3) - 1);
    off = Math.max(0, Math.min(size - 1, off));
    const len = Math.max(1, Math.min(size - off, Math.floor(rand() * 3.5 * cs) + 1));
    if (r < 0.5) {
      const d = bytes(rand, len);
      await image.write(off, d);
      model.set(d, off);
      touch(off, len);
    } else if (r < 0.68) {
      await image.writeZeroes(off, len, { mayUnmap: rand() < 0.5 });
      model.fill(0, off, off + len);
      touch(off, len);
    } else if (r < 0.82) {
      await image.discard(off, len);
      if (!(s.v2 && s.backing)) {
        const start = Math.ceil(off / cs) * cs;
        const end = off + len === size ? size : Math.floor((off + len) / cs) * cs;
        if (start < end) model.fill(0, start, end);
      }
      touch(off, len);
    } else if (r < 0.95 && !s.dataFile) {
      const c = Math.floor(rand() * Math.ceil(size / cs));
      if (touched.has(c)) continue;
      touched.add(c);
      const n = Math.min(cs, size - c * cs);
      const d = rand() < 0.8 ? compressible(rand, n) : bytes(rand, n);
      await image.writeCompressed(c * cs, d);
      model.set(d, c * cs);
    } else {
      await image.flush();
    }
  }
}

async function makeImage(s: Shape, name: string): Promise<{ file: string; model: Uint8Array }> {
  const file = join(dir, `${name}-${seq++}.qcow2`);
  const model = new Uint8Array(s.size);
  const args = ['create', '-q', '-f', 'qcow2', '-o', s.opts];
  if (s.backing) {
    const base = join(dir, `base-${seq++}.raw`);
    const data = bytes(prng(seq), s.size - 3 * 512); // a little shorter than the overlay
    writeFileSync(base, data);
    model.set(data);
    args.push('-b', base, '-F', 'raw');
  }
  if (s.dataFile) args[args.indexOf('-o') + 1] += `,data_file=${file}.data`;
  await qemuImg([...args, file, String(s.size)]);
  return { file, model };
}

async function verify(file: string, model: Uint8Array): Promise<void> {
  await expectClean(file);
  const ref = new Uint8Array(await referenceRaw(file, { format: 'qcow2' }));
  expect(ref.length).toBe(model.length);
  const same = Buffer.from(ref).equals(Buffer.from(model));
  if (!same) {
    let i = 0;
    while (ref[i] === model[i]) i++;
    throw new Error(`qemu-img convert differs from the model at guest offset ${i} (0x${i.toString(16)})`);
  }
}

const SHAPES: Shape[] = [
  { opts: 'cluster_size=512', size: 300 * KiB, clusterSize: 512 },
  { opts: 'cluster_size=512,refcount_bits=1', size: 200 * KiB, clusterSize: 512 },
  { opts: 'cluster_size=4096,refcount_bits=2', size: MiB, clusterSize: 4096 },
  { opts: 'cluster_size=4096,refcount_bits=4', size: MiB, clusterSize: 4096 },
  { opts: 'cluster_size=4096,refcount_bits=8', size: MiB + 1536, clusterSize: 4096 },
  { opts: 'cluster_size=65536,refcount_bits=32', size: 4 * MiB, clusterSize: 65536 },
  { opts: 'cluster_size=65536,refcount_bits=64', size: 4 * MiB, clusterSize: 65536 },
  { opts: 'cluster_size=2097152', size: 12 * MiB, clusterSize: 2 * MiB },
  { opts: 'compat=0.10,cluster_size=4096', size: MiB, clusterSize: 4096, v2: true },
  { opts: 'compat=0.10,cluster_size=4096', size: MiB, clusterSize: 4096, v2: true, backing: true },
  { opts: 'extended_l2=on,cluster_size=65536', size: 4 * MiB, clusterSize: 65536 },
  { opts: 'extended_l2=on,cluster_size=16384,refcount_bits=1', size: MiB + 512, clusterSize: 16384 },
  { opts: 'extended_l2=on,cluster_size=65536', size: 4 * MiB, clusterSize: 65536, backing: true },
  { opts: 'lazy_refcounts=on,cluster_size=4096', size: MiB, clusterSize: 4096 },
  { opts: 'cluster_size=4096', size: MiB, clusterSize: 4096, backing: true },
  { opts: 'compression_type=zstd,cluster_size=4096', size: MiB, clusterSize: 4096 },
  { opts: 'cluster_size=65536', size: 4 * MiB, clusterSize: 65536, dataFile: true },
  { opts: 'cluster_size=65536,extended_l2=on', size: 4 * MiB, clusterSize: 65536, dataFile: true, backing: true },
];

describe('qcow2 writes: qemu-img check clean, convert equals the model', () => {
  for (const s of SHAPES) {
    const label = `${s.opts}${s.backing ? ' +backing' : ''}${s.dataFile ? ' +data_file' : ''} (${s.size} bytes)`;
    it(label, async () => {
      const { file, model } = await makeImage(s, 'ops');
      const touched = new Set<number>();
      for (let round = 0; round < 2; round++) {
        const { image } = await openImage(file, { readOnly: false });
        expect(image.readOnly).toBe(false);
        await randomOps(image, model, s, 1000 + round * 7 + seq, 60, touched);
        const own = await image.read(0, image.virtualSize);
        expect(Buffer.from(own).equals(Buffer.from(model))).toBe(true);
        await image.close();
      }
      await verify(file, model);
    });
  }
});

describe('growth', () => {
  it('refcount table growth and many refcount blocks (512-byte clusters, 64-bit refcounts)', async () => {
    const s: Shape = { opts: 'cluster_size=512,refcount_bits=64', size: 8 * MiB, clusterSize: 512 };
    const { file, model } = await makeImage(s, 'reftable');
    const clustersBefore = readFileSync(file).readUInt32BE(56);
    const { image } = await openImage(file, { readOnly: false });
    const rand = prng(7);
    // Sequential multi-cluster writes, then scattered small ones.
    for (let off = 0; off < 6 * MiB; off += 96 * KiB) {
      const d = bytes(rand, 96 * KiB);
      await image.write(off, d);
      model.set(d, off);
    }
    for (let k = 0; k < 200; k++) {
      const off = Math.floor(rand() * (s.size - 700));
      const d = bytes(rand, 700);
      await image.write(off, d);
      model.set(d, off);
    }
    await image.close();
    await verify(file, model);
    // refcount_table_clusters grew (a fresh image has one).
    expect(clustersBefore).toBe(1);
    expect(readFileSync(file).readUInt32BE(56)).toBeGreaterThan(1);
  });

  it('resize grows the L1 table (relocated) and shrinks with shrink: true', async () => {
    const s: Shape = { opts: 'cluster_size=512', size: 64 * KiB, clusterSize: 512 };
    const { file } = await makeImage(s, 'resize');
    const l1 = (): { size: number; offset: bigint } => {
      const h = readFileSync(file);
      return { size: h.readUInt32BE(36), offset: h.readBigUInt64BE(40) };
    };
    const l1Before = l1();
    let model: Uint8Array = new Uint8Array(s.size);
    const rand = prng(3);
    {
      const { image } = await openImage(file, { readOnly: false });
      const d = bytes(rand, s.size);
      await image.write(0, d);
      model.set(d);
      await image.resize(4 * MiB);
      expect(image.virtualSize).toBe(4 * MiB);
      const grown = new Uint8Array(4 * MiB);
      grown.set(model);
      model = grown;
      const e = bytes(rand, 100 * KiB);
      await image.write(3 * MiB + 100, e);
      model.set(e, 3 * MiB + 100);
      await expect(image.resize(MiB)).rejects.toThrow(/shrink/);
      await expect(image.write(4 * MiB - 10, new Uint8Array(20))).rejects.toThrow(/outside/);
      await image.close();
    }
    await verify(file, model);
    // An L1 entry covers 32 KiB at 512-byte clusters: 4 MiB needs 128 entries, two clusters of
    // table where the 64 KiB disk had one, so the table moved.
    const l1After = l1();
    expect(l1Before.size).toBe(2);
    expect(l1After.size).toBe(128);
    expect(l1After.offset).not.toBe(l1Before.offset);
    {
      const { image } = await openImage(file, { readOnly: false });
      await image.resize(MiB - 512 * 3, { shrink: true });
      await image.close();
    }
    await verify(file, model.subarray(0, MiB - 512 * 3));
  });
});

describe('qemu-io reads what qimg wrote', () => {
  it('ranges across cluster and subcluster boundaries', async () => {
    const s: Shape = { opts: 'cluster_size=65536,extended_l2=on', size: 4 * MiB, clusterSize: 65536 };
    const { file } = await makeImage(s, 'qemu-io');
    const { image } = await openImage(file, { readOnly: false });
    await image.write(65536 - 100, new Uint8Array(300).fill(0x11));
    await image.write(3 * 2048 + 5, new Uint8Array(4000).fill(0x22));
    await image.writeZeroes(65536, 2048);
    await image.writeCompressed(10 * 65536, new Uint8Array(65536).fill(0x33));
    await image.close();
    await expectClean(file);
    // A compressed cluster (qemu-img map gives no host offset for those), not a plain write.
    const at = (await qemuMap(file)).find((e) => e.start <= 655360 && 655360 < e.start + e.length);
    expect(at).toMatchObject({ data: true, present: true, depth: 0 });
    expect(at?.offset).toBeUndefined();
    await qemuIo(file, [
      'read -P 0x11 65436 100', 'read -P 0 65536 2048', 'read -P 0x22 6149 4000',
      'read -P 0 0 6149', 'read -P 0x33 655360 65536', 'read -P 0 720896 65536',
    ]);
  });
});

describe('internal snapshots: shared clusters are copied on write', () => {
  it('writes after qemu-img snapshot -c leave the snapshot intact', async () => {
    const s: Shape = { opts: 'cluster_size=4096', size: MiB, clusterSize: 4096 };
    const { file, model } = await makeImage(s, 'snap');
    await qemuIo(file, ['write -P 0x44 0 512k', 'write -c -P 0x45 512k 8k']);
    model.fill(0x44, 0, 512 * KiB);
    model.fill(0x45, 512 * KiB, 520 * KiB);
    const snap = model.slice();
    await qemuImg(['snapshot', '-c', 's1', file]);
    const { image } = await openImage(file, { readOnly: false });
    const prefilled = new Set<number>();
    for (let c = 0; c < 130; c++) prefilled.add(c);
    await randomOps(image, model, s, 99, 80, prefilled);
    await image.close();
    await verify(file, model);
    const ref = new Uint8Array(await referenceRaw(file, { format: 'qcow2', snapshot: { name: 's1' } }));
    expect(Buffer.from(ref).equals(Buffer.from(snap))).toBe(true);
    // v3 images with snapshots resize (the snapshot keeps its own size); shared clusters lose one reference.
    const { image: again } = await openImage(file, { readOnly: false });
    await again.resize(256 * KiB, { shrink: true });
    await again.resize(2 * MiB);
    await again.close();
    const expected = new Uint8Array(2 * MiB);
    expected.set(model.subarray(0, 256 * KiB));
    await verify(file, expected);
    const ref2 = new Uint8Array(await referenceRaw(file, { format: 'qcow2', snapshot: { name: 's1' } }));
    expect(Buffer.from(ref2.subarray(0, MiB)).equals(Buffer.from(snap))).toBe(true);
  });
});

describe('open rules', () => {
  it('refuses writable opening of a corrupt image with QEMU message', async () => {
    const { file } = await makeImage({ opts: 'cluster_size=4096', size: MiB, clusterSize: 4096 }, 'corrupt');
    const h = readFileSync(file);
    h[79] |= 2;
    writeFileSync(file, h);
    await expect(openImage(file, { readOnly: false })).rejects.toThrow('qcow2: Image is corrupt; cannot be opened read/write');
  });

  it('rebuilds refcounts of a dirty image opened writable, clears unknown autoclear bits', async () => {
    const { file } = await makeImage({ opts: 'cluster_size=4096,lazy_refcounts=on', size: MiB, clusterSize: 4096 }, 'dirty');
    await qemuIo(file, ['write -P 0x66 0 64k']);
    // Stale refcounts, as a crash with lazy refcounts leaves them: the last data cluster counts 0
    // (16-bit refcounts; one refcount block). Unrepaired, the next allocation would take it.
    const last = (await qemuMap(file)).find((e) => e.start === 0)!;
    const victim = (last.offset! + last.length) / 4096 - 1;
    const h = readFileSync(file);
    const refblock = Number(h.readBigUInt64BE(Number(h.readBigUInt64BE(48))));
    h.writeUInt16BE(0, refblock + 2 * victim);
    h[79] |= 1; // dirty
    h[88 + 7] |= 0x80; // unknown autoclear bit 7
    writeFileSync(file, h);
    const broken = await run('qemu-img', ['check', file]);
    expect(broken.stdout + broken.stderr).toContain(`ERROR cluster ${victim} refcount=0 reference=1`);
    const { image } = await openImage(file, { readOnly: false });
    await image.write(100 * KiB, new Uint8Array(10).fill(1));
    await image.close();
    const after = readFileSync(file);
    expect(after[79]! & 1).toBe(0);
    expect(after[95]! & 0x80).toBe(0);
    await expectClean(file);
    await qemuIo(file, ['read -P 0x66 0 64k', 'read -P 1 102400 10']);
  });

  it('compressed writes refuse allocated clusters; writes beyond the end are usage errors', async () => {
    const { file } = await makeImage({ opts: 'cluster_size=4096', size: MiB, clusterSize: 4096 }, 'refuse');
    const { image } = await openImage(file, { readOnly: false });
    await image.write(0, new Uint8Array(10).fill(1));
    await expect(image.writeCompressed(0, new Uint8Array(4096))).rejects.toThrow(/allocated/);
    await expect(image.write(MiB, new Uint8Array(1))).rejects.toThrow(/outside/);
    await image.close();
    await expectClean(file);
    const ro = await openImage(file);
    await expect(ro.image.write(0, new Uint8Array(1))).rejects.toThrow(/read-only/);
    await ro.image.close();
  });
});

describe('raw', () => {
  it('write, writeZeroes, discard, resize', async () => {
    const file = join(dir, 'disk.raw');
    writeFileSync(file, new Uint8Array(MiB).fill(7));
    const model = new Uint8Array(MiB).fill(7);
    const { image } = await openImage(file, { readOnly: false, format: 'raw' });
    await image.write(1000, new Uint8Array(5000).fill(9));
    model.fill(9, 1000, 6000);
    await image.writeZeroes(64 * KiB, 128 * KiB, { mayUnmap: true });
    model.fill(0, 64 * KiB, 192 * KiB);
    await image.writeZeroes(300 * KiB + 3, 5000);
    model.fill(0, 300 * KiB + 3, 300 * KiB + 5003);
    await image.discard(512 * KiB, 64 * KiB);
    model.fill(0, 512 * KiB, 576 * KiB);
    await image.resize(2 * MiB);
    await image.close();
    const got = readFileSync(file);
    expect(got.length).toBe(2 * MiB);
    expect(got.subarray(0, MiB).equals(Buffer.from(model))).toBe(true);
    expect(got.subarray(MiB).every((b) => b === 0)).toBe(true);
  });
});

describe('persistent bitmaps stay consistent', () => {
  it('enabled bitmaps get the dirty bits of every write; check stays clean; in_use cleared on close', async () => {
    const { parseHeader } = await import('../../src/qcow2/header.js');
    const { file, model } = await makeImage({ opts: 'cluster_size=65536', size: 64 * MiB, clusterSize: 65536 }, 'bitmap');
    await qemuImg(['bitmap', '--add', '-g', '65536', file, 'b0']);
    await qemuImg(['bitmap', '--add', '--disable', file, 'off']);
    const { image } = await openImage(file, { readOnly: false });
    await image.write(3 * 65536 + 100, new Uint8Array(10).fill(1));
    model.fill(1, 3 * 65536 + 100, 3 * 65536 + 110);
    await image.writeZeroes(40 * MiB, 3 * 65536);
    await image.discard(50 * MiB, 65536);
    await image.flush();
    // While open the enabled bitmap is in use, as in QEMU.
    let info = JSON.parse((await qemuImg(['info', '-U', '--output=json', file])).stdout);
    expect(info['format-specific'].data.bitmaps.find((b: { name: string }) => b.name === 'b0').flags).toEqual(['in-use', 'auto']);
    await image.close();
    info = JSON.parse((await qemuImg(['info', '--output=json', file])).stdout);
    const flags = Object.fromEntries(info['format-specific'].data.bitmaps.map((b: { name: string; flags: string[] }) => [b.name, b.flags]));
    expect(flags).toEqual({ b0: ['auto'], off: [] });
    await verify(file, model);
    // Read b0's bits: granularity 64 KiB, one data cluster covers the whole 64 MiB disk.
    const buf = readFileSync(file);
    const h = parseHeader(new Uint8Array(buf.subarray(0, 65536)));
    const dirOff = h.bitmaps!.directoryOffset;
    const tableOff = Number(buf.readBigUInt64BE(dirOff) & 0x00fffffffffffe00n);
    const dataOff = Number(buf.readBigUInt64BE(tableOff) & 0x00fffffffffffe00n);
    expect(dataOff).toBeGreaterThan(0);
    const set: number[] = [];
    for (let bit = 0; bit < 1024; bit++) if (buf[dataOff + (bit >> 3)]! & (1 << (bit & 7))) set.push(bit);
    expect(set).toEqual([3, 640, 641, 642, 800]);
  });
});
