// Interop: images made by the real qemu-img / qemu-io, read back through qimg; every byte must be
// what `qemu-img convert -O raw` produces. One describe per rule; each data-layout case also runs
// on `qemu-img convert -c` copies (zlib and zstd), as go-qcow2reader's tests do. Every case makes
// its own files, so the describes are concurrent: a few cases at a time, one's qemu-img processes
// overlapping another's reads (vitest gives a 2-core machine a single worker).

import { randomBytes } from 'node:crypto';
import { closeSync, mkdirSync, openSync, readSync, writeFileSync, writeSync } from 'node:fs';
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { FileStorage } from '../../src/io/file.js';
import { openImage, type OpenImageOptions } from '../../src/open.js';
import {
  KiB,
  MiB,
  TiB,
  expectSameBytes,
  expectSameBytesSampled,
  expectSameMap,
  open,
  qemuImg,
  qemuInfo,
  qemuIo,
  qemuMap,
  referenceRaw,
  tmpDir,
  withImage,
} from '../helpers/qemu.js';

type Format = 'qcow2' | 'raw';
interface Built {
  file: string;
  format: Format;
}

const dir = tmpDir('qimg-interop-read-');
let seq = 0;
const path = (name: string): string => join(dir, `${seq++}-${name}`);

/** A file of random bytes that `qemu-io write -s` copies from (incompressible data). */
const randomSource = join(dir, 'random.bin');
writeFileSync(randomSource, randomBytes(4 * MiB));
/** Half-compressible data: random bytes interleaved with runs of text. */
const mixedSource = join(dir, 'mixed.bin');
{
  const b = Buffer.alloc(4 * MiB);
  const r = randomBytes(b.length);
  for (let i = 0; i < b.length; i += 256) {
    if ((i >> 8) % 2 === 0) r.copy(b, i, i, i + 256);
    else b.write('qimg reads what qemu wrote. '.repeat(10), i, 256, 'latin1');
  }
  writeFileSync(mixedSource, b);
}

async function create(file: string, size: number | string, opts: string[] = [], format: Format = 'qcow2', extra: string[] = []): Promise<void> {
  const args = ['create', '-q', '-f', format];
  if (opts.length) args.push('-o', opts.join(','));
  args.push(...extra, file, String(size));
  await qemuImg(args);
}

/** Fewer than expectSameBytes' 64 unaligned random reads: the sequential pass reads every byte anyway. */
const RANDOM_READS = 24;

async function check(file: string, format: Format, openOptions: OpenImageOptions = {}, reference?: Uint8Array, map = !reference): Promise<void> {
  const label = file.slice(dir.length + 1);
  await withImage(file, { format, ...openOptions }, async (image) => {
    await expectSameBytes(image, file, { format, reference, label, randomReads: RANDOM_READS });
    // The allocation map too, as qemu-img map reports it (not for a snapshot or a cut-off chain).
    if (map && !openOptions.snapshot && !openOptions.noBacking) await expectSameMap(image, file, format, label);
  });
}

/**
 * Registers the case plus its `qemu-img convert -c` copies (zlib and zstd). build runs once per
 * case (memoised) and returns the image it made; so does QEMU's reading of it (`qemu-img convert
 * -O raw`, kept as a file beside the image, not in memory), which is also what the copies must
 * read as: qemu-img convert keeps the guest bytes, so one reference serves the three (each copy
 * still gets its own qemu-img map comparison).
 */
function layout(title: string, build: () => Promise<Built>): void {
  let built: Promise<Built> | undefined;
  let referenceFile: Promise<string> | undefined;
  const get = (): Promise<Built> => (built ??= build());
  const reference = async (): Promise<Buffer> => {
    referenceFile ??= get().then(async ({ file, format }) => {
      const out = `${file}.reference.raw`;
      await qemuImg(['convert', '-f', format, '-O', 'raw', file, out]);
      return out;
    });
    return readFile(await referenceFile);
  };
  it(title, async () => {
    const { file, format } = await get();
    await check(file, format, {}, await reference(), true);
  });
  for (const ct of ['zlib', 'zstd'] as const) {
    it(`${title} [qemu-img convert -c, ${ct} copy]`, async () => {
      const { file, format } = await get();
      const copy = `${file}.c-${ct}.qcow2`;
      await qemuImg(['convert', '-c', '-f', format, '-O', 'qcow2', '-o', `compression_type=${ct}`, file, copy]);
      await check(copy, 'qcow2', {}, await reference(), true);
    });
  }
}

/** Writes at unaligned offsets relative to the cluster size: partial, crossing, zero, discard, end. */
function patternCmds(cs: number, size: number, options: { zero?: boolean; discard?: boolean } = {}): string[] {
  const cmds = [
    `write -P 0x11 0 ${cs}`,
    `write -P 0x22 ${cs + 1} 7`,
    `write -P 0x33 ${2 * cs - 3} 9`,
    `write -s ${randomSource} ${4 * cs + 100} ${Math.min(3 * cs + 17, 3 * MiB)}`,
    `write -s ${mixedSource} ${8 * cs - 5} ${Math.min(cs + 10, 3 * MiB)}`,
    `write -P 0x55 ${size - 1000} 1000`,
  ];
  if (options.zero !== false) cmds.push(`write -z ${5 * cs} ${cs}`, `write -z ${4 * cs + 200} 300`, `write -z -u ${6 * cs} ${cs}`);
  if (options.discard !== false) cmds.push(`discard ${9 * cs} ${cs}`, `discard ${cs} ${cs}`);
  return cmds;
}

const sizeFor = (cs: number): number => Math.max(4 * MiB, 12 * cs);

describe.concurrent('cluster sizes 512 B … 2 MiB: data qemu-io wrote at unaligned offsets reads back identically', () => {
  for (const cs of [512, 1 * KiB, 4 * KiB, 64 * KiB, 2 * MiB]) {
    layout(`cluster_size=${cs}`, async () => {
      const file = path(`cs${cs}.qcow2`);
      const size = sizeFor(cs);
      await create(file, size, [`cluster_size=${cs}`]);
      await qemuIo(file, patternCmds(cs, size));
      return { file, format: 'qcow2' };
    });
  }
});

describe.concurrent('compat=0.10 (version 2 header, 72 bytes, no zero flag)', () => {
  layout('v2 image with data, zero writes and discards', async () => {
    const file = path('v2.qcow2');
    await create(file, 4 * MiB, ['compat=0.10']);
    await qemuIo(file, patternCmds(64 * KiB, 4 * MiB));
    return { file, format: 'qcow2' };
  });
  layout('v2 overlay: write -z over backing data must write real zeros (no zero flag in v2)', async () => {
    const base = path('v2-base.qcow2');
    await create(base, 4 * MiB, ['compat=0.10']);
    await qemuIo(base, [`write -P 0xbb 0 ${4 * MiB}`]);
    const top = path('v2-top.qcow2');
    await create(top, 4 * MiB, ['compat=0.10', `backing_file=${base}`, 'backing_fmt=qcow2']);
    await qemuIo(top, patternCmds(64 * KiB, 4 * MiB));
    return { file: top, format: 'qcow2' };
  });
});

describe.concurrent('refcount_bits 1 … 64 do not change what the guest reads', () => {
  for (const bits of [1, 2, 4, 8, 16, 32, 64]) {
    layout(`refcount_bits=${bits}`, async () => {
      const file = path(`rc${bits}.qcow2`);
      await create(file, 2 * MiB, [`refcount_bits=${bits}`, 'cluster_size=4096']);
      await qemuIo(file, [...patternCmds(4096, 2 * MiB), 'write -c -P 0x66 65536 8192']);
      return { file, format: 'qcow2' };
    });
  }
});

describe.concurrent('zero clusters (v3 zero flag) read as zeros and hide the backing file', () => {
  layout('write -z over a backing file full of 0xbb', async () => {
    const base = path('zero-base.qcow2');
    await create(base, 4 * MiB);
    await qemuIo(base, [`write -P 0xbb 0 ${4 * MiB}`]);
    const top = path('zero-top.qcow2');
    await create(top, 4 * MiB, ['backing_file=' + base, 'backing_fmt=qcow2']);
    await qemuIo(top, [
      'write -z 0 64k',
      'write -z -u 128k 128k',
      'write -z 300000 5000', // unaligned: partial clusters get real zeros
      'write -P 0x12 1M 64k',
      'write -z 1M 64k', // zero flag over an allocated cluster (ZERO_ALLOC)
    ]);
    return { file: top, format: 'qcow2' };
  });
});

describe.concurrent('discard: v3 discards over a backing file keep reading as zeros, without backing read as zeros', () => {
  layout('discard over allocated data and over backing', async () => {
    const base = path('disc-base.qcow2');
    await create(base, 4 * MiB);
    await qemuIo(base, [`write -P 0xcc 0 ${4 * MiB}`]);
    const top = path('disc-top.qcow2');
    await create(top, 4 * MiB, ['backing_file=' + base, 'backing_fmt=qcow2']);
    await qemuIo(top, ['write -P 0x21 0 1M', 'discard 64k 192k', 'discard 1M 1M', 'discard 3000 100']);
    return { file: top, format: 'qcow2' };
  });
  layout('discard without backing', async () => {
    const file = path('disc.qcow2');
    await create(file, 4 * MiB);
    await qemuIo(file, ['write -P 0x21 0 2M', 'discard 64k 192k', 'discard 3000 100']);
    return { file, format: 'qcow2' };
  });
});

describe.concurrent('compressed clusters (zlib raw deflate windowBits 12, zstd frames)', () => {
  for (const ct of ['zlib', 'zstd'] as const) {
    for (const cs of [512, 4 * KiB, 64 * KiB, 2 * MiB]) {
      it(`qemu-img convert -c -o compression_type=${ct},cluster_size=${cs} of mixed data`, async () => {
        const raw = path(`csrc-${ct}-${cs}.raw`);
        const size = cs === 2 * MiB ? 8 * MiB : 2 * MiB + 4096;
        await create(raw, size, [], 'raw');
        await qemuIo(raw, [
          `write -s ${mixedSource} 0 ${Math.min(size, 3 * MiB)}`,
          `write -s ${randomSource} 100000 70000`, // incompressible: stored uncompressed
          `write -z 1M 100000`,
        ], { format: 'raw' });
        const file = path(`c-${ct}-${cs}.qcow2`);
        await qemuImg(['convert', '-c', '-f', 'raw', '-O', 'qcow2', '-o', `compression_type=${ct},cluster_size=${cs}`, raw, file]);
        await check(file, 'qcow2');
      });
    }
    it(`qemu-io write -c (${ct}), cluster-aligned, next to plain and zero clusters and over a backing file`, async () => {
      const base = path(`wc-base-${ct}.qcow2`);
      await create(base, 2 * MiB);
      await qemuIo(base, [`write -P 0x5a 0 ${2 * MiB}`]);
      const file = path(`wc-${ct}.qcow2`);
      await create(file, 2 * MiB, [`compression_type=${ct}`, `backing_file=${base}`, 'backing_fmt=qcow2']);
      await qemuIo(file, [
        `write -c -s ${mixedSource} 0 64k`,
        'write -c -P 0x01 64k 64k',
        `write -c -s ${randomSource} 128k 64k`, // does not compress: written plain
        'write -P 0x02 192k 64k',
        'write -z 256k 64k',
        `write -c -s ${mixedSource} 512k 256k`,
        `write -c -P 0x03 ${2 * MiB - 64 * KiB} 64k`,
      ]);
      await check(file, 'qcow2');
    });
  }
  it('compressed last cluster of a disk whose size is not a cluster multiple', async () => {
    const file = path('c-tail.qcow2');
    await create(file, 1 * MiB + 1536);
    await qemuIo(file, [`write -c -s ${mixedSource} ${MiB} 1536`]);
    await check(file, 'qcow2');
  });
});

describe.concurrent('extended L2 entries (32 subclusters per cluster)', () => {
  for (const cs of [64 * KiB, 2 * MiB]) {
    const sc = cs / 32;
    layout(`extended_l2=on cluster_size=${cs}: subcluster-sized data and zero writes`, async () => {
      const file = path(`el2-${cs}.qcow2`);
      const size = cs === 2 * MiB ? 8 * MiB : 4 * MiB;
      await create(file, size, ['extended_l2=on', `cluster_size=${cs}`]);
      await qemuIo(file, [
        `write -P 0x41 0 ${sc}`,
        `write -P 0x42 ${3 * sc} ${2 * sc}`,
        `write -P 0x43 ${5 * sc + 7} 100`,
        `write -z ${sc} ${sc}`,
        `write -P 0x44 ${cs + 31 * sc} ${2 * sc}`, // crosses into the next cluster
        `write -z ${2 * cs} ${4 * sc}`,
        `write -s ${mixedSource} ${3 * cs + sc / 2} ${sc * 3}`,
        `discard ${3 * cs} ${sc}`,
      ]);
      return { file, format: 'qcow2' };
    });
    layout(`extended_l2=on cluster_size=${cs} over a backing file: unallocated subclusters fall through`, async () => {
      const size = cs === 2 * MiB ? 8 * MiB : 4 * MiB;
      const base = path(`el2-base-${cs}.qcow2`);
      await create(base, size);
      await qemuIo(base, [`write -s ${randomSource} 0 ${Math.min(size, 4 * MiB)}`, ...(size > 4 * MiB ? [`write -P 0xb0 ${4 * MiB} ${size - 4 * MiB}`] : [])]);
      const file = path(`el2-top-${cs}.qcow2`);
      await create(file, size, ['extended_l2=on', `cluster_size=${cs}`, `backing_file=${base}`, 'backing_fmt=qcow2']);
      await qemuIo(file, [
        `write -P 0x41 ${sc} ${sc}`,
        `write -P 0x42 ${4 * sc} ${3 * sc}`,
        `write -z ${10 * sc} ${2 * sc}`,
        `write -P 0x43 ${cs + 3} ${sc}`, // unaligned in a subcluster: COW from backing
        `write -z ${2 * cs + 5 * sc} ${sc}`,
        `discard ${4 * sc} ${sc}`,
      ]);
      return { file, format: 'qcow2' };
    });
  }
});

describe.concurrent('backing chains', () => {
  layout('depth 3: raw base <- qcow2 <- qcow2, backing formats given with -F', async () => {
    const base = path('chain-base.raw');
    await create(base, 4 * MiB, [], 'raw');
    await qemuIo(base, [`write -s ${randomSource} 0 ${4 * MiB}`], { format: 'raw' });
    const mid = path('chain-mid.qcow2');
    await create(mid, 4 * MiB, [], 'qcow2', ['-b', base, '-F', 'raw']);
    await qemuIo(mid, ['write -P 0x61 64k 256k', 'write -z 1M 64k', 'write -P 0x62 3000 10']);
    const top = path('chain-top.qcow2');
    await create(top, 4 * MiB, ['cluster_size=4096'], 'qcow2', ['-b', mid, '-F', 'qcow2']);
    await qemuIo(top, ['write -P 0x71 128k 4k', 'write -z 200k 8k', 'write -P 0x72 1M 4097', 'discard 2M 64k']);
    return { file: top, format: 'qcow2' };
  });
  layout('depth 3: qcow2 <- qcow2 <- qcow2, with different cluster sizes', async () => {
    const a = path('c3-a.qcow2');
    await create(a, 4 * MiB, ['cluster_size=512']);
    await qemuIo(a, [`write -s ${mixedSource} 0 ${4 * MiB}`]);
    const b = path('c3-b.qcow2');
    await create(b, 4 * MiB, ['cluster_size=2M'], 'qcow2', ['-b', a, '-F', 'qcow2']);
    await qemuIo(b, ['write -P 0x62 2M 1000']);
    const c = path('c3-c.qcow2');
    await create(c, 4 * MiB, ['cluster_size=64k', 'compat=0.10'], 'qcow2', ['-b', b, '-F', 'qcow2']);
    await qemuIo(c, ['write -P 0x63 0 1000', 'write -c -P 0x64 64k 64k']);
    return { file: c, format: 'qcow2' };
  });
  it('relative backing path resolves against the overlay directory, not the cwd', async () => {
    const sub = path('rel');
    mkdirSync(join(sub, 'base'), { recursive: true });
    await create(join(sub, 'base', 'b.qcow2'), 2 * MiB);
    await qemuIo(join(sub, 'base', 'b.qcow2'), ['write -P 0x31 0 2M']);
    // The name stored in the header is "base/b.qcow2" (relative to the overlay's directory).
    await qemuImg(['create', '-q', '-f', 'qcow2', '-b', 'base/b.qcow2', '-F', 'qcow2', 'top.qcow2', '2M'], { cwd: sub });
    await qemuIo(join(sub, 'top.qcow2'), ['write -P 0x32 64k 64k']);
    const info = await qemuInfo(join(sub, 'top.qcow2'));
    expect(info['backing-filename']).toBe('base/b.qcow2');
    await check(join(sub, 'top.qcow2'), 'qcow2');
  });
  it('backing format probed when no backing format extension is recorded (extension list cut)', async () => {
    const base = path('probe-base.qcow2');
    await create(base, 2 * MiB);
    await qemuIo(base, ['write -P 0x44 0 2M']);
    const top = path('probe-top.qcow2');
    await create(top, 2 * MiB, [], 'qcow2', ['-b', base, '-F', 'qcow2']);
    await qemuIo(top, ['write -P 0x45 1M 4k']);
    // qemu-img 7.2 refuses to create this ("Backing file specified without backing format"), so
    // end the extension list where the backing-format extension (0xE2792ACA) starts.
    const fd = openSync(top, 'r+');
    try {
      const hdr = Buffer.alloc(4096);
      readSync(fd, hdr, 0, 4096, 0);
      const extAt = hdr.readUInt32BE(100);
      expect(hdr.readUInt32BE(extAt)).toBe(0xe2792aca);
      writeSync(fd, Buffer.alloc(8), 0, 8, extAt);
    } finally {
      closeSync(fd);
    }
    const info = await qemuInfo(top);
    expect(info['backing-filename-format']).toBeUndefined();
    await check(top, 'qcow2');
  });
  layout('backing shorter than the overlay (overlay grown with qemu-img resize): past its end reads zeros', async () => {
    const base = path('short-base.qcow2');
    await create(base, 1 * MiB + 512);
    await qemuIo(base, [`write -P 0x51 0 ${MiB + 512}`]);
    const top = path('short-top.qcow2');
    await create(top, 1 * MiB + 512, [], 'qcow2', ['-b', base, '-F', 'qcow2']);
    await qemuImg(['resize', '-q', top, String(4 * MiB)]);
    await qemuIo(top, ['write -P 0x52 1000 10', `write -P 0x53 ${3 * MiB} 100`]);
    return { file: top, format: 'qcow2' };
  });
  layout('raw backing whose size is not a cluster multiple (unaligned raw base)', async () => {
    const base = path('unal-base.raw');
    writeFileSync(base, randomBytes(MiB + 1536));
    const top = path('unal-top.qcow2');
    await create(top, 2 * MiB, [], 'qcow2', ['-b', base, '-F', 'raw']);
    await qemuIo(top, ['write -P 0x54 0 4k']);
    return { file: top, format: 'qcow2' };
  });
  layout('backing longer than the overlay', async () => {
    const base = path('long-base.qcow2');
    await create(base, 4 * MiB);
    await qemuIo(base, [`write -P 0x57 0 ${4 * MiB}`]);
    const top = path('long-top.qcow2');
    await create(top, 1 * MiB, [], 'qcow2', ['-b', base, '-F', 'qcow2']);
    await qemuIo(top, ['write -P 0x58 4k 4k']);
    return { file: top, format: 'qcow2' };
  });
  it('noBacking: unallocated ranges read as zeros (qemu-img convert -B style is not used; compare with backing-less qemu view)', async () => {
    const base = path('nb-base.qcow2');
    await create(base, 2 * MiB);
    await qemuIo(base, ['write -P 0x59 0 2M']);
    const top = path('nb-top.qcow2');
    await create(top, 2 * MiB, [], 'qcow2', ['-b', base, '-F', 'qcow2']);
    await qemuIo(top, ['write -P 0x5a 64k 64k', 'write -z 256k 64k']);
    // QEMU's view without the backing file: json filename with backing=null.
    const spec = JSON.stringify({ driver: 'qcow2', backing: null, file: { driver: 'file', filename: top } });
    const ref = await referenceRaw(`json:${spec}`);
    await check(top, 'qcow2', { noBacking: true }, ref);
  });
});

describe.concurrent('internal snapshots: each snapshot reads as it was when taken', () => {
  it('qemu-img snapshot -c s1, more writes, -c s2, more writes: active, s1 (by name and id), s2', async () => {
    const file = path('snap.qcow2');
    await create(file, 4 * MiB, ['cluster_size=4096']);
    await qemuIo(file, ['write -P 0x01 0 1M', `write -s ${mixedSource} 2M 100000`]);
    await qemuImg(['snapshot', '-c', 's1', file]);
    await qemuIo(file, ['write -P 0x02 64k 64k', 'write -z 512k 64k', 'discard 2M 64k', 'write -c -P 0x03 3M 64k']);
    await qemuImg(['snapshot', '-c', 's2', file]);
    await qemuIo(file, ['write -P 0x04 0 4k', `write -P 0x05 ${3 * MiB + 5} 4k`]);
    await check(file, 'qcow2');
    for (const [snapshot, label] of [
      [{ name: 's1' }, 's1'],
      [{ id: '1' }, 'id 1'],
      [{ name: 's2' }, 's2'],
    ] as const) {
      const ref = await referenceRaw(file, { format: 'qcow2', snapshot });
      await withImage(file, { format: 'qcow2', snapshot }, (image) =>
        expectSameBytes(image, file, { reference: ref, label: `snap.qcow2 snapshot ${label}` }),
      );
    }
  });
  it('snapshot taken before qemu-img resize: bytes match; size is what qemu-img convert -l outputs (the current size)', async () => {
    const file = path('snap-resized.qcow2');
    await create(file, 2 * MiB);
    await qemuIo(file, ['write -P 0x06 0 2M']);
    await qemuImg(['snapshot', '-c', 'small', file]);
    await qemuImg(['resize', '-q', file, String(4 * MiB)]);
    await qemuIo(file, ['write -P 0x07 3M 4k']);
    await check(file, 'qcow2');
    const ref = await referenceRaw(file, { snapshot: { name: 'small' } });
    await withImage(file, { format: 'qcow2', snapshot: { name: 'small' } }, async (image) => {
      const common = Math.min(image.virtualSize, ref.length);
      expect(Buffer.from(await image.read(0, common)).equals(ref.subarray(0, common))).toBe(true);
      // QEMU 7.2 (qcow2_snapshot_load_tmp) keeps the active image's size: convert -l writes 4 MiB.
      expect(image.virtualSize, 'snapshot virtual size vs qemu-img convert -l output length').toBe(ref.length);
    });
  });
  it('snapshot of an image with VM state written beyond the disk (qemu-io write -b) does not leak it', async () => {
    const file = path('vmstate.qcow2');
    await create(file, 1 * MiB);
    await qemuIo(file, ['write -P 0x10 0 64k', 'write -b -P 0x99 0 128k']);
    await qemuImg(['snapshot', '-c', 'withvm', file]);
    await check(file, 'qcow2');
    const ref = await referenceRaw(file, { snapshot: { name: 'withvm' } });
    await withImage(file, { format: 'qcow2', snapshot: { name: 'withvm' } }, (image) =>
      expectSameBytes(image, file, { reference: ref, label: 'vmstate snapshot' }),
    );
  });
});

describe.concurrent('external data file (incompatible bit 2): guest data lives in another file at guest offsets', () => {
  for (const rawFlag of [false, true]) {
    layout(`data_file=x.raw${rawFlag ? ',data_file_raw=on' : ''}`, async () => {
      const file = path(`df${rawFlag ? '-raw' : ''}.qcow2`);
      const data = `${file}.data.raw`;
      await create(file, 4 * MiB, [`data_file=${data}`, ...(rawFlag ? ['data_file_raw=on'] : [])]);
      await qemuIo(file, ['write -P 0x71 0 64k', 'write -P 0x72 100000 5000', 'write -z 1M 128k', `write -s ${randomSource} 2M 300000`, 'discard 2M 64k']);
      return { file, format: 'qcow2' };
    });
  }
});

describe.concurrent('persistent bitmaps present (autoclear bit 0 + bitmaps extension) do not disturb reads', () => {
  layout('qemu-img bitmap --add b0 and b1, then writes', async () => {
    const file = path('bitmaps.qcow2');
    await create(file, 4 * MiB);
    await qemuImg(['bitmap', '--add', file, 'b0']);
    await qemuImg(['bitmap', '--add', '-g', '512k', file, 'b1']);
    await qemuIo(file, ['write -P 0x81 0 1M', 'write -z 2M 64k', 'write -P 0x82 3M 3']);
    await qemuImg(['bitmap', '--disable', file, 'b1']);
    return { file, format: 'qcow2' };
  });
});

describe.concurrent('preallocation: allocated-but-unwritten clusters read as zeros', () => {
  for (const prealloc of ['metadata', 'falloc', 'full']) {
    layout(`preallocation=${prealloc}`, async () => {
      const file = path(`pre-${prealloc}.qcow2`);
      await create(file, 4 * MiB, [`preallocation=${prealloc}`]);
      await qemuIo(file, ['write -P 0x91 64k 100', 'write -z 1M 64k', 'discard 2M 64k']);
      return { file, format: 'qcow2' };
    });
  }
  for (const prealloc of ['falloc', 'full']) {
    it(`raw preallocation=${prealloc}`, async () => {
      const file = path(`pre-${prealloc}.raw`);
      await create(file, 2 * MiB, [`preallocation=${prealloc}`], 'raw');
      await qemuIo(file, ['write -P 0x92 4097 100'], { format: 'raw' });
      await check(file, 'raw');
    });
  }
});

describe.concurrent('odd virtual sizes', () => {
  layout('qcow2 12345678 bytes (qemu-img rounds up to a 512 multiple: 12345856)', async () => {
    const file = path('odd-12345678.qcow2');
    await create(file, 12345678, ['cluster_size=4096']);
    const info = await qemuInfo(file);
    expect(info['virtual-size']).toBe(12345856);
    await qemuIo(file, ['write -P 0xa1 0 1000', `write -P 0xa2 ${12345856 - 700} 700`]);
    return { file, format: 'qcow2' };
  });
  layout('qcow2 1000 bytes (created as 1024)', async () => {
    const file = path('odd-1000.qcow2');
    await create(file, 1000);
    await qemuIo(file, ['write -P 0xa3 0 1024']);
    return { file, format: 'qcow2' };
  });
  it('raw 1000-byte file not made by qemu: the size qemu-img info gives (whole sectors), the file\'s bytes, then zeros', async () => {
    const file = path('odd-1000.raw');
    const bytes = randomBytes(1000);
    writeFileSync(file, bytes);
    const info = await qemuInfo(file, ['-f', 'raw']);
    expect(info['virtual-size']).toBe(1024); // QEMU counts a raw file's size in whole sectors
    await withImage(file, { format: 'raw' }, async (image) => {
      expect(image.virtualSize).toBe(info['virtual-size']);
      const all = await image.read(0, image.virtualSize);
      expect(Buffer.from(all.subarray(0, 1000)).equals(bytes)).toBe(true);
      expect([...all.subarray(1000)]).toEqual(new Array(24).fill(0));
    });
  });
  it('raw 1000-byte file: virtualSize matches qemu-img (1024, sectors rounded up)', async () => {
    const file = path('odd-1000b.raw');
    writeFileSync(file, randomBytes(1000));
    await check(file, 'raw');
  });
  it('qcow2 header size field 1000 (patched): QEMU rounds down to 512', async () => {
    const file = path('odd-hdr-1000.qcow2');
    await create(file, 1024);
    await qemuIo(file, ['write -P 0xa4 0 1024']);
    const fd = openSync(file, 'r+');
    const b = Buffer.alloc(8);
    b.writeBigUInt64BE(1000n);
    writeSync(fd, b, 0, 8, 24);
    closeSync(fd);
    await check(file, 'qcow2');
  });
});

describe.concurrent('virtual size 0', () => {
  for (const format of ['qcow2', 'raw'] as const) {
    it(`${format} of size 0: opens, reads nothing, block status is empty`, async () => {
      const file = path(`zero.${format}`);
      await create(file, 0, [], format);
      await withImage(file, { format }, async (image) => {
        expect(image.virtualSize).toBe(0);
        expect((await image.read(0, 0)).length).toBe(0);
        const runs = [];
        for await (const st of image.blockStatus()) runs.push(st);
        expect(runs).toEqual([]);
      });
    });
  }
});

describe.concurrent('16 TiB sparse: metadata, not virtual size, bounds the work and the memory', () => {
  it('qcow2 16 TiB with writes far apart: sampled bytes match; the block status walk reads only the L2 tables that map something, once', async () => {
    const file = path('16t.qcow2');
    await create(file, 16 * TiB);
    await qemuIo(file, [
      'write -P 0x11 1000 5000',
      `write -P 0x22 ${8 * TiB} 70000`,
      `write -P 0x33 ${4 * TiB + 12345} 100000`,
      `write -z ${12 * TiB} 1M`,
      `write -P 0x44 ${16 * TiB - 416} 416`,
    ]);
    await withImage(file, { format: 'qcow2' }, async (image) => {
      expect(image.virtualSize).toBe(16 * TiB);
      await expectSameBytesSampled(image, file, { format: 'qcow2', label: '16t.qcow2', randomReads: RANDOM_READS });
    });

    // What a walk over the whole disk costs, on a fresh open with every read of the file recorded.
    const [info, map] = await Promise.all([qemuInfo(file), qemuMap(file, 'qcow2')]);
    const cs = info['cluster-size'] as number;
    const l2Span = cs * (cs / 8); // guest bytes one L2 table maps
    const l1Entries = Math.ceil((16 * TiB) / l2Span);
    // L2 tables exist where QEMU maps anything allocated (data or zero clusters).
    const tables = new Set<number>();
    for (const e of map.filter((m) => m.present)) {
      for (let k = Math.floor(e.start / l2Span); k <= Math.floor((e.start + e.length - 1) / l2Span); k++) tables.add(k);
    }
    expect(tables.size).toBe(5);
    const reads: { offset: number; length: number }[] = [];
    const inner = await FileStorage.open(file, { readOnly: true });
    const counted = new Proxy(inner, {
      get(target, key) {
        if (key === 'read') {
          return (buf: Uint8Array, offset: number) => {
            reads.push({ offset, length: buf.length });
            return target.read(buf, offset);
          };
        }
        const v: unknown = Reflect.get(target, key, target);
        return typeof v === 'function' ? (v as (...a: unknown[]) => unknown).bind(target) : v;
      },
    });
    const { image } = await openImage(counted, { format: 'qcow2' });
    try {
      reads.length = 0; // the header and the L1 table, read when opening
      // A run never spans two L2 tables' ranges and splits a range only where QEMU's map does.
      const maxRuns = l1Entries + map.length;
      let runs = 0;
      for await (const st of image.blockStatus()) {
        if (++runs > maxRuns) throw new Error(`more than ${maxRuns} block status runs (${l1Entries} L1 entries, ${map.length} qemu-img map entries), at ${st.offset}`);
      }
      const walk = reads.splice(0);
      // Loaded once each (the cache keeps them): no range of the file read twice.
      const keys = walk.map((r) => `${r.offset}+${r.length}`);
      expect(new Set(keys).size, `reads: ${keys.join(' ')}`).toBe(keys.length);
      // The tables that map something, and the refcount table and block looked at once (to tell
      // a metadata-preallocated image): a few clusters, whatever the virtual size.
      const bytes = walk.reduce((n, r) => n + r.length, 0);
      expect(bytes, `reads: ${keys.join(" ")}`).toBeLessThanOrEqual((tables.size + 2) * cs);
      // And the walk says what qemu-img map says (runs merged).
      await expectSameMap(image, file, 'qcow2', '16t.qcow2');
    } finally {
      await image.close();
    }
  });
  it('raw 1 TiB sparse file with a few writes far apart', async () => {
    const file = path('1t.raw');
    await create(file, TiB, [], 'raw');
    await qemuIo(file, ['write -P 0x11 0 4096', `write -P 0x22 ${TiB / 2 + 3} 70000`, `write -P 0x33 ${TiB - 512} 512`], { format: 'raw' });
    await withImage(file, { format: 'raw' }, async (image) => {
      await expectSameBytesSampled(image, file, { format: 'raw', label: '1t.raw' });
      let runs = 0;
      for await (const st of image.blockStatus()) {
        runs++;
        if (runs > 100_000) throw new Error('too many block status runs on a sparse raw file');
      }
    });
  });
});

describe.concurrent('raw images: the file is the disk', () => {
  it('dense raw file of random bytes', async () => {
    const file = path('dense.raw');
    writeFileSync(file, randomBytes(3 * MiB + 512));
    await check(file, 'raw');
  });
  it('sparse raw file (qemu-img create) with scattered writes and holes', async () => {
    const file = path('sparse.raw');
    await create(file, 8 * MiB, [], 'raw');
    await qemuIo(file, ['write -P 0x01 0 4096', 'write -P 0x02 1000000 3', `write -s ${randomSource} 5M 1M`, 'write -z 5M 4096', 'discard 5242880 65536'], { format: 'raw' });
    await check(file, 'raw');
  });
  it('format probing: a qcow2 image opened without a format is read as qcow2, a raw one as raw', async () => {
    const q = path('probe.qcow2');
    await create(q, 1 * MiB);
    await qemuIo(q, ['write -P 0x77 0 64k']);
    const r = path('probe.raw');
    writeFileSync(r, randomBytes(64 * KiB));
    const oq = await open(q);
    try {
      expect(oq.image.format).toBe('qcow2');
      await expectSameBytes(oq.image, q, { format: 'qcow2' });
    } finally {
      await oq.image.close();
    }
    const or = await open(r);
    try {
      expect(or.image.format).toBe('raw');
      expect(or.probed).toBe(true);
      await expectSameBytes(or.image, r, { format: 'raw' });
    } finally {
      await or.image.close();
    }
  });
});
