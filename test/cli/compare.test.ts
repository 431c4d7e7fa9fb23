// qimg compare against qemu-img compare 7.2 on the same files: stdout (verdicts, warnings, -p
// progress lines) byte for byte, stderr with our program name, the same exit status (0 identical,
// 1 different, 2 cannot open, 3 block status failed, 4 read failed). The images are made by
// qemu-img and qemu-io. Every case also checks qemu-img's own answer, so that it tests what its
// name says. Then the library: ranges that read as zeros on both sides are never read.

import { execFile, spawn } from 'node:child_process';
import { closeSync, copyFileSync, openSync, readSync, writeFileSync, writeSync } from 'node:fs';
import { join } from 'node:path';
import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import { compareImages, CompareError, type CompareResult } from '../../src/compare.js';
import { openImage } from '../../src/open.js';
import { FileStorage } from '../../src/io/file.js';
import type { Storage } from '../../src/io/storage.js';
import type { Image } from '../../src/image.js';
import { checkProperty } from '../helpers/property.js';
import { MiB, tmpDir } from '../helpers/qemu.js';
import { asQimg, both, cliPath, qemuImg, qemuImgOk, qemuIoOk, qimg } from './harness.js';

const dir = tmpDir('qimg-compare-');
let counter = 0;
/** A file name no other case uses (cases run concurrently in one directory). */
const fresh = (stem: string, ext: string): string => `${stem}-${counter++}.${ext}`;

/** qemu-img create -f qcow2 [-o opts] name size, then qemu-io writes. */
async function qcow2(size: string, opts: string[] = [], io: string[] = [], backing?: [string, 'qcow2' | 'raw']): Promise<string> {
  const name = fresh('img', 'qcow2');
  const args = ['create', '-q', '-f', 'qcow2'];
  if (opts.length) args.push('-o', opts.join(','));
  if (backing) args.push('-b', backing[0], '-F', backing[1]);
  await qemuImgOk([...args, name, size], dir);
  if (io.length) await qemuIoOk(name, 'qcow2', io, dir);
  return name;
}

async function raw(size: string, io: string[] = []): Promise<string> {
  const name = fresh('img', 'raw');
  await qemuImgOk(['create', '-q', '-f', 'raw', name, size], dir);
  if (io.length) await qemuIoOk(name, 'raw', io, dir);
  return name;
}

/** qemu-img convert of src to a new file (raw or qcow2 with options). */
async function convert(src: string, to: 'raw' | 'qcow2', opts: string[] = []): Promise<string> {
  const name = fresh('conv', to);
  await qemuImgOk(['convert', '-O', to, ...opts, src, name], dir);
  return name;
}

/** A byte-for-byte copy of an image, then qemu-io writes on the copy. */
async function copy(src: string, io: string[] = []): Promise<string> {
  const ext = src.endsWith('.raw') ? 'raw' : 'qcow2';
  const name = fresh('copy', ext);
  copyFileSync(join(dir, src), join(dir, name));
  if (io.length) await qemuIoOk(name, ext, io, dir);
  return name;
}

interface Expect {
  code: number;
  /** What qemu-img prints on stdout (the progress lines taken out), when the case is about it. */
  stdout?: string;
}

/**
 * Runs `compare args` with both tools: identical stdout, stderr (program name swapped) and exit
 * status. `expected` is checked against qemu-img, so the case proves what it is named for.
 */
async function same(args: string[], expected?: Expect): Promise<void> {
  const { qemu, ours } = await both(['compare', ...args], dir);
  const label = `compare ${args.join(' ')}`;
  if (expected) {
    expect(qemu.code, `${label}: qemu-img's exit status (${qemu.stdout}${qemu.stderr})`).toBe(expected.code);
    if (expected.stdout !== undefined) {
      // Without the progress lines and the newline that ends them.
      let text = qemu.stdout.replace(/ {4}\(\d+\.\d\d\/100%\)\r/g, '');
      if (args.includes('-p') && !args.includes('-q')) text = text.replace(/\n$/, '');
      expect(text, `${label}: qemu-img's output`).toBe(expected.stdout);
    }
  }
  expect({ code: ours.code, stdout: ours.stdout, stderr: ours.stderr }, label).toEqual({
    code: qemu.code,
    stdout: qemu.stdout,
    stderr: asQimg(qemu.stderr),
  });
}

/** Sets L1 entry `index` of a qcow2 file to an unaligned L2 table offset. */
function breakL1Entry(file: string, index: number): void {
  const fd = openSync(join(dir, file), 'r+');
  try {
    const header = Buffer.alloc(48);
    readSync(fd, header, 0, 48, 0);
    const l1 = Number(header.readBigUInt64BE(40));
    const entry = Buffer.alloc(8);
    readSync(fd, entry, 0, 8, l1 + 8 * index);
    entry.writeBigUInt64BE(entry.readBigUInt64BE(0) + 512n);
    writeSync(fd, entry, 0, 8, l1 + 8 * index);
  } finally {
    closeSync(fd);
  }
}

const IDENTICAL = { code: 0, stdout: 'Images are identical.\n' };
const mismatch = (offset: number): Expect => ({ code: 1, stdout: `Content mismatch at offset ${offset}!\n` });
const statusMismatch = (offset: number): Expect => ({ code: 1, stdout: `Strict mode: Offset ${offset} block status mismatch!\n` });
const SIZE_WARNING = 'Warning: Image size mismatch!\n';

/** Data, a zero cluster and a hole in 8 MiB: the base of the content cases. */
const WRITES = ['write -P 0x11 0 100k', 'write -P 0x22 3M 1M', 'write -z 5M 64k', 'write -P 0x33 7M 4k'];

describe('content: identical images and the first difference', () => {
  for (const cs of ['512', '4k', '64k', '2M']) {
    it(`cluster size ${cs}: qcow2 and raw on either side, mismatches at the first byte and mid-cluster`, async () => {
      const x = await qcow2('8M', [`cluster_size=${cs}`], WRITES);
      const [xRaw, midCluster, firstByte, sectorEnd, inHole, inZeroCluster] = await Promise.all([
        convert(x, 'raw'),
        copy(x, ['write -P 0x44 3333333 10']),
        copy(x, ['write -P 0x44 0 1']),
        // The last byte of a sector: reported at the sector's start.
        copy(x, ['write -P 0x44 1023 1']),
        // Data where x has nothing allocated (only one side is read, and checked for zeros)...
        copy(x, ['write -P 0x44 6292000 1']),
        // ... and where x has a zero cluster.
        copy(x, ['write -P 0x44 5243000 1']),
      ]);
      const midRaw = await convert(midCluster, 'raw');
      await Promise.all([
        same([x, xRaw], IDENTICAL),
        same([xRaw, x], IDENTICAL),
        same([x, x], IDENTICAL),
        same([x, midCluster], mismatch(3333120)),
        same([midCluster, xRaw], mismatch(3333120)),
        same([xRaw, midRaw], mismatch(3333120)),
        same([firstByte, x], mismatch(0)),
        same([xRaw, firstByte], mismatch(0)),
        same([x, sectorEnd], mismatch(512)),
        same([x, inHole], mismatch(6291968)),
        same([inHole, xRaw], mismatch(6291968)),
        same([inZeroCluster, x], mismatch(5242880)),
        same([xRaw, inZeroCluster], mismatch(5242880)),
      ]);
    });
  }

  it('qcow2 v2, extended L2 (subclusters over a backing file) and compressed clusters (zlib, zstd)', async () => {
    const d = await raw('4M', ['write -P 5 0 1M', 'write -P 6 2M 100k']);
    const [v2, el2, zlib, zstd] = await Promise.all([
      convert(d, 'qcow2', ['-o', 'compat=0.10']),
      convert(d, 'qcow2', ['-o', 'extended_l2=on,cluster_size=128k']),
      convert(d, 'qcow2', ['-c']),
      convert(d, 'qcow2', ['-c', '-o', 'compression_type=zstd']),
    ]);
    // A write into a compressed cluster (it becomes a normal cluster), and subclusters.
    const [zlibChanged, sub] = await Promise.all([
      copy(zlib, ['write -P 7 2100000 1']),
      qcow2('4M', ['extended_l2=on', 'cluster_size=64k'], ['write -P 8 4096 2048', 'write -z 65536 4096'], [d, 'raw']),
    ]);
    const subRaw = await convert(sub, 'raw');
    await Promise.all([
      ...[v2, el2, zlib, zstd].flatMap((img) => [same([img, d], IDENTICAL), same(['-s', img, img], IDENTICAL), same([d, img], IDENTICAL)]),
      same([zlib, zlibChanged], mismatch(2099712)),
      same([zlibChanged, zstd], mismatch(2099712)),
      same([sub, subRaw], IDENTICAL),
      same([sub, d], mismatch(4096)),
      same([subRaw, sub], IDENTICAL),
    ]);
  });
});

describe('many steps and large reads', () => {
  it('512-byte clusters, allocated every other one: thousands of one-cluster steps', async () => {
    // 4 MiB of 512-byte sectors, data and zeros in turn; qemu-img convert -S 512 leaves the zero
    // sectors unallocated: 8192 runs of one cluster.
    const pattern = Buffer.alloc(4 * MiB);
    for (let sector = 0; sector < pattern.length / 512; sector += 2) pattern.fill((sector % 200) + 1, sector * 512, sector * 512 + 512);
    const flat = fresh('alt', 'raw');
    writeFileSync(join(dir, flat), pattern);
    const frag = await convert(flat, 'qcow2', ['-S', '512', '-o', 'cluster_size=512']);
    // Differences in a sector the other image leaves unallocated, and in one both allocate.
    const [changed, changedRaw, changedData] = await Promise.all([
      copy(frag, ['write -P 0xee 3000000 1']),
      copy(flat, ['write -P 0xee 3000000 1']),
      copy(frag, ['write -P 0xee 2048100 1']),
    ]);
    await Promise.all([
      same([frag, flat], IDENTICAL),
      same(['-p', frag, flat], IDENTICAL),
      same(['-s', frag, frag], IDENTICAL),
      same([frag, changed], mismatch(2999808)),
      same(['-p', flat, changed], mismatch(2999808)),
      same([changedRaw, frag], mismatch(2999808)),
      same([frag, changedData], mismatch(2048000)),
      same([changedData, flat], mismatch(2048000)),
    ]);
  });

  it('contiguous data over several read windows, a difference far in', async () => {
    // 20 MiB: three batches of reads (8 MiB windows).
    const x = await qcow2('20M', [], ['write -P 0x5a 0 20M']);
    const [flat, changed, changedEnd] = await Promise.all([
      convert(x, 'raw'),
      copy(x, ['write -P 0x11 17001000 1']),
      copy(x, ['write -P 0x11 20971519 1']),
    ]);
    await Promise.all([
      same([x, flat], IDENTICAL),
      same(['-p', flat, x], IDENTICAL),
      same([flat, changed], mismatch(17000960)),
      same(['-p', x, changed], mismatch(17000960)),
      same([changedEnd, flat], mismatch(20971008)),
    ]);
  });
});

describe('backing chains', () => {
  /** raw base (4M) <- qcow2 mid (6M) <- qcow2 top (8M): three deep, each layer shorter than the one above. */
  async function chain(baseWrites: string[]): Promise<string> {
    const base = await raw('4M', ['write -P 5 0 2M', ...baseWrites]);
    const mid = await qcow2('6M', [], ['write -P 6 1M 512k', 'write -z 1536k 64k', 'write -P 9 4M 64k'], [base, 'raw']);
    return qcow2('8M', ['cluster_size=4k'], ['write -P 7 3M 100k'], [mid, 'qcow2']);
  }

  it('a chain three deep against its flattened copies, and a difference in the bottom file', async () => {
    const [top, topChanged] = await Promise.all([chain([]), chain(['write -P 0x99 300000 1'])]);
    const [flatRaw, flatQcow2] = await Promise.all([convert(top, 'raw'), convert(top, 'qcow2')]);
    await Promise.all([
      same([top, flatRaw], IDENTICAL),
      same([flatQcow2, top], IDENTICAL),
      same(['-p', top, flatQcow2], { code: 0 }),
      same(['-s', top, flatRaw], { code: 1 }),
      // The difference lies in the raw file at the bottom of one chain.
      same([top, topChanged], mismatch(299520)),
      same([topChanged, flatRaw], mismatch(299520)),
      same(['-s', top, topChanged], { code: 1 }),
    ]);
  });

  it('strict mode past the end of a shorter backing file: zeros allocated there', async () => {
    // QEMU reports the range past a backing file's end as zeros allocated (the chain walk ends at
    // that file), so it equals zero clusters and differs from unallocated clusters.
    const short = await qcow2('2M', [], ['write -P 1 0 2M']);
    const [overlay, zeroClusters, unallocated, overlay2] = await Promise.all([
      qcow2('4M', [], [], [short, 'qcow2']),
      qcow2('4M', [], ['write -P 1 0 2M', 'write -z 2M 2M']),
      qcow2('4M', [], ['write -P 1 0 2M']),
      qcow2('4M', [], [], [short, 'qcow2']),
    ]);
    await Promise.all([
      same(['-s', overlay, zeroClusters], IDENTICAL),
      same(['-s', overlay, unallocated], statusMismatch(2 * MiB)),
      same(['-s', overlay, overlay2], IDENTICAL),
      same([overlay, unallocated], IDENTICAL),
    ]);
  });

  it('strict mode: an unallocated run that reaches the end of a backing file carries its end-of-file flag', async () => {
    // The backing file's last MiB is unallocated: QEMU's answer there comes from that file,
    // flagged as its end of file, which an image of the same contents does not have.
    const short = await qcow2('2M', [], ['write -P 1 0 1M']);
    const [overlay, flat] = await Promise.all([
      qcow2('4M', [], [], [short, 'qcow2']),
      qcow2('4M', [], ['write -P 1 0 1M', 'write -z 2M 2M']),
    ]);
    await Promise.all([same(['-s', overlay, flat], statusMismatch(MiB)), same([overlay, flat], IDENTICAL)]);
  });
});

describe('images of different sizes', () => {
  it('the tail past the shorter image: a difference there, zeros there, each way, raw and qcow2', async () => {
    const [s4, s6, s6zero, s6zeroData, r6, r4] = await Promise.all([
      qcow2('4M'),
      qcow2('6M', [], ['write -P 1 5000000 3']),
      qcow2('6M', [], ['write -z 4M 1M']),
      qcow2('6M', [], ['write -P 0 4M 2M']),
      raw('6M', ['write -P 1 5000000 3']),
      raw('4M'),
    ]);
    const tail = { code: 1, stdout: `${SIZE_WARNING}Content mismatch at offset 4999680!\n` };
    const tailZero = { code: 0, stdout: `${SIZE_WARNING}Images are identical.\n` };
    await Promise.all([
      same([s4, s6], tail),
      same([s6, s4], tail),
      same([r6, s4], tail),
      same([s4, r6], tail),
      same([r4, s6], tail),
      same([s4, s6zero], tailZero),
      same([s6zeroData, r4], tailZero),
      same(['-s', s6, s4], { code: 1, stdout: 'Strict mode: Image size mismatch!\n' }),
      same(['-s', s4, s6zero], { code: 1, stdout: 'Strict mode: Image size mismatch!\n' }),
      same(['-p', s6, s4], tail),
      same(['-p', s4, s6zero], tailZero),
      same(['-q', s6, s4], { code: 1, stdout: '' }),
    ]);
  });

  it('a raw file whose size is not a multiple of 512 (its last sector is completed with zeros)', async () => {
    const data = Buffer.alloc(1000);
    for (let i = 0; i < data.length; i++) data[i] = (i * 7 + 1) & 0xff;
    const odd = fresh('odd', 'raw');
    writeFileSync(join(dir, odd), data);
    const changed = fresh('odd', 'raw');
    data[700] ^= 0xff;
    writeFileSync(join(dir, changed), data);
    const padded = fresh('odd', 'raw');
    writeFileSync(join(dir, padded), Buffer.concat([data, Buffer.alloc(24)]));
    const asQcow2 = await convert(odd, 'qcow2');
    await Promise.all([
      same([odd, asQcow2], IDENTICAL),
      same(['-p', asQcow2, odd], IDENTICAL),
      same([odd, changed], mismatch(512)),
      same([changed, padded], IDENTICAL),
      same(['-s', odd, asQcow2], { code: 1 }),
    ]);
  });
});

describe('zero clusters, unallocated clusters, zero data', () => {
  it('read the same, differ in strict mode', async () => {
    const images = await Promise.all([
      qcow2('4M', [], ['write -z 0 1M', 'write -P 3 3M 4k']), // zero clusters
      qcow2('4M', [], ['write -P 0 0 1M', 'write -P 3 3M 4k']), // explicit zero data
      qcow2('4M', [], ['write -P 3 3M 4k']), // unallocated
      raw('4M', ['write -P 3 3M 4k']), // a hole in a raw file
      raw('4M', ['write -P 0 0 3M', 'write -P 3 3M 4k']), // zero bytes written in a raw file
    ]);
    const runs: Promise<void>[] = [];
    for (const x of images) {
      for (const y of images) {
        runs.push(same([x, y], IDENTICAL));
        runs.push(same(['-s', x, y], x === y ? IDENTICAL : undefined));
      }
    }
    // One that qemu-img itself calls different only in strict mode.
    runs.push(same(['-s', images[0]!, images[2]!], statusMismatch(0)));
    await Promise.all(runs);
  });
});

describe('strict mode and qcow2 block status runs', () => {
  it('block status runs end after INT_MAX bytes in qcow2, so a difference can be found at an odd offset', async () => {
    // 2 MiB clusters: one L2 table covers 32 GiB, and QEMU's qcow2 answers at most 2^31-1 bytes.
    const [empty, zeroCluster] = await Promise.all([
      qcow2('3G', ['cluster_size=2M']),
      qcow2('3G', ['cluster_size=2M'], ['write -z 2560M 2M']),
    ]);
    await Promise.all([
      same(['-s', empty, zeroCluster], statusMismatch(2 ** 31 - 1)),
      same(['-s', '-p', empty, zeroCluster], statusMismatch(2 ** 31 - 1)),
      same(['-p', empty, zeroCluster], IDENTICAL),
    ]);
  });

  it('strict mode: a run that reaches the end of the image carries the end-of-file flag', async () => {
    // The same data, but the second image's clusters lie in two runs on the host: its first run
    // does not reach the end, the first image's does, so QEMU's statuses differ at offset 0.
    const [oneRun, twoRuns] = await Promise.all([
      qcow2('4M', [], ['write -P 1 0 4M']),
      qcow2('4M', [], ['write -P 1 2M 2M', 'write -P 1 0 2M']),
    ]);
    await Promise.all([same(['-s', oneRun, twoRuns], statusMismatch(0)), same(['-s', twoRuns, oneRun], statusMismatch(0)), same([oneRun, twoRuns], IDENTICAL)]);
  });

  it('strict mode on raw files: a data run longer than the first probe, then a hole, then data', async () => {
    const [holes, zerosWritten] = await Promise.all([
      raw('16M', ['write -P 1 0 4M', 'write -P 2 12M 1M']),
      raw('16M', ['write -P 1 0 4M', 'write -P 0 4M 8M', 'write -P 2 12M 1M']),
    ]);
    await Promise.all([same(['-s', holes, zerosWritten], statusMismatch(4 * MiB)), same(['-s', holes, holes], IDENTICAL), same([holes, zerosWritten], IDENTICAL)]);
  });

  it('data written the same way is identical in strict mode; allocation that differs is not', async () => {
    const a = await qcow2('8M', [], WRITES);
    const [b, rawCopy, moreAllocated] = await Promise.all([
      qcow2('8M', [], WRITES),
      convert(a, 'raw'),
      copy(a, ['write -P 0 6M 64k']),
    ]);
    await Promise.all([
      same(['-s', a, b], IDENTICAL),
      same(['-s', a, rawCopy], statusMismatch(102400)),
      same(['-s', rawCopy, rawCopy], IDENTICAL),
      same(['-s', a, moreAllocated], statusMismatch(6 * MiB)),
      same([a, moreAllocated], IDENTICAL),
    ]);
  });
});

describe('progress (-p) and quiet (-q)', () => {
  it('progress lines as qemu-img prints them, on small and very large sparse images', async () => {
    const x = await qcow2('8M', ['cluster_size=4k'], WRITES);
    const [y, big, bigChanged, bigRaw] = await Promise.all([
      copy(x, ['write -P 0x44 7M 1']),
      qcow2('300G', ['cluster_size=1M'], ['write -P 3 200G 1M', 'write -P 4 1G 64k']),
      qcow2('300G', ['cluster_size=1M'], ['write -P 3 200G 1M', 'write -P 4 1G 64k', 'write -P 5 299G 1']),
      raw('300G', ['write -P 3 200G 1M', 'write -P 4 1G 64k']),
    ]);
    // 12 GiB + 243 sectors: a size a float cannot hold, in 6145 steps of 2 MiB (4 KiB clusters: one
    // L2 table each). qemu-img sums each step's share in single precision (26.02%, not 26.03%).
    const odd = await qcow2('12885026304', ['cluster_size=4k']);
    const oddCopy = await copy(odd);
    await Promise.all([
      same(['-p', odd, oddCopy], IDENTICAL),
      same(['-p', x, x], IDENTICAL),
      same(['-p', x, y], mismatch(7 * MiB)),
      same(['-p', '-q', x, y], { code: 1, stdout: '' }),
      same(['-q', x, x], { code: 0, stdout: '' }),
      same(['-p', big, bigChanged], mismatch(299 * 1024 * MiB)),
      same(['-p', bigRaw, big], IDENTICAL),
      same(['-p', bigChanged, bigRaw], mismatch(299 * 1024 * MiB)),
    ]);
  });
});

describe('errors and options', () => {
  it('block status failure (exit 3): broken qcow2 metadata, on either side, with -p and -q', async () => {
    // 64 KiB clusters: L1 entry 1 maps [512M, 1G).
    const good = await qcow2('1G', [], ['write -P 1 0 64k', 'write -P 2 600M 64k']);
    const broken = await copy(good);
    breakL1Entry(broken, 1);
    await Promise.all([
      same([good, broken], { code: 3 }),
      same([broken, good], { code: 3 }),
      same(['-p', good, broken], { code: 3 }),
      same(['-q', broken, good], { code: 3 }),
      // The difference before the broken table is found first.
      same([broken, await copy(good, ['write -P 9 4k 1'])], mismatch(4096)),
    ]);
  });

  it('read failure (exit 4): a compressed cluster that does not decompress, on either side, with -p', async () => {
    const d = await raw('1M', ['write -P 5 0 1M']);
    const compressed = await convert(d, 'qcow2', ['-c']);
    // Cluster 3's compressed bytes overwritten: decompression fails with EIO in both tools.
    const fd = openSync(join(dir, compressed), 'r+');
    try {
      const header = Buffer.alloc(48);
      readSync(fd, header, 0, 48, 0);
      const l1 = Number(header.readBigUInt64BE(40));
      const l1Entry = Buffer.alloc(8);
      readSync(fd, l1Entry, 0, 8, l1);
      const l2 = Number(l1Entry.readBigUInt64BE(0) & 0x00fffffffffffe00n);
      const l2Entry = Buffer.alloc(8);
      readSync(fd, l2Entry, 0, 8, l2 + 8 * 3);
      // cluster_bits 16: the host offset is the low 62 - (16 - 8) = 54 bits.
      const host = Number(l2Entry.readBigUInt64BE(0) & ((1n << 54n) - 1n));
      writeSync(fd, Buffer.alloc(64, 0xff), 0, 64, host);
    } finally {
      closeSync(fd);
    }
    await Promise.all([
      same([compressed, d], { code: 4 }),
      same([d, compressed], { code: 4 }),
      same(['-p', d, compressed], { code: 4 }),
    ]);
  });

  it('cannot open (exit 2), bad cache mode, usage errors (exit 1), -T, -U', async () => {
    const x = await qcow2('1M', [], ['write -P 1 0 4k']);
    const missing = 'no-such-file.qcow2';
    await Promise.all([
      same([x, missing], { code: 2 }),
      same([missing, x], { code: 2 }),
      same(['-p', x, missing], { code: 2 }),
      same(['-f', 'foo', x, x], { code: 2 }),
      same(['-F', 'foo', x, x], { code: 2 }),
      same(['-f', 'raw', '-F', 'qcow2', x, x], { code: 1 }),
      same(['-T', 'foo', x, x], { code: 2 }),
      same(['-p', '-T', 'bogus', x, x], { code: 2 }),
      same(['-T', 'writeback', x, x], IDENTICAL),
      same(['-T', 'none', x, x], IDENTICAL),
      same(['-U', x, x], IDENTICAL),
      same(['--force-share', x, x], IDENTICAL),
      same([x], { code: 1 }),
      same([x, x, x], { code: 1 }),
      same(['-x', x, x], { code: 1 }),
      same(['--nope', x, x], { code: 1 }),
      same(['-f'], { code: 1 }),
      same([], { code: 1 }),
    ]);
  });

  it('-p with an error: the message comes before the last newline of the progress output (one pipe for both)', async () => {
    const x = await qcow2('1G', [], ['write -P 1 0 4k', 'write -P 2 600M 4k']);
    const broken = await copy(x);
    breakL1Entry(broken, 1);
    const cli = await cliPath();
    const merged = (cmd: string): Promise<string> =>
      new Promise((resolve, reject) => {
        execFile('sh', ['-c', `${cmd} 2>&1`], { cwd: dir, env: { ...process.env, LC_ALL: 'C' } }, (err, stdout) => {
          if (err && typeof (err as NodeJS.ErrnoException).code === 'string') reject(err);
          else resolve(stdout);
        });
      });
    for (const args of [`compare -p ${x} no-such-file`, `compare -p ${x} ${broken}`]) {
      const [qemu, ours] = await Promise.all([merged(`qemu-img ${args}`), merged(`"${process.execPath}" "${cli}" ${args}`)]);
      expect(qemu).toMatch(/\nqemu-img: [^\n]+\n\n$|^qemu-img: [^\n]+\n\n$/);
      expect(ours).toBe(asQimg(qemu));
    }
  });

  it('-U: an image a running qemu-io holds writable is compared all the same', async () => {
    const x = await qcow2('1M', [], ['write -P 1 0 4k']);
    const holder = spawn('qemu-io', ['-f', 'qcow2', '-c', 'sleep 600000', x], { cwd: dir, stdio: 'ignore' });
    try {
      // Wait until qemu-io holds its locks: qemu-img compare without -U is refused (exit 2) then.
      let held = false;
      for (let i = 0; i < 500 && !held; i++) held = (await qemuImg(['compare', x, x], dir)).code === 2;
      expect(held, 'qemu-io holds the image').toBe(true);
      await Promise.all([same(['-U', x, x], IDENTICAL), same(['-U', '-p', x, x], IDENTICAL)]);
    } finally {
      holder.kill('SIGKILL');
    }
  });

  it('--object and --image-opts are refused with a one-line error and exit status 2; -h prints the help', async () => {
    const x = await qcow2('1M');
    const [object, imageOpts, help] = await Promise.all([
      qimg(['compare', '--object', 'secret,id=s0,data=x', x, x], dir),
      qimg(['compare', '--image-opts', x, x], dir),
      qimg(['compare', '-h'], dir),
    ]);
    expect(object).toEqual({ code: 2, stdout: '', stderr: 'qimg: --object is not supported by qimg\n' });
    expect(imageOpts).toEqual({ code: 2, stdout: '', stderr: 'qimg: --image-opts is not supported by qimg\n' });
    expect(help.code).toBe(0);
    expect(help.stdout).toContain('  compare [-f fmt] [-F fmt] [-T src_cache] [-p] [-q] [-s] [-U] filename1 filename2\n');
  });
});

describe('random images: qimg answers as qemu-img', () => {
  it('property: pairs made by random writes, zero writes and discards', async () => {
    const op = fc.record({
      kind: fc.constantFrom('write', 'zero', 'discard'),
      // In 512-byte units within 2 MiB (lengths up to 192 KiB).
      at: fc.integer({ min: 0, max: 4095 }),
      sectors: fc.integer({ min: 1, max: 384 }),
      pattern: fc.integer({ min: 0, max: 3 }),
    });
    const arb = fc.record({
      clusterSize: fc.constantFrom('512', '4k', '64k'),
      formatB: fc.constantFrom('qcow2', 'raw', 'same'),
      sizeB: fc.constantFrom('2M', '3M', '1536k'),
      common: fc.array(op, { minLength: 1, maxLength: 6 }),
      onlyB: fc.array(op, { maxLength: 3 }),
    });
    const io = (ops: { kind: string; at: number; sectors: number; pattern: number }[], size: number): string[] =>
      ops.flatMap((o) => {
        const at = o.at * 512;
        const len = Math.min(o.sectors * 512, size - at);
        if (len <= 0) return [];
        if (o.kind === 'write') return [`write -P ${o.pattern} ${at} ${len}`];
        if (o.kind === 'zero') return [`write -z ${at} ${len}`];
        return [`discard ${at} ${len}`];
      });
    await checkProperty({ name: 'compare random pairs', runs: 8, minRuns: 4, budgetMs: 7_000 }, arb, async (c) => {
      const a = await qcow2('2M', [`cluster_size=${c.clusterSize}`], io(c.common, 2 * MiB));
      let b: string;
      if (c.formatB === 'same') {
        b = await copy(a);
        await qemuImgOk(['resize', '-q', '--shrink', '-f', 'qcow2', b, c.sizeB], dir);
      } else {
        b = await convert(a, c.formatB);
        await qemuImgOk(['resize', '-q', '--shrink', '-f', c.formatB, b, c.sizeB], dir);
      }
      const sizeB = c.sizeB === '3M' ? 3 * MiB : c.sizeB === '2M' ? 2 * MiB : 1.5 * MiB;
      const fmtB = c.formatB === 'raw' ? 'raw' : 'qcow2';
      const extra = io(c.onlyB, sizeB);
      if (extra.length) await qemuIoOk(b, fmtB, extra, dir);
      await Promise.all([same([a, b]), same([b, a]), same(['-s', a, b]), same(['-p', a, b])]);
    });
  });
});

// ---- the library ----------------------------------------------------------------------------

/** A file storage that counts the bytes read through it (the image's own file). */
async function countingStorage(file: string): Promise<{ storage: Storage; bytesRead: () => number }> {
  const inner = await FileStorage.open(join(dir, file), { readOnly: true });
  let bytes = 0;
  const extents = inner.extents;
  const storage: Storage = {
    name: inner.name,
    readOnly: true,
    read: async (buf, offset) => {
      const n = await inner.read(buf, offset);
      bytes += n;
      return n;
    },
    write: (buf, offset) => inner.write(buf, offset),
    size: () => inner.size(),
    truncate: (n) => inner.truncate(n),
    flush: () => inner.flush(),
    close: () => inner.close(),
    ...(extents ? { extents: (offset: number, length: number) => extents(offset, length) } : {}),
  };
  return { storage, bytesRead: () => bytes };
}

/** Counts the guest bytes the compare asks an image for; fails at once past `limit`. */
function countGuestReads(image: Image, limit: number): () => number {
  let bytes = 0;
  const readInto = image.readInto.bind(image);
  image.readInto = (buf: Uint8Array, offset: number): Promise<void> => {
    bytes += buf.length;
    if (bytes > limit) return Promise.reject(new Error(`read ${bytes} guest bytes, more than ${limit}`));
    return readInto(buf, offset);
  };
  return () => bytes;
}

async function libCompare(fileA: string, fileB: string, options: Parameters<typeof compareImages>[2] = {}): Promise<CompareResult> {
  const { image: a } = await openImage(join(dir, fileA));
  try {
    const { image: b } = await openImage(join(dir, fileB));
    try {
      return await compareImages(a, b, options);
    } finally {
      await b.close();
    }
  } finally {
    await a.close();
  }
}

describe('compareImages (library)', () => {
  it('never reads ranges that are zero or unallocated on both sides: a 1 TiB sparse pair', async () => {
    const writes = ['write -P 1 0 64k', 'write -P 2 512G 64k', 'write -z 700G 1M', 'write -P 3 1023G 64k'];
    const [q, r] = await Promise.all([qcow2('1T', [], writes), raw('1T', ['write -P 1 0 64k', 'write -P 2 512G 64k', 'write -P 3 1023G 64k'])]);
    const qs = await countingStorage(q);
    const rs = await countingStorage(r);
    // The counting wrappers are storages of the test's own (no image locks to take on them).
    const { image: a } = await openImage(qs.storage, { lock: false });
    const { image: b } = await openImage(rs.storage, { format: 'raw', lock: false });
    try {
      // Only the three 64 KiB data runs are read (by file system block: at most 4 KiB more each).
      const guestA = countGuestReads(a, 3 * (64 * 1024 + 4096));
      const guestB = countGuestReads(b, 3 * (64 * 1024 + 4096));
      const steps: [number, number][] = [];
      const result = await compareImages(a, b, { strict: false, onProgress: (offset, length) => steps.push([offset, length]) });
      expect(result).toEqual({ kind: 'identical' });
      expect(guestA()).toBeLessThanOrEqual(3 * (64 * 1024 + 4096));
      expect(guestB()).toBeGreaterThanOrEqual(3 * 64 * 1024);
      // The raw file's holes are never read; the qcow2 file is read for its metadata and data only.
      expect(rs.bytesRead()).toBeLessThanOrEqual(3 * (64 * 1024 + 4096));
      expect(qs.bytesRead()).toBeLessThan(4 * MiB);
      // Progress steps cover the disk once, in order.
      let pos = 0;
      for (const [offset, length] of steps) {
        expect(offset).toBe(pos);
        pos += length;
      }
      expect(pos).toBe(2 ** 40);
    } finally {
      await a.close();
      await b.close();
    }
  });

  it('reports differences, strict verdicts and failures as typed results and errors', async () => {
    const x = await qcow2('4M', [], ['write -P 1 0 1M']);
    const [y, longer, zeroClusters] = await Promise.all([
      copy(x, ['write -P 2 1000000 1']),
      qcow2('6M', [], ['write -P 1 0 1M', 'write -P 3 5M 1']),
      qcow2('4M', [], ['write -P 1 0 1M', 'write -z 1M 3M']),
    ]);
    const broken = await copy(x);
    breakL1Entry(broken, 0);
    let warned = 0;
    expect(await libCompare(x, y)).toEqual({ kind: 'content', offset: 999936 });
    expect(await libCompare(x, longer, { onSizeMismatch: () => warned++ })).toEqual({ kind: 'content', offset: 5 * MiB });
    expect(warned).toBe(1);
    expect(await libCompare(x, longer, { strict: true })).toEqual({ kind: 'size' });
    expect(await libCompare(x, zeroClusters)).toEqual({ kind: 'identical' });
    expect(await libCompare(x, zeroClusters, { strict: true })).toEqual({ kind: 'status', offset: MiB });
    const failure = await libCompare(x, broken).catch((e: unknown) => e);
    expect(failure).toBeInstanceOf(CompareError);
    expect(failure).toMatchObject({ stage: 'block-status', image: 1, offset: 0, code: 'FORMAT' });
  });
});
