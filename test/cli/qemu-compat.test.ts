// qimg info / map / convert against qemu-img 7.2 on the same files: stdout byte for byte, errors
// with our program name, convert outputs compared byte for byte and by host allocation (the data
// ranges qemu-img's output has, st_blocks up to extent bookkeeping: test/helpers/host-alloc.ts).

import { mkdtempSync, rmSync, mkdirSync, readFileSync, writeFileSync, statSync, truncateSync } from 'node:fs';
import { randomBytes } from 'node:crypto';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { compareHostAllocation, expectSameFileBytes } from '../helpers/host-alloc.js';
import { asQimg, both, cliPath, qemuImgOk, qemuIoOk, qimg, qemuImg } from './harness.js';

const MiB = 1024 * 1024;
const dir = mkdtempSync(join(tmpdir(), 'qimg-cli-'));
afterAll(() => rmSync(dir, { recursive: true, force: true }));

interface ImageCase {
  /** File name relative to `dir` (may be in a subdirectory). */
  file: string;
  make: () => Promise<void>;
  /** Skip convert (huge virtual size). */
  noConvert?: boolean;
  /** Also compare --backing-chain output. */
  chain?: boolean;
  /** Snapshots to convert with -l (as given on the command line). */
  snapshots?: string[];
}

const qcow2 = async (file: string, size: string, opts: string[] = [], writes: string[] = []): Promise<void> => {
  const args = ['create', '-q', '-f', 'qcow2'];
  if (opts.length) args.push('-o', opts.join(','));
  await qemuImgOk([...args, file, size], dir);
  if (writes.length) await qemuIoOk(file, 'qcow2', writes, dir);
};

const DATA_WRITES = ['write -P 0xaa 0 64k', 'write -P 0x55 1M 192k', 'write -z 4M 128k', 'write -P 0x11 9M 4k'];


const cases: ImageCase[] = [
  {
    file: 'sparse.raw',
    make: async () => {
      await qemuImgOk(['create', '-q', '-f', 'raw', 'sparse.raw', '64M'], dir);
      await qemuIoOk('sparse.raw', 'raw', ['write -P 0x11 1M 256k', 'write -P 0x22 10M 4k', 'write -P 0 20M 64k', 'write -P 0x33 67108352 512'], dir);
    },
  },
  {
    file: 'dense.raw',
    make: async () => writeFileSync(join(dir, 'dense.raw'), randomBytes(4 * MiB)),
  },
  {
    file: 'mixed.raw',
    make: async () => {
      const b = randomBytes(3 * MiB);
      b.fill(0, 4096, 4096 + 8192); // zero run of two sparse blocks inside data
      b.fill(0, MiB, MiB + 1000); // zero run shorter than a block
      b.fill(0, 2 * MiB + 512, 2 * MiB + 512 + 3584); // unaligned zero run
      writeFileSync(join(dir, 'mixed.raw'), b);
    },
  },
  { file: 'odd.raw', make: async () => writeFileSync(join(dir, 'odd.raw'), randomBytes(1000)) },
  { file: 'empty.raw', make: async () => writeFileSync(join(dir, 'empty.raw'), Buffer.alloc(0)) },
  { file: 'default.qcow2', make: () => qcow2('default.qcow2', '64M', [], DATA_WRITES) },
  { file: 'v2.qcow2', make: () => qcow2('v2.qcow2', '64M', ['compat=0.10'], DATA_WRITES) },
  { file: 'c512.qcow2', make: () => qcow2('c512.qcow2', '16M', ['cluster_size=512'], DATA_WRITES) },
  { file: 'c2m.qcow2', make: () => qcow2('c2m.qcow2', '64M', ['cluster_size=2M'], DATA_WRITES) },
  {
    file: 'discarded.qcow2',
    make: () => qcow2('discarded.qcow2', '64M', [], [...DATA_WRITES, 'discard 1M 64k', 'write -z -u 9M 64k']),
  },
  {
    file: 'extl2-backing.qcow2',
    chain: true,
    make: async () => {
      await qcow2('extl2-base.qcow2', '8M', [], ['write -P 0x10 0 1M']);
      await qcow2('extl2-backing.qcow2', '8M', ['extended_l2=on', 'backing_file=extl2-base.qcow2', 'backing_fmt=qcow2'], [
        'write -P 0x20 4k 4k', 'write -z 64k 2k', 'write -P 0x30 128k 64k', 'discard 128k 4k',
      ]);
    },
  },
  {
    file: 'truncated.qcow2',
    make: async () => {
      // The last data cluster runs past the end of the file: that part reads as zeros.
      await qcow2('truncated.qcow2', '8M', [], ['write -P 1 0 64k', 'write -P 2 1M 64k']);
      const path = join(dir, 'truncated.qcow2');
      truncateSync(path, statSync(path).size - 32768);
    },
  },
  { file: 'lazy.qcow2', make: () => qcow2('lazy.qcow2', '64M', ['lazy_refcounts=on'], DATA_WRITES) },
  { file: 'refbits1.qcow2', make: () => qcow2('refbits1.qcow2', '8M', ['refcount_bits=1'], DATA_WRITES.slice(0, 2)) },
  {
    file: 'extl2.qcow2',
    make: () =>
      qcow2('extl2.qcow2', '64M', ['extended_l2=on'], [
        'write -P 0xaa 0 4k', 'write -P 0xbb 12k 8k', 'write -z 64k 64k', 'write -P 1 1M 2k',
        // Subclusters discarded inside an allocated cluster: QEMU's UNALLOCATED_ALLOC.
        'write -P 2 2M 64k', 'discard 2M 8k', 'write -z 2129920 4k',
      ]),
  },
  {
    file: 'zstd.qcow2',
    make: () => qcow2('zstd.qcow2', '64M', ['compression_type=zstd'], ['write -c -P 0xaa 0 64k', 'write -P 0x55 1M 64k']),
  },
  {
    file: 'zlib-compressed.qcow2',
    make: () => qcow2('zlib-compressed.qcow2', '64M', [], ['write -c -P 0xaa 0 64k', 'write -c -P 0xcc 128k 64k']),
  },
  {
    file: 'datafile.qcow2',
    make: () => qcow2('datafile.qcow2', '64M', ['data_file=datafile.data'], DATA_WRITES),
  },
  {
    file: 'datafile-raw.qcow2',
    make: () => qcow2('datafile-raw.qcow2', '64M', ['data_file=datafile-raw.data', 'data_file_raw=on'], DATA_WRITES),
  },
  { file: 'prealloc-metadata.qcow2', make: () => qcow2('prealloc-metadata.qcow2', '16M', ['preallocation=metadata'], ['write -P 0x11 1M 64k']) },
  { file: 'prealloc-falloc.qcow2', make: () => qcow2('prealloc-falloc.qcow2', '16M', ['preallocation=falloc'], ['write -P 0x11 1M 64k']) },
  { file: 'prealloc-full.qcow2', make: () => qcow2('prealloc-full.qcow2', '16M', ['preallocation=full'], ['write -P 0x11 1M 64k']) },
  {
    file: 'huge.qcow2',
    noConvert: true,
    make: () => qcow2('huge.qcow2', '16T', [], ['write -P 0xaa 0 64k', 'write -P 0xbb 8T 64k', 'write -P 0xcc 17592185978880 64k']),
  },
  {
    file: 'snap.qcow2',
    snapshots: ['one', '2', 'snapshot.id=1', 'snapshot.name=two'],
    make: async () => {
      await qcow2('snap.qcow2', '64M', [], ['write -P 0x11 0 64k']);
      await qemuImgOk(['snapshot', '-c', 'one', 'snap.qcow2'], dir);
      await qemuIoOk('snap.qcow2', 'qcow2', ['write -P 0x22 0 64k', 'write -P 0x33 2M 64k'], dir);
      await qemuImgOk(['snapshot', '-c', 'two', 'snap.qcow2'], dir);
      await qemuIoOk('snap.qcow2', 'qcow2', ['write -z 0 64k'], dir);
    },
  },
  {
    file: 'bitmaps.qcow2',
    make: async () => {
      await qcow2('bitmaps.qcow2', '64M', [], ['write -P 0x11 0 64k']);
      await qemuImgOk(['bitmap', '--add', 'bitmaps.qcow2', 'b0'], dir);
      await qemuImgOk(['bitmap', '--add', '-g', '512k', 'bitmaps.qcow2', 'second-bitmap'], dir);
      await qemuImgOk(['bitmap', '--disable', 'bitmaps.qcow2', 'second-bitmap'], dir);
    },
  },
  {
    file: 'overlay.qcow2',
    chain: true,
    make: async () => {
      await qcow2('base.qcow2', '64M', [], ['write -P 0x11 0 1M', 'write -P 0x22 8M 64k']);
      await qcow2('overlay.qcow2', '64M', ['backing_file=base.qcow2', 'backing_fmt=qcow2'], ['write -P 0x33 512k 64k', 'write -z 8M 4k']);
    },
  },
  {
    file: 'sub/overlay-rel.qcow2',
    chain: true,
    make: async () => {
      mkdirSync(join(dir, 'sub'), { recursive: true });
      await qcow2('base-for-rel.qcow2', '32M', [], ['write -P 0x44 0 128k']);
      await qcow2('sub/overlay-rel.qcow2', '32M', ['backing_file=../base-for-rel.qcow2', 'backing_fmt=qcow2'], ['write -P 0x55 64k 64k']);
    },
  },
  {
    file: 'overlay-rawbase.qcow2',
    chain: true,
    make: async () => {
      await qemuImgOk(['create', '-q', '-f', 'raw', 'rawbase.raw', '4M'], dir);
      await qemuIoOk('rawbase.raw', 'raw', ['write -P 0x66 0 1M'], dir);
      // Backing shorter than the overlay.
      await qcow2('overlay-rawbase.qcow2', '16M', ['backing_file=rawbase.raw', 'backing_fmt=raw'], ['write -P 0x77 2M 64k']);
    },
  },
  {
    file: 'overlay-probed.qcow2',
    chain: true,
    make: async () => {
      await qcow2('probed-base.qcow2', '8M', [], ['write -P 0x12 0 64k']);
      // No backing format recorded (qemu-img 7.2 refuses to write that, so the extension's type is
      // overwritten with an unknown one, which QEMU skips): the backing file is probed.
      await qcow2('overlay-probed.qcow2', '8M', ['backing_file=probed-base.qcow2', 'backing_fmt=qcow2']);
      const path = join(dir, 'overlay-probed.qcow2');
      const head = readFileSync(path);
      const at = head.subarray(0, 4096).indexOf(Buffer.from([0xe2, 0x79, 0x2a, 0xca]));
      if (at < 0) throw new Error('backing format extension not found');
      head.writeUInt32BE(0x7a7a7a7a, at);
      writeFileSync(path, head);
    },
  },
  {
    file: 'chain3.qcow2',
    chain: true,
    make: async () => {
      await qcow2('chain1.qcow2', '16M', [], ['write -P 1 0 1M']);
      await qcow2('chain2.qcow2', '16M', ['backing_file=chain1.qcow2', 'backing_fmt=qcow2'], ['write -P 2 512k 1M']);
      await qcow2('chain3.qcow2', '16M', ['backing_file=chain2.qcow2', 'backing_fmt=qcow2'], ['write -P 3 1M 1M', 'write -z 0 64k']);
    },
  },
  {
    file: 'dirty.qcow2',
    make: async () => {
      await qcow2('dirty.qcow2', '8M', ['lazy_refcounts=on'], ['write -P 0x11 0 64k']);
      setHeaderBit('dirty.qcow2', 72, 0); // incompatible bit 0: dirty
    },
  },
  {
    file: 'corrupt.qcow2',
    make: async () => {
      await qcow2('corrupt.qcow2', '8M', [], ['write -P 0x11 0 64k']);
      setHeaderBit('corrupt.qcow2', 72, 1); // incompatible bit 1: corrupt
    },
  },
  {
    file: 'named snapshots ü "q".qcow2',
    snapshots: ['ünïcode-näme-longer-than-sixteen', 'snapshot.id=2'],
    make: async () => {
      const f = 'named snapshots ü "q".qcow2';
      await qcow2(f, '8M', [], ['write -P 0x11 0 64k']);
      await qemuImgOk(['snapshot', '-c', 'ünïcode-näme-longer-than-sixteen', f], dir);
      await qemuIoOk(f, 'qcow2', ['write -P 0x22 64k 64k'], dir);
      await qemuImgOk(['snapshot', '-c', 'x\ttab\\slash', f], dir);
      await qemuIoOk(f, 'qcow2', ['write -P 0x33 1M 64k'], dir);
      await qemuImgOk(['snapshot', '-c', 'twelve-chars', f], dir);
    },
  },
  {
    file: 'missing-backing.qcow2',
    make: async () => {
      await qemuImgOk(['create', '-q', '-f', 'qcow2', '-u', '-b', 'does-not-exist.qcow2', '-F', 'qcow2', 'missing-backing.qcow2', '8M'], dir);
    },
    noConvert: true,
  },
];

/** Sets one bit of a big-endian u64 header field (offset in bytes) of an image in `dir`. */
function setHeaderBit(file: string, fieldOffset: number, bit: number): void {
  const path = join(dir, file);
  const head = readFileSync(path);
  head[fieldOffset + 7 - (bit >> 3)] |= 1 << (bit & 7);
  writeFileSync(path, head);
}

beforeAll(async () => {
  await cliPath();
  // Each case makes its own files (backing files included): side by side.
  await Promise.all(cases.map((c) => c.make()));
}, 300_000);

function expectSame(r: { qemu: { code: number; stdout: string; stderr: string }; ours: { code: number; stdout: string; stderr: string } }): void {
  expect(r.ours.stdout).toBe(r.qemu.stdout);
  expect(r.ours.stderr).toBe(asQimg(r.qemu.stderr));
  expect(r.ours.code).toBe(r.qemu.code);
}

describe.each(cases)('$file', (c) => {
  it('info (human)', async () => expectSame(await both(['info', c.file], dir)));
  it('info --output=json', async () => expectSame(await both(['info', '--output=json', c.file], dir)));
  // Only the snapshot table's DATE column is in local time: the other images print the same in
  // every time zone ('info (human)' above).
  if (c.snapshots) {
    it('info in UTC and another time zone', async () => {
      expectSame(await both(['info', c.file], dir, { TZ: 'UTC' }));
      expectSame(await both(['info', c.file], dir, { TZ: 'America/St_Johns' }));
    });
  }
  if (c.chain) {
    it('info --backing-chain (human and JSON)', async () => {
      expectSame(await both(['info', '--backing-chain', c.file], dir));
      expectSame(await both(['info', '--backing-chain', '--output=json', c.file], dir));
    });
  }
  it('map (human)', async () => expectSame(await both(['map', c.file], dir)));
  it('map --output=json', async () => expectSame(await both(['map', '--output=json', c.file], dir)));
  it('map with --start-offset/--max-length', async () => {
    expectSame(await both(['map', '--output=json', '--start-offset=64k', '--max-length=1M', c.file], dir));
    expectSame(await both(['map', '-s', '1000', '-l', '5M', c.file], dir));
  });
  if (!c.noConvert) {
    it('convert -O raw: the bytes and host allocation of qemu-img convert', async () => {
      const name = c.file.replace(/\W/g, '_');
      const convertBoth = async (opts: string[], what: string): Promise<void> => {
        const ref = `${name}.ref.raw`;
        const out = `${name}.out.raw`;
        // Two outputs of one source, which both tools only read: side by side.
        const [, r] = await Promise.all([
          qemuImgOk(['convert', ...opts, '-O', 'raw', c.file, ref], dir),
          qimg(['convert', ...opts, '-O', 'raw', c.file, out], dir),
        ]);
        expect(r.stderr).toBe('');
        expect(r.code).toBe(0);
        // As sparse as qemu-img's output: the same data ranges, st_blocks up to extent bookkeeping.
        const [a, b] = await compareHostAllocation(join(dir, out), join(dir, ref), what);
        await expectSameFileBytes(a, b, what);
        rmSync(join(dir, ref));
        rmSync(join(dir, out));
      };
      await convertBoth([], c.file);
      for (const sn of c.snapshots ?? []) await convertBoth(['-l', sn], `${c.file}, snapshot ${sn}`);
    });
  }
});

describe('getopt syntax as qemu-img accepts it', () => {
  it.each([
    [['info', '-fqcow2', 'default.qcow2']],
    [['info', 'default.qcow2', '--output', 'json']],
    [['info', '--outp=json', '-U', 'default.qcow2']],
    [['info', '-U', '--force-share', '--format=qcow2', '--', 'default.qcow2']],
    [['map', '-Uf', 'qcow2', 'default.qcow2', '--output=json']],
    [['map', '--start-offset', '1.5M', '--max-length=0x100000', 'default.qcow2']],
    [['map', '-s', '2k', 'sparse.raw']],
    [['info', '--backing-chain', '--output=human', 'chain3.qcow2']],
    [['info', '-xU', 'default.qcow2']],
  ])('%j', async (args) => expectSame(await both(args, dir)));
});

describe('convert options', () => {
  const variants: [string, string[], string[]][] = [
    ['-S 0 (fully allocated)', ['-S', '0'], ['mixed.raw']],
    ['-S 64k', ['-S', '64k'], ['mixed.raw']],
    ['-m 1 -W', ['-m', '1', '-W'], ['default.qcow2']],
    ['-q -U -f qcow2', ['-q', '-U', '-f', 'qcow2'], ['chain3.qcow2']],
    ['two sources concatenated', [], ['odd.raw', 'default.qcow2']],
    ['three sources concatenated', [], ['c512.qcow2', 'mixed.raw', 'overlay.qcow2']],
  ];
  it.each(variants)('%s', async (name, opts, sources) => {
    const [, r] = await Promise.all([
      qemuImgOk(['convert', ...opts, '-O', 'raw', ...sources, 'opt-ref.raw'], dir),
      qimg(['convert', ...opts, '-O', 'raw', ...sources, 'opt-out.raw'], dir),
    ]);
    expect(r.stderr).toBe('');
    expect(r.stdout).toBe('');
    expect(r.code).toBe(0);
    // The bytes, and what -S decides: which ranges are written and which left as holes.
    const [a, b] = await compareHostAllocation(join(dir, 'opt-out.raw'), join(dir, 'opt-ref.raw'), name);
    await expectSameFileBytes(a, b, name);
    if (opts.includes('0')) expect(a.blocks * 512).toBeGreaterThanOrEqual(a.length);
  });

  it.each([[['-n']], [['-n', '--target-is-zero']]])('%j onto an existing target', async (opts) => {
    // A target larger than the 16M source, holding garbage: -n keeps what lies past the source.
    const junk = opts.includes('--target-is-zero') ? Buffer.alloc(20 * MiB) : Buffer.alloc(20 * MiB, 0x5a);
    for (const out of ['n-ref.raw', 'n-out.raw']) writeFileSync(join(dir, out), junk);
    const [, r] = await Promise.all([
      qemuImgOk(['convert', ...opts, '-O', 'raw', 'c512.qcow2', 'n-ref.raw'], dir),
      qimg(['convert', ...opts, '-O', 'raw', 'c512.qcow2', 'n-out.raw'], dir),
    ]);
    expect(r.stderr).toBe('');
    expect(r.code).toBe(0);
    const [a, b] = await compareHostAllocation(join(dir, 'n-out.raw'), join(dir, 'n-ref.raw'), `convert ${opts.join(' ')}`);
    await expectSameFileBytes(a, b, `convert ${opts.join(' ')}`);
  });

  it('-n onto a smaller target fails as qemu-img does', async () => {
    writeFileSync(join(dir, 'small.raw'), Buffer.alloc(4096));
    expectSame(await both(['convert', '-n', '-O', 'raw', 'default.qcow2', 'small.raw'], dir));
  });
});

describe('convert -p progress', () => {
  it.each(['sparse.raw', 'dense.raw', 'default.qcow2', 'c512.qcow2', 'chain3.qcow2'])('%s', async (file) => {
    const [q, o] = await Promise.all([
      qemuImg(['convert', '-p', '-O', 'raw', file, 'progress-ref.raw'], dir),
      qimg(['convert', '-p', '-O', 'raw', file, 'progress-out.raw'], dir),
    ]);
    expect(o.stdout).toBe(q.stdout);
    expect(o.code).toBe(0);
  });
});

describe('errors as qemu-img reports them (qimg: prefix, same exit status)', () => {
  beforeAll(async () => {
    writeFileSync(join(dir, 'garbage.bin'), randomBytes(65536));
    await qcow2('lost-data-file.qcow2', '8M', ['data_file=lost-data-file.data'], ['write -P 1 0 64k']);
    rmSync(join(dir, 'lost-data-file.data'));
  });
  const errorCases: [string, string[]][] = [
    ['missing file (info)', ['info', 'no-such-file.qcow2']],
    ['missing file (map)', ['map', 'no-such-file.qcow2']],
    ['missing file (convert)', ['convert', '-O', 'raw', 'no-such-file.qcow2', 'x.raw']],
    ['garbage with -f qcow2 (info)', ['info', '-f', 'qcow2', 'garbage.bin']],
    ['garbage with -f qcow2 (map)', ['map', '-f', 'qcow2', 'garbage.bin']],
    ['garbage with -f qcow2 (convert)', ['convert', '-f', 'qcow2', '-O', 'raw', 'garbage.bin', 'x.raw']],
    ['unknown format', ['info', '-f', 'foo', 'garbage.bin']],
    ['no arguments', []],
    ['unknown command', ['frobnicate']],
    ['info without file', ['info']],
    ['info with two files', ['info', 'a', 'b']],
    ['unknown short option', ['info', '-x', 'garbage.bin']],
    ['unknown long option', ['info', '--foo=1', 'garbage.bin']],
    ['argument to a flag', ['info', '--backing-chain=1', 'garbage.bin']],
    ['missing option argument', ['info', '-f']],
    ['missing long option argument', ['map', 'garbage.bin', '--output']],
    ['bad --output', ['info', '--output=xml', 'garbage.bin']],
    ['bad --start-offset', ['map', '--start-offset=1x', 'garbage.bin']],
    ['compressed clusters in human map', ['map', 'zlib-compressed.qcow2']],
    ['convert without files', ['convert', '-O', 'raw']],
    ['convert unknown output format', ['convert', '-O', 'qcow3', 'garbage.bin', 'x.raw']],
    ['convert bad -S', ['convert', '-S', '100', 'garbage.bin', 'x.raw']],
    ['convert bad -m', ['convert', '-m', '20', 'garbage.bin', 'x.raw']],
    ['convert missing snapshot', ['convert', '-l', 'nope', '-O', 'raw', 'snap.qcow2', 'x.raw']],
    ['convert bad snapshot param', ['convert', '-l', 'snapshot.foo=1', '-O', 'raw', 'snap.qcow2', 'x.raw']],
    ['convert snapshot of raw', ['convert', '-l', 'x', '-O', 'raw', 'garbage.bin', 'x.raw']],
    ['convert into a missing directory', ['convert', '-O', 'raw', 'garbage.bin', 'no/such/dir/x.raw']],
    ['convert onto its own source', ['convert', '-O', 'raw', 'garbage.bin', 'garbage.bin']],
    ['convert onto the source\'s backing file', ['convert', '-O', 'raw', 'overlay.qcow2', 'base.qcow2']],
    ['backing chain with a missing backing file', ['info', '--backing-chain', 'missing-backing.qcow2']],
    ['map with a missing backing file', ['map', 'missing-backing.qcow2']],
    // info does not open the data file (QEMU opens with BDRV_O_NO_IO); map and convert must.
    ['info with a missing data file', ['info', 'lost-data-file.qcow2']],
    ['map with a missing data file', ['map', 'lost-data-file.qcow2']],
    ['convert with a missing data file', ['convert', '-O', 'raw', 'lost-data-file.qcow2', 'x.raw']],
  ];
  it.each(errorCases)('%s', async (_name, args) => {
    const r = await both(args, dir);
    expectSame(r);
  });
});
