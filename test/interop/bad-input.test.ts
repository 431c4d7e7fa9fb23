// Bad input: qemu-made qcow2 files broken by patching bytes. qimg must refuse with a QimgError whose
// message names the problem, never hang, never throw a TypeError/RangeError. What qemu-img info and
// qemu-io read say about the same file is recorded next to each case (QIMG_SHOW_QEMU=1 prints it)
// so the messages can be aligned; the exact CLI text is the CLI tests' business.

import { statSync, truncateSync, writeFileSync } from 'node:fs';
import { randomBytes } from 'node:crypto';
import { join } from 'node:path';
import fc from 'fast-check';
import { afterAll, describe, expect, it } from 'vitest';
import { NotFoundError, QimgError } from '../../src/errors.js';
import { MemoryStorage } from '../../src/io/memory.js';
import type { StorageGate } from '../../src/io/storage.js';
import type { OpenImageOptions } from '../../src/open.js';
import { EXT_FEATURE_TABLE, getField, headerExtensions, readAt, setField, u64, writeAt } from '../helpers/craft.js';
import { MiB, expectSameBytes, getOpenImage, qemuImg, qemuIo, run, tmpDir, withImage } from '../helpers/qemu.js';

const dir = tmpDir('qimg-bad-input-');
let seq = 0;
const path = (name: string): string => join(dir, `${seq++}-${name}`);

/** A valid small image: 4 KiB clusters (so header, reftable, refblock, L1, L2 sit in the first clusters), data written. */
async function validImage(name: string, opts: string[] = [], extra: string[] = []): Promise<string> {
  const file = path(name);
  await qemuImg(['create', '-q', '-f', 'qcow2', '-o', ['cluster_size=4096', ...opts].join(','), ...extra, file, '1M']);
  await qemuIo(file, ['write -P 0x11 0 64k', 'write -P 0x22 512k 4k']);
  return file;
}

const qemuSays: { name: string; info: string; read: string }[] = [];

/** What qemu-img info and a full qemu-io read say (first line of each, trimmed). */
async function recordQemu(name: string, file: string, format = 'qcow2', withRead = true): Promise<{ info: string; read: string }> {
  // qemu-io spins on a backing loop (7.2 takes minutes), so both are bounded.
  const info = await run('qemu-img', ['info', '--backing-chain', '-f', format, file], { timeoutMs: 5000 });
  const read = withRead
    ? await run('qemu-io', ['-r', '-f', format, '-c', 'read 0 1M', file], { timeoutMs: 5000 })
    : { code: 124, stdout: '', stderr: 'not run: qemu-io 7.2 spins for minutes on a backing loop' };
  const first = (r: { code: number; stdout: string; stderr: string }): string =>
    r.code === 0 && !/failed/.test(r.stdout) ? 'ok' : (r.stderr.trim() || r.stdout.trim()).split('\n').slice(0, 2).join(' / ');
  const entry = { name, info: first(info), read: first(read) };
  qemuSays.push(entry);
  return entry;
}

afterAll(() => {
  if (process.env.QIMG_SHOW_QEMU) {
    for (const e of qemuSays) console.log(`${e.name}\n  qemu-img info: ${e.info}\n  qemu-io read:  ${e.read}`);
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

function expectQimgError(err: unknown, names: RegExp, context: string): void {
  if (err === undefined) throw new Error(`${context}: qimg opened and read it without an error`);
  if (!(err instanceof QimgError)) {
    throw new Error(`${context}: expected a QimgError, got ${(err as Error)?.constructor?.name}: ${(err as Error)?.message}\n${(err as Error)?.stack}`);
  }
  expect(err.message, `${context}: the message should name the problem`).toMatch(names);
}

interface BadCase {
  name: string;
  make: () => Promise<string>;
  /** What qimg's message must mention. */
  names: RegExp;
  /**
   * QEMU reads this file without complaint (it reads zeros past the end of the file and ignores
   * what it does not look at): qimg may then either refuse with a QimgError or return QEMU's bytes.
   */
  qemuAccepts?: boolean;
  options?: OpenImageOptions;
}

const cases: BadCase[] = [
  {
    name: 'truncated inside the header (50 bytes left)',
    make: async () => {
      const f = await validImage('trunc-header.qcow2');
      truncateSync(f, 50);
      return f;
    },
    names: /header|truncat|short|end of file|EOF|qcow2/i,
  },
  {
    name: 'truncated after the header cluster (tables and data gone)',
    make: async () => {
      const f = await validImage('trunc-tables.qcow2');
      truncateSync(f, 4096 + 100);
      return f;
    },
    names: /L1|table|refcount|truncat|end of file|EOF|past/i,
    qemuAccepts: true,
  },
  {
    name: 'bad magic with the format forced to qcow2',
    make: async () => {
      const f = await validImage('magic.qcow2');
      writeAt(f, 0, Buffer.from('QFJ\xfb', 'latin1'));
      return f;
    },
    names: /not in qcow2 format|magic/i,
  },
  ...[1, 4].map((v) => ({
    name: `version ${v}`,
    make: async () => {
      const f = await validImage(`version${v}.qcow2`);
      setField(f, 'version', v);
      return f;
    },
    names: new RegExp(`version.*${v}|${v}.*version`, 'i'),
  })),
  ...[8, 22].map((bits) => ({
    name: `cluster_bits ${bits}`,
    make: async () => {
      const f = await validImage(`cbits${bits}.qcow2`);
      setField(f, 'cluster_bits', bits);
      return f;
    },
    names: /cluster.size|cluster_bits/i,
  })),
  {
    name: "l1_size larger than QEMU's 32 MiB L1 limit",
    make: async () => {
      const f = await validImage('l1huge.qcow2');
      setField(f, 'l1_size', 0x1000000); // 16 Mi entries = 128 MiB
      return f;
    },
    names: /L1/i,
  },
  {
    name: 'l1_size smaller than the virtual size needs',
    make: async () => {
      const f = await validImage('l1small.qcow2', [], []);
      setField(f, 'size', 1n << 40n); // 1 TiB needs 512 L1 entries at 4 KiB clusters; l1_size stays 1
      return f;
    },
    names: /L1/i,
  },
  {
    name: "refcount_table_clusters beyond QEMU's 8 MiB reftable limit",
    make: async () => {
      const f = await validImage('rthuge.qcow2');
      setField(f, 'refcount_table_clusters', 0x1000000);
      return f;
    },
    names: /refcount|reference count/i,
  },
  {
    name: 'l1_table_offset past the end of the file',
    make: async () => {
      const f = await validImage('l1eof.qcow2');
      setField(f, 'l1_table_offset', 1n << 40n);
      return f;
    },
    names: /L1/i,
    qemuAccepts: true,
  },
  {
    name: 'l1_table_offset not cluster-aligned',
    make: async () => {
      const f = await validImage('l1unal.qcow2');
      setField(f, 'l1_table_offset', getField(f, 'l1_table_offset') + 8n);
      return f;
    },
    names: /L1.*(offset|align)|(offset|align).*L1/i,
  },
  {
    name: 'refcount_table_offset not cluster-aligned',
    make: async () => {
      const f = await validImage('rtunal.qcow2');
      setField(f, 'refcount_table_offset', getField(f, 'refcount_table_offset') + 8n);
      return f;
    },
    names: /refcount|reference count/i,
  },
  {
    name: 'L2 table offset (in L1 entry 0) not cluster-aligned',
    make: async () => {
      const f = await validImage('l2unal.qcow2');
      const l1 = Number(getField(f, 'l1_table_offset'));
      const e = readAt(f, l1, 8).readBigUInt64BE(0);
      writeAt(f, l1, u64(e + 0x200n));
      return f;
    },
    names: /L2/i,
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
    names: /L1|L2|reserved/i,
    qemuAccepts: true,
  },
  {
    name: 'L2 entry pointing to an unaligned data cluster',
    make: async () => {
      const f = await validImage('dataunal.qcow2');
      const l1 = Number(getField(f, 'l1_table_offset'));
      const l2 = Number(readAt(f, l1, 8).readBigUInt64BE(0) & 0x00fffffffffffe00n);
      const e = readAt(f, l2, 8).readBigUInt64BE(0);
      writeAt(f, l2, u64(e + 0x200n));
      return f;
    },
    names: /cluster|L2|align/i,
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
    names: /qimg test feature/,
  },
  {
    name: 'unknown incompatible feature bit 7 without a name',
    make: async () => {
      const f = await validImage('feat-unnamed.qcow2');
      setField(f, 'incompatible_features', 1n << 7n);
      return f;
    },
    names: /feature.*(7|0x80|80)|(7|0x80|80).*feature/i,
  },
  ...[1, 2].map((m) => ({
    name: `crypt_method ${m} (${m === 1 ? 'AES' : 'LUKS'}) patched in`,
    make: async () => {
      const f = await validImage(`crypt${m}.qcow2`);
      setField(f, 'crypt_method', m);
      return f;
    },
    names: /encrypt|crypt|AES|LUKS/i,
  })),
  {
    name: 'snapshot table past the end of the file',
    make: async () => {
      const f = await validImage('snapeof.qcow2');
      await qemuImg(['snapshot', '-c', 's1', f]);
      setField(f, 'snapshots_offset', 1n << 40n);
      return f;
    },
    names: /snapshot/i,
    qemuAccepts: true,
  },
  {
    name: 'nb_snapshots huge',
    make: async () => {
      const f = await validImage('snapmany.qcow2');
      await qemuImg(['snapshot', '-c', 's1', f]);
      setField(f, 'nb_snapshots', 0x7fffffff);
      return f;
    },
    names: /snapshot/i,
  },
  {
    name: 'garbage file (random bytes) with the format forced to qcow2',
    make: async () => {
      const f = path('garbage.qcow2');
      writeFileSync(f, randomBytes(64 * 1024));
      return f;
    },
    names: /not in qcow2 format|magic/i,
  },
  {
    name: 'garbage after a valid magic',
    make: async () => {
      const f = path('garbage-magic.qcow2');
      const b = randomBytes(64 * 1024);
      b.write('QFI\xfb', 0, 'latin1');
      writeFileSync(f, b);
      return f;
    },
    names: /./,
  },
];

describe('bad input: qimg refuses broken qcow2 files with a QimgError naming the problem', () => {
  for (const c of cases) {
    it(c.name, async () => {
      const file = await c.make();
      const q = await recordQemu(c.name, file);
      const err = await openReadAll(file, c.options);
      const context = `${c.name} (qemu-img info: ${q.info}; qemu-io read: ${q.read})`;
      if (c.qemuAccepts && err === undefined) {
        expect(q.read).toBe('ok');
        await withImage(file, { format: 'qcow2' }, (image) => expectSameBytes(image, file, { format: 'qcow2', label: c.name }));
        return;
      }
      expectQimgError(err, c.names, context);
    });
  }

  it('a backing chain loop (a.qcow2 -> b.qcow2 -> a.qcow2, made with -u)', async () => {
    const a = path('loop-a.qcow2');
    const b = path('loop-b.qcow2');
    await qemuImg(['create', '-q', '-f', 'qcow2', a, '1M']);
    await qemuImg(['create', '-q', '-f', 'qcow2', '-u', '-b', a, '-F', 'qcow2', b, '1M']);
    await qemuImg(['rebase', '-u', '-b', b, '-F', 'qcow2', a]);
    const q = await recordQemu('backing chain loop', a, 'qcow2', false);
    const err = await openReadAll(a);
    expectQimgError(err, /loop|recursion|chain|itself|own backing/i, `loop (qemu-img info: ${q.info})`);
  });

  it('a self-referencing backing file (a.qcow2 -> a.qcow2)', async () => {
    const a = path('self.qcow2');
    await qemuImg(['create', '-q', '-f', 'qcow2', a, '1M']);
    await qemuImg(['rebase', '-u', '-b', a, '-F', 'qcow2', a]);
    const q = await recordQemu('self backing', a, 'qcow2', false);
    const err = await openReadAll(a);
    expectQimgError(err, /loop|recursion|chain|itself|own backing/i, `self loop (qemu-img info: ${q.info})`);
  });

  it('a missing backing file', async () => {
    const a = path('missing-backing.qcow2');
    await qemuImg(['create', '-q', '-f', 'qcow2', '-u', '-b', join(dir, 'nope.qcow2'), '-F', 'qcow2', a, '1M']);
    const q = await recordQemu('missing backing', a);
    const err = await openReadAll(a);
    expectQimgError(err, /nope\.qcow2/, `missing backing (qemu-img info: ${q.info})`);
  });

  it('a snapshot that does not exist', async () => {
    const f = await validImage('nosnap.qcow2');
    const err = await openReadAll(f, { snapshot: { name: 'nope' } });
    expectQimgError(err, /nope|snapshot/i, 'missing snapshot');
  });
});

/** A gate that opens nothing: a corrupted header may name any backing or data file. */
const refuseGate: StorageGate = {
  open(name: string): Promise<never> {
    return Promise.reject(new NotFoundError(`fuzz gate refuses '${name}'`));
  },
};

describe('fuzz: flipped bytes in the header, L1, L2 and refcount tables give success or a QimgError', () => {
  it('200 mutated copies of a small image: open + read all + block status never throw another error type or hang', async () => {
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
    await fc.assert(
      fc.asyncProperty(flips, async (fl) => {
        const mutated = Buffer.from(bytes);
        for (const f of fl) {
          const [start] = regions[f.region]!;
          if (start + f.at < mutated.length) mutated[start + f.at] = f.value;
        }
        const storage = new MemoryStorage(new Uint8Array(mutated), { name: 'fuzz.qcow2', readOnly: true });
        let timer: NodeJS.Timeout | undefined;
        const hang = new Promise<'hang'>((resolve) => {
          timer = setTimeout(() => resolve('hang'), 10_000);
        });
        const outcome = await Promise.race([openReadAll(storage, { gate: refuseGate }), hang]);
        clearTimeout(timer);
        if (outcome === 'hang') throw new Error(`hang (>10 s) with flips ${JSON.stringify(fl)}`);
        if (outcome !== undefined && !(outcome instanceof QimgError)) {
          const e = outcome as Error;
          throw new Error(`${e?.constructor?.name}: ${e?.message} with flips ${JSON.stringify(fl)}\n${e?.stack}`);
        }
      }),
      { numRuns: 200, seed: Number(process.env.QIMG_FUZZ_SEED ?? 20240601), endOnFailure: true },
    );
  });
});
