// Bad input: qemu-made qcow2 files broken by patching bytes. qimg must refuse each with a QimgError
// whose message is exactly what QEMU says about the same file (where QEMU refuses it too), never
// hang, never throw a TypeError/RangeError; where QEMU reads the file, qimg must read the same
// bytes. Every case checks its expected text against the live QEMU as well (qemu-img info for what
// fails at open, qemu-io read for what fails while reading), so an expectation cannot drift from
// QEMU's; and for what fails at open, `qimg info` must print what `qemu-img info` prints (the
// file named, the same exit code). QIMG_SHOW_QEMU=1 prints what QEMU said about every case.

import { copyFileSync, statSync, truncateSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import fc from 'fast-check';
import { afterAll, describe, expect, it } from 'vitest';
import { NotFoundError, QimgError } from '../../src/errors.js';
import { MemoryStorage } from '../../src/io/memory.js';
import type { StorageGate } from '../../src/io/storage.js';
import type { OpenImageOptions } from '../../src/open.js';
import { asQimg, qimg } from '../cli/harness.js';
import { EXT_FEATURE_TABLE, getField, headerExtensions, readAt, setField, u64, writeAt } from '../helpers/craft.js';
import { checkProperty } from '../helpers/property.js';
import { MiB, expectSameBytes, getOpenImage, prng, qemuImg, qemuIo, run, tmpDir, withImage, type ToolResult } from '../helpers/qemu.js';

const dir = tmpDir('qimg-bad-input-');
let seq = 0;
const path = (name: string): string => join(dir, `${seq++}-${name}`);

/** The size of validImage's disk: more than one L1 entry's span (2 MiB at 4 KiB clusters). */
const DISK = 4 * MiB;

/**
 * A valid small image: 4 KiB clusters (so header, reftable, refblock, L1 and L2 tables sit in the
 * first clusters), data in two L2 tables (L1 entries 0 and 1), the second run at L2 index 128.
 * Made once; each case patches its own copy.
 */
let template: Promise<string> | undefined;
async function validImage(name: string): Promise<string> {
  template ??= (async () => {
    const file = path('template.qcow2');
    await qemuImg(['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=4096', file, String(DISK)]);
    await qemuIo(file, ['write -P 0x11 0 64k', 'write -P 0x22 512k 4k', 'write -P 0x33 3M 4k']);
    return file;
  })();
  const file = path(name);
  copyFileSync(await template, file);
  return file;
}

/** Bytes of the seeded prng (the garbage cases must give the same message on every run). */
function seededBytes(seed: number, n: number): Buffer {
  const rand = prng(seed);
  const b = Buffer.alloc(n);
  for (let i = 0; i < n; i++) b[i] = Math.floor(rand() * 256);
  return b;
}

interface QemuSays {
  info: ToolResult;
  read: ToolResult;
}

const qemuSays: { name: string; said: QemuSays }[] = [];

const NOT_RUN: ToolResult = { code: -1, stdout: '', stderr: 'not run' };

/**
 * qemu-img info --backing-chain and, when `read`, a full qemu-io read of the file (where qemu-img
 * info fails, qemu-io fails to open it the same way). Both bounded: qemu-io 7.2 spins for minutes
 * on a backing loop, so the loop cases never run it.
 */
async function askQemu(name: string, file: string, read: boolean): Promise<QemuSays> {
  const [info, readResult] = await Promise.all([
    run('qemu-img', ['info', '--backing-chain', '-f', 'qcow2', file], { timeoutMs: 20_000 }),
    read ? run('qemu-io', ['-r', '-f', 'qcow2', '-c', `read 0 ${DISK}`, file], { timeoutMs: 20_000 }) : NOT_RUN,
  ]);
  const said = { info, read: readResult };
  qemuSays.push({ name, said });
  return said;
}

const brief = (r: ToolResult): string => `exit ${r.code}: ${(r.stderr + r.stdout).trim().split('\n').slice(0, 2).join(' / ')}`;

afterAll(() => {
  if (process.env.QIMG_SHOW_QEMU) {
    for (const e of qemuSays) console.log(`${e.name}\n  qemu-img info: ${brief(e.said.info)}\n  qemu-io read:  ${brief(e.said.read)}`);
  }
});

/** Opens, reads the whole (small) disk, walks block status, closes; whatever it throws is returned. */
async function openReadAll(target: string | MemoryStorage, options: OpenImageOptions = {}): Promise<unknown> {
  const openImage = getOpenImage();
  try {
    const { image } = await openImage(target, { format: 'qcow2', ...options });
    try {
      const size = image.virtualSize;
      const step = MiB;
      // A corrupt header may claim an enormous disk: read its first and last MiB only.
      const ranges: [number, number][] =
        size <= 64 * MiB ? [[0, size]] : [[0, step], [size - step, step]];
      for (const [start, len] of ranges) {
        for (let off = start; off < start + len; off += step) await image.read(off, Math.min(step, start + len - off));
      }
      let runs = 0;
      for await (const st of image.blockStatus()) {
        void st;
        if (++runs > 20_000) break;
      }
    } finally {
      await image.close();
    }
    return undefined;
  } catch (e) {
    return e;
  }
}

/** err must be a QimgError whose message is exactly `message`. */
function expectQimgError(err: unknown, message: string, context: string): void {
  if (err === undefined) throw new Error(`${context}: qimg opened and read it without an error`);
  if (!(err instanceof QimgError)) {
    throw new Error(`${context}: expected a QimgError, got ${(err as Error)?.constructor?.name}: ${(err as Error)?.message}\n${(err as Error)?.stack}`);
  }
  expect(err.message, context).toBe(message);
}

/**
 * QEMU's verdict on the same file, which the case's expected message must match:
 * - 'open': qemu-img info fails with "Could not open '<file>': <message>" (and with `cli`, `qimg
 *   info` must print exactly the same, as qimg, with the same exit code);
 * - 'read': qemu-img info opens it, and qemu-io's read reports "Image is corrupt: <message>";
 * - 'reads': QEMU opens and reads it without complaint (it reads zeros past the end of the file
 *   and ignores what it does not look at): qimg must read the same bytes;
 * - { differs }: QEMU does not read it either (qemu-io's read fails), for the reason given, with
 *   a message of its own; qimg's own message is asserted.
 */
type QemuVerdict = 'open' | 'read' | 'reads' | { differs: string };

interface BadCase {
  name: string;
  make: () => Promise<string>;
  /** qimg's message, exactly (a function of the file for the messages that name it). */
  message?: string | ((file: string) => string);
  qemu: QemuVerdict;
  /**
   * Also run `qimg info` on the file. Not for every case: the CLI puts every open failure through
   * the same "Could not open '<file>': " path, and each qimg process costs ~0.3 s of CPU.
   */
  cli?: boolean;
  options?: OpenImageOptions;
}

/** The host offset of L2 table number `l1Index` (from the L1 table). */
function l2TableOffset(file: string, l1Index: number): number {
  const l1 = Number(getField(file, 'l1_table_offset'));
  return Number(readAt(file, l1 + 8 * l1Index, 8).readBigUInt64BE(0) & 0x00fffffffffffe00n);
}

const cases: BadCase[] = [
  {
    name: 'truncated inside the header (50 bytes left)',
    make: async () => {
      const f = await validImage('trunc-header.qcow2');
      truncateSync(f, 50);
      return f;
    },
    message: 'qcow2 header too short',
    qemu: 'open',
    cli: true,
  },
  {
    name: 'truncated after the header cluster (tables and data gone)',
    make: async () => {
      const f = await validImage('trunc-tables.qcow2');
      truncateSync(f, 4096 + 100);
      return f;
    },
    qemu: 'reads',
  },
  {
    name: 'bad magic with the format forced to qcow2',
    make: async () => {
      const f = await validImage('magic.qcow2');
      writeAt(f, 0, Buffer.from('QFJ\xfb', 'latin1'));
      return f;
    },
    message: 'Image is not in qcow2 format',
    qemu: 'open',
  },
  ...[1, 4].map((v): BadCase => ({
    name: `version ${v}`,
    make: async () => {
      const f = await validImage(`version${v}.qcow2`);
      setField(f, 'version', v);
      return f;
    },
    message: `Unsupported qcow2 version ${v}`,
    qemu: 'open',
  })),
  ...[8, 22].map((bits): BadCase => ({
    name: `cluster_bits ${bits}`,
    make: async () => {
      const f = await validImage(`cbits${bits}.qcow2`);
      setField(f, 'cluster_bits', bits);
      return f;
    },
    message: `Unsupported cluster size: 2^${bits}`,
    qemu: 'open',
  })),
  {
    name: "l1_size larger than QEMU's 32 MiB L1 limit",
    make: async () => {
      const f = await validImage('l1huge.qcow2');
      setField(f, 'l1_size', 0x1000000); // 16 Mi entries = 128 MiB
      return f;
    },
    message: 'Active L1 table too large',
    qemu: 'open',
  },
  {
    name: 'l1_size smaller than the virtual size needs',
    make: async () => {
      const f = await validImage('l1small.qcow2');
      setField(f, 'size', 1n << 40n); // 1 TiB needs 512 L1 entries at 4 KiB clusters; l1_size stays 2
      return f;
    },
    message: 'L1 table is too small',
    qemu: 'open',
  },
  {
    name: "refcount_table_clusters beyond QEMU's 8 MiB reftable limit",
    make: async () => {
      const f = await validImage('rthuge.qcow2');
      setField(f, 'refcount_table_clusters', 0x1000000);
      return f;
    },
    message: 'Reference count table too large',
    qemu: 'open',
  },
  {
    name: 'l1_table_offset past the end of the file',
    make: async () => {
      const f = await validImage('l1eof.qcow2');
      setField(f, 'l1_table_offset', 1n << 40n);
      return f;
    },
    qemu: 'reads',
  },
  {
    name: 'l1_table_offset not cluster-aligned',
    make: async () => {
      const f = await validImage('l1unal.qcow2');
      setField(f, 'l1_table_offset', getField(f, 'l1_table_offset') + 8n);
      return f;
    },
    message: 'Active L1 table offset invalid',
    qemu: 'open',
  },
  {
    name: 'refcount_table_offset not cluster-aligned',
    make: async () => {
      const f = await validImage('rtunal.qcow2');
      setField(f, 'refcount_table_offset', getField(f, 'refcount_table_offset') + 8n);
      return f;
    },
    message: 'Reference count table offset invalid',
    qemu: 'open',
    cli: true,
  },
  {
    // L1 entry 1, not 0: QEMU prints the index with C's %#x, which writes 0 (not 0x0) for zero.
    name: 'L2 table offset (in L1 entry 1) not cluster-aligned',
    make: async () => {
      const f = await validImage('l2unal.qcow2');
      const at = Number(getField(f, 'l1_table_offset')) + 8;
      writeAt(f, at, u64(readAt(f, at, 8).readBigUInt64BE(0) + 0x200n));
      return f;
    },
    // (The L1 entry's offset mask keeps bit 9: l2TableOffset reads the patched, unaligned offset.)
    message: (f) => `L2 table offset 0x${l2TableOffset(f, 1).toString(16)} unaligned (L1 index: 0x1)`,
    qemu: 'read',
  },
  {
    name: 'L1 entry with reserved bits set',
    make: async () => {
      const f = await validImage('l1reserved.qcow2');
      const l1 = Number(getField(f, 'l1_table_offset'));
      const e = readAt(f, l1, 8).readBigUInt64BE(0);
      writeAt(f, l1, u64(e | (1n << 60n)));
      return f;
    },
    qemu: 'reads',
  },
  {
    // L2 index 128 (guest 512 KiB), not 0: see the L1 entry case above.
    name: 'L2 entry pointing to an unaligned data cluster',
    make: async () => {
      const f = await validImage('dataunal.qcow2');
      const at = l2TableOffset(f, 0) + 8 * 128;
      writeAt(f, at, u64(readAt(f, at, 8).readBigUInt64BE(0) + 0x200n));
      return f;
    },
    message: (f) => {
      const l2 = l2TableOffset(f, 0);
      const data = Number(readAt(f, l2 + 8 * 128, 8).readBigUInt64BE(0) & 0x00fffffffffffe00n);
      return `Cluster allocation offset 0x${data.toString(16)} unaligned (L2 offset: 0x${l2.toString(16)}, L2 index: 0x80)`;
    },
    qemu: 'read',
  },
  {
    name: 'unknown incompatible feature bit 7 named in the feature-name table',
    make: async () => {
      const f = await validImage('feat-named.qcow2');
      // qemu-img 7.2 writes no feature-name table with 4 KiB clusters: add one where the
      // extension list starts (this image has no backing file name to collide with).
      expect(headerExtensions(f)).toEqual([]);
      const at = Number(getField(f, 'header_length'));
      const ext = Buffer.alloc(8 + 48 + 8);
      ext.writeUInt32BE(EXT_FEATURE_TABLE, 0);
      ext.writeUInt32BE(48, 4);
      ext[8] = 0; // incompatible
      ext[9] = 7;
      ext.write('qimg test feature', 10, 'latin1');
      writeAt(f, at, ext); // followed by the zero end-of-list marker
      setField(f, 'incompatible_features', 1n << 7n);
      return f;
    },
    message: 'Unsupported qcow2 feature(s): qimg test feature',
    qemu: 'open',
    cli: true,
  },
  {
    name: 'unknown incompatible feature bit 7 without a name',
    make: async () => {
      const f = await validImage('feat-unnamed.qcow2');
      setField(f, 'incompatible_features', 1n << 7n);
      return f;
    },
    message: 'Unsupported qcow2 feature(s): Unknown incompatible feature: 80',
    qemu: 'open',
  },
  ...[1, 2].map((m): BadCase => ({
    name: `crypt_method ${m} (${m === 1 ? 'AES' : 'LUKS'}) patched in`,
    make: async () => {
      const f = await validImage(`crypt${m}.qcow2`);
      setField(f, 'crypt_method', m);
      return f;
    },
    // QEMU asks for the key (AES) or misses the LUKS header; qimg reads no encrypted image.
    message: `Encrypted qcow2 images are not supported (crypt_method ${m})`,
    qemu: { differs: 'QEMU wants a key secret (AES) or a LUKS header extension; qimg has no encryption' },
  })),
  {
    name: 'snapshot table past the end of the file',
    make: async () => {
      const f = await validImage('snapeof.qcow2');
      await qemuImg(['snapshot', '-c', 's1', f]);
      setField(f, 'snapshots_offset', 1n << 40n);
      return f;
    },
    qemu: 'reads',
  },
  {
    name: 'nb_snapshots huge',
    make: async () => {
      const f = await validImage('snapmany.qcow2');
      await qemuImg(['snapshot', '-c', 's1', f]);
      setField(f, 'nb_snapshots', 0x7fffffff);
      return f;
    },
    message: 'Snapshot table too large',
    qemu: 'open',
  },
  {
    name: 'garbage file (seeded random bytes) with the format forced to qcow2',
    make: async () => {
      const f = path('garbage.qcow2');
      writeFileSync(f, seededBytes(1, 64 * 1024));
      return f;
    },
    message: 'Image is not in qcow2 format',
    qemu: 'open',
  },
  {
    name: 'garbage after a valid magic',
    make: async () => {
      const f = path('garbage-magic.qcow2');
      const b = seededBytes(2, 64 * 1024);
      b.write('QFI\xfb', 0, 'latin1');
      writeFileSync(f, b);
      return f;
    },
    message: `Unsupported qcow2 version ${seededBytes(2, 8).readUInt32BE(4)}`,
    qemu: 'open',
  },
];

/** What `qimg info --backing-chain -f qcow2 file` prints must be what qemu-img info printed (as qimg). */
async function expectInfoLikeQemu(file: string, qemu: ToolResult, context: string): Promise<void> {
  const ours = await qimg(['info', '--backing-chain', '-f', 'qcow2', file], dir);
  expect({ code: ours.code, stderr: ours.stderr, stdout: ours.stdout }, `${context}: qimg info vs qemu-img info`).toEqual({
    code: qemu.code,
    stderr: asQimg(qemu.stderr),
    stdout: qemu.stdout,
  });
}

// Concurrent: every case has its own files and waits mostly on its subprocesses.
describe.concurrent('bad input: qimg refuses broken qcow2 files with the message QEMU gives', () => {
  for (const c of cases) {
    it(c.name, async () => {
      const file = await c.make();
      const q = await askQemu(c.name, file, c.qemu !== 'open');
      const err = await openReadAll(file, c.options);
      const context = `${c.name} (qemu-img info ${brief(q.info)}; qemu-io read ${brief(q.read)})`;
      if (c.qemu === 'reads') {
        expect(q.info.code, context).toBe(0);
        expect({ code: q.read.code, said: q.read.stdout.split('\n')[0] }, context).toEqual({ code: 0, said: `read ${DISK}/${DISK} bytes at offset 0` });
        if (err !== undefined) throw new Error(`${context}: QEMU reads it, qimg refuses: ${(err as Error).message}`);
        await withImage(file, { format: 'qcow2' }, (image) => expectSameBytes(image, file, { format: 'qcow2', label: c.name }));
        return;
      }
      const message = typeof c.message === 'function' ? c.message(file) : c.message!;
      if (c.qemu === 'open') {
        // QEMU's own words for the same file; qimg's CLI must then print exactly them.
        expect(q.info.code, context).toBe(1);
        expect(q.info.stderr, context).toBe(`qemu-img: Could not open '${file}': ${message}\n`);
        if (c.cli) await expectInfoLikeQemu(file, q.info, context);
      } else if (c.qemu === 'read') {
        expect(q.info.code, context).toBe(0);
        expect(q.read.stdout + q.read.stderr, context).toContain(`qcow2: Image is corrupt: ${message}; further non-fatal corruption events will be suppressed\n`);
      } else {
        expect(q.read.code, context).not.toBe(0);
      }
      expectQimgError(err, message, context);
    });
  }

  it('a backing chain loop (a.qcow2 -> b.qcow2 -> a.qcow2, made with -u)', async () => {
    const a = path('loop-a.qcow2');
    const b = path('loop-b.qcow2');
    await qemuImg(['create', '-q', '-f', 'qcow2', a, '1M']);
    await qemuImg(['create', '-q', '-f', 'qcow2', '-u', '-b', a, '-F', 'qcow2', b, '1M']);
    await qemuImg(['rebase', '-u', '-b', b, '-F', 'qcow2', a]);
    const q = await askQemu('backing chain loop', a, false);
    const loop = `Backing file '${a}' creates an infinite loop.`;
    expect(q.info.stderr).toBe(`qemu-img: ${loop}\n`);
    await expectInfoLikeQemu(a, q.info, 'loop');
    // Opening a opens b, whose backing file a is already open: one "Could not open backing file" per level.
    expectQimgError(await openReadAll(a), `Could not open backing file: Could not open backing file: ${loop}`, 'loop');
  });

  it('a self-referencing backing file (a.qcow2 -> a.qcow2)', async () => {
    const a = path('self.qcow2');
    await qemuImg(['create', '-q', '-f', 'qcow2', a, '1M']);
    await qemuImg(['rebase', '-u', '-b', a, '-F', 'qcow2', a]);
    const q = await askQemu('self backing', a, false);
    const loop = `Backing file '${a}' creates an infinite loop.`;
    expect(q.info.stderr).toBe(`qemu-img: ${loop}\n`);
    await expectInfoLikeQemu(a, q.info, 'self loop');
    expectQimgError(await openReadAll(a), `Could not open backing file: ${loop}`, 'self loop');
  });

  it('a missing backing file', async () => {
    const a = path('missing-backing.qcow2');
    const nope = join(dir, 'nope.qcow2');
    await qemuImg(['create', '-q', '-f', 'qcow2', '-u', '-b', nope, '-F', 'qcow2', a, '1M']);
    const q = await askQemu('missing backing', a, true);
    // qemu-img info --backing-chain opens each file by itself; qemu-io opens the chain, as qimg's open does.
    await expectInfoLikeQemu(a, q.info, 'missing backing');
    const message = `Could not open backing file: Could not open '${nope}': No such file or directory`;
    expect(q.read.stderr).toBe(`qemu-io: can't open device ${a}: ${message}\n`);
    expectQimgError(await openReadAll(a), message, 'missing backing');
  });

  it('a snapshot that does not exist', async () => {
    const f = await validImage('nosnap.qcow2');
    const q = await run('qemu-img', ['convert', '-l', 'snapshot.name=nope', '-O', 'raw', f, join(dir, 'nosnap.raw')]);
    expect(q.stderr).toBe("qemu-img: Failed to load snapshot: Can't find snapshot\n");
    expectQimgError(await openReadAll(f, { snapshot: { name: 'nope' } }), "Can't find snapshot", 'missing snapshot');
  });
});

/** A gate that opens nothing: a corrupted header may name any backing or data file. */
const refuseGate: StorageGate = {
  open(name: string): Promise<never> {
    return Promise.reject(new NotFoundError(`fuzz gate refuses '${name}'`));
  },
};

describe('fuzz: flipped bytes in the header, L1, L2 and refcount tables give success or a QimgError', () => {
  it('200 mutated copies of a small image: open + read all + block status never throw another error type, with bounded work', async () => {
    // 512-byte clusters: header, reftable, refblock, L1 and the L2 tables are all in the first few KiB.
    const base = path('fuzz-base.qcow2');
    await qemuImg(['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=512,compression_type=zlib', base, '256k']);
    await qemuIo(base, ['write -P 0x11 0 4k', 'write -c -P 0x22 64k 4k', 'write -z 128k 4k', 'write -P 0x33 200k 1000']);
    await qemuImg(['snapshot', '-c', 's1', base]);
    const bytes = readAt(base, 0, statSync(base).size);
    const l1 = Number(getField(base, 'l1_table_offset'));
    const rt = Number(getField(base, 'refcount_table_offset'));
    const l2 = Number(bytes.readBigUInt64BE(l1) & 0x00fffffffffffe00n);
    const regions: [number, number][] = [
      [0, 512], // header cluster, extensions included
      [l1, 512],
      [rt, 512],
      [l2, 512],
    ];
    const flips = fc.array(
      fc.record({
        region: fc.integer({ min: 0, max: regions.length - 1 }),
        at: fc.integer({ min: 0, max: 511 }),
        value: fc.oneof(fc.integer({ min: 0, max: 255 }), fc.constantFrom(0, 0xff, 0x80, 0x7f, 0x01)),
      }),
      { minLength: 1, maxLength: 6 },
    );
    // Work is bounded by structure, not by a clock: a mutated image may cost at most READ_BUDGET
    // storage reads (reading the whole 256 KiB disk and its block status takes a few hundred).
    const READ_BUDGET = 100_000;
    await checkProperty({ name: 'fuzz: flipped metadata bytes', runs: 200 }, flips, async (fl) => {
      const mutated = Buffer.from(bytes);
      for (const f of fl) {
        const [start] = regions[f.region]!;
        if (start + f.at < mutated.length) mutated[start + f.at] = f.value;
      }
      const storage = new MemoryStorage(new Uint8Array(mutated), { name: 'fuzz.qcow2', readOnly: true });
      let reads = 0;
      const read = storage.read.bind(storage);
      storage.read = (buf, offset) => {
        if (++reads > READ_BUDGET) return Promise.reject(new Error(`more than ${READ_BUDGET} storage reads: work not bounded by the image`));
        return read(buf, offset);
      };
      const outcome = await openReadAll(storage, { gate: refuseGate });
      if (outcome !== undefined && !(outcome instanceof QimgError)) {
        const e = outcome as Error;
        throw new Error(`${e?.constructor?.name}: ${e?.message} with flips ${JSON.stringify(fl)}\n${e?.stack}`);
      }
    });
  });
});

describe('a read that fails part-way', () => {
  it('settles the reads it issued before a later mapping lookup fails (no unhandled rejection)', async () => {
    // The mutation fuzz found it: a compressed cluster that cannot be decompressed, then, in the
    // same request, an L1 entry that cannot be followed. The lookup's error is the one reported,
    // and the decompression that failed meanwhile must not surface as an unhandled rejection
    // (vitest fails the run on one).
    const file = join(dir, 'partial-failure.qcow2');
    await qemuImg(['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=1024', file, '1M']);
    // 1 KiB clusters: one L2 table maps 128 clusters (128 KiB).
    await qemuIo(file, ['write -c -P 0x11 0 1k', 'write -P 0x22 128k 1k']);
    const l1 = Number(getField(file, 'l1_table_offset'));
    const l2 = Number(readAt(file, l1, 8).readBigUInt64BE() & 0x00fffffffffffe00n);
    // The compressed cluster's bytes: garbage for deflate.
    const desc = readAt(file, l2, 8).readBigUInt64BE();
    const host = Number(desc & ((1n << 55n) - 1n));
    writeAt(file, host, Buffer.alloc(64, 0xff));
    // The second L1 entry: an L2 table offset that is not cluster aligned.
    const second = readAt(file, l1 + 8, 8).readBigUInt64BE();
    writeAt(file, l1 + 8, u64(second + 512n));
    await withImage(file, {}, async (image) => {
      await expect(image.read(0, 256 * 1024)).rejects.toThrow(/L2 table offset 0x[0-9a-f]+ unaligned/);
    });
    // Lets any rejection the read left behind reach the runtime while this test still runs.
    await new Promise((resolve) => setTimeout(resolve, 50));
  });
});
