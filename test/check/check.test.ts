// qimg check against qemu-img check on the same files, through the real command line (the bundled
// src/cli/bin.ts, so main.ts's dispatch and its -q handling are what runs): clean images of many
// layouts (statistics, image end offset, JSON), deliberately broken ones (messages, summaries,
// exit codes, and the same with -q), repairs (-r leaks / -r all: same output, and the repaired
// file byte-identical to the one qemu-img repairs), and the library's rebuildRefcounts on a
// lazy-refcount image killed mid-write.

import { execFile } from 'node:child_process';
import { copyFileSync, mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { join, relative } from 'node:path';
import { beforeAll, describe, expect, it } from 'vitest';
import { qimg } from '../cli/harness.js';
import { qemuImg, qemuIo, referenceRaw, run, tmpDir } from '../helpers/qemu.js';
import { FileStorage } from '../../src/io/file.js';
import { checkQcow2, rebuildRefcounts } from '../../src/qcow2/check.js';

const dir = tmpDir('qimg-check-');

interface Out { code: number; stdout: string; stderr: string }

function execIn(cmd: string, args: string[], cwd: string): Promise<Out> {
  return new Promise((resolve, reject) => {
    execFile(cmd, args, { cwd, encoding: 'utf8', env: { ...process.env, LC_ALL: 'C' } }, (err, stdout, stderr) => {
      if (err && typeof (err as NodeJS.ErrnoException).code === 'string') return reject(err);
      resolve({ code: err ? ((err as { code?: number }).code ?? 1) : 0, stdout, stderr });
    });
  });
}

/** `qimg check <args>` through the real CLI. */
const qimgCheck = (args: string[], cwd: string): Promise<Out> => qimg(['check', ...args], cwd);
const qemuCheck = async (args: string[], cwd: string): Promise<Out> => {
  const r = await execIn('qemu-img', ['check', ...args], cwd);
  return { ...r, stderr: r.stderr.replace(/^qemu-img: /gm, 'qimg: ') };
};

let seq = 0;
/** A fresh directory holding `img` copied as x.qcow2 (for repairs: each tool gets its own copy of one name, which JSON prints). */
function copyTo(img: string, tag: string): string {
  const d = join(dir, `${tag}-${seq++}`);
  mkdirSync(d);
  copyFileSync(img, join(d, 'x.qcow2'));
  return d;
}

async function make(name: string, createArgs: string[], io: string[] = [], size = '64M'): Promise<string> {
  const file = join(dir, name);
  await qemuImg(['create', '-q', '-f', 'qcow2', ...createArgs, file, size], { cwd: dir });
  if (io.length) await qemuIo(file, io, { cwd: dir });
  return file;
}

// ---- byte patches (what a crash or a bug could leave) ----------------------------------------

function u32(b: Buffer, at: number): number {
  return b.readUInt32BE(at);
}
function u64(b: Buffer, at: number): number {
  return Number(b.readBigUInt64BE(at));
}

/** Patches the image in place. */
function patch(file: string, fn: (b: Buffer, g: ReturnType<typeof geometry>) => void): void {
  const b = readFileSync(file);
  fn(b, geometry(b));
  writeFileSync(file, b);
}

function geometry(b: Buffer) {
  const cs = 2 ** u32(b, 20);
  const order = u32(b, 4) === 3 ? u32(b, 96) : 4;
  const bits = 2 ** order;
  const rto = u64(b, 48);
  const l1o = u64(b, 40);
  const epb = (cs * 8) / bits;
  /** Byte (and, under 8 bits, bit shift) of cluster k's refcount. */
  const where = (k: number): { at: number; sh: number } => {
    const rb = u64(b, rto + 8 * Math.floor(k / epb)) & ~0x1ff;
    const i = k % epb;
    if (bits >= 8) return { at: rb + (i * bits) / 8, sh: 0 };
    const per = 8 / bits;
    return { at: rb + Math.floor(i / per), sh: (i % per) * bits };
  };
  return {
    cs, rto, l1o,
    refcount(k: number): number {
      const { at, sh } = where(k);
      return bits >= 8 ? b.readUIntBE(at, Math.min(bits / 8, 6)) : (b[at]! >> sh) & ((1 << bits) - 1);
    },
    setRefcount(k: number, v: number): void {
      const rb = u64(b, rto + 8 * Math.floor(k / epb)) & ~0x1ff;
      const i = k % epb;
      if (bits >= 8) b.writeUIntBE(v, rb + (i * bits) / 8, Math.min(bits / 8, 6));
      else {
        const per = 8 / bits;
        const at = rb + Math.floor(i / per);
        const sh = (i % per) * bits;
        const m = (1 << bits) - 1;
        b[at] = (b[at]! & ~(m << sh)) | ((v & m) << sh);
      }
    },
    l2(): number {
      return Number(b.readBigUInt64BE(l1o) & 0x00fffffffffffe00n);
    },
  };
}

const breakages: Record<string, (b: Buffer, g: ReturnType<typeof geometry>) => void> = {
  'leak (refcount 2 on a data cluster)': (_b, g) => g.setRefcount(5, 2),
  'refcount of a used cluster zeroed': (_b, g) => g.setRefcount(6, 0),
  // A cluster inside the file that the base image's discard freed (past the end of the file,
  // qemu-img check does not look at refcounts).
  'refcount of a free cluster set (leak)': (b, g) => {
    let k = 0;
    while (k < b.length / g.cs && g.refcount(k) !== 0) k++;
    if (k >= b.length / g.cs) throw new Error('no free cluster inside the file');
    g.setRefcount(k, 1);
  },
  'COPIED cleared on an L2 entry': (b, g) => b.writeBigUInt64BE(b.readBigUInt64BE(g.l2()) & ~(1n << 63n), g.l2()),
  'COPIED cleared on an L1 entry': (b, g) => b.writeBigUInt64BE(b.readBigUInt64BE(g.l1o) & ~(1n << 63n), g.l1o),
  'dirty bit with stale refcounts': (b, g) => {
    g.setRefcount(3, 0);
    g.setRefcount(70, 1);
    b.writeBigUInt64BE(b.readBigUInt64BE(72) | 1n, 72);
  },
  'refcount table entry unaligned': (b, g) => b.writeBigUInt64BE(0x10001n, g.rto),
  'L2 entry past the end of the file': (b, g) => b.writeBigUInt64BE(0x8000000000f00000n, g.l2() + 8 * 100),
  'unaligned preallocated zero cluster': (b, g) => b.writeBigUInt64BE(0x0000000000050201n, g.l2() + 8 * 101),
  'unaligned data cluster': (b, g) => b.writeBigUInt64BE(0x0000000000050200n, g.l2() + 8 * 102),
  'L1 entry with reserved bits': (b, g) => b.writeBigUInt64BE(b.readBigUInt64BE(g.l1o) | 0x1n, g.l1o),
};

// ---- clean images ------------------------------------------------------------------------------

const writes = ['write -P 1 0 3M', 'write -P 2 10M 1M', 'write -z 20M 1M', 'write -P 3 40M 64k'];

const layouts: [string, string[], string[]][] = [
  ['default', [], writes],
  ['512-byte clusters', ['-o', 'cluster_size=512'], writes],
  ['4k clusters', ['-o', 'cluster_size=4096'], writes],
  ['2M clusters', ['-o', 'cluster_size=2M'], writes],
  ['v2 (compat=0.10)', ['-o', 'compat=0.10'], ['write -P 1 0 3M', 'write -P 2 10M 1M']],
  ['extended L2', ['-o', 'extended_l2=on'], [...writes, 'write -P 9 50M 4k']],
  ...[1, 2, 4, 8, 16, 32, 64].map((bits): [string, string[], string[]] =>
    [`refcount_bits=${bits}`, ['-o', `refcount_bits=${bits},cluster_size=4096`], writes]),
  ['empty', [], []],
];

describe('clean images: qimg check prints what qemu-img check prints', () => {
  it.concurrent.each(layouts)('%s', async (name, opts, io) => {
    const file = await make(`clean-${name.replace(/\W/g, '_')}.qcow2`, opts, io);
    await expectSameCheck(file, []);
    await expectSameCheck(file, ['--output=json']);
  });

  it('internal snapshots, overwritten after the snapshot', async () => {
    const file = await make('snap.qcow2', [], writes);
    await qemuImg(['snapshot', '-c', 's1', file]);
    await qemuIo(file, ['write -P 7 0 1M', 'write -P 8 30M 128k']);
    await qemuImg(['snapshot', '-c', 's2', file]);
    await qemuIo(file, ['discard 10M 1M']);
    await expectSameCheck(file, []);
    await expectSameCheck(file, ['--output=json']);
  });

  it.concurrent.each(['zlib', 'zstd'])('compressed clusters (%s) packed into shared host clusters', async (type) => {
    const src = await make(`csrc-${type}.qcow2`, [], ['write -P 7 0 4M', 'write -P 0 5M 1M', 'write -P 9 6M 12345'], '8M');
    const file = join(dir, `comp-${type}.qcow2`);
    await qemuImg(['convert', '-c', '-O', 'qcow2', '-o', `compression_type=${type},cluster_size=4096`, src, file]);
    const r = await expectSameCheck(file, []);
    expect(r.stdout).toMatch(/[1-9][0-9.]*% compressed/);
  });

  it('persistent bitmaps', async () => {
    const file = await make('bitmaps.qcow2', [], ['write 0 1M'], '16M');
    await qemuImg(['bitmap', '--add', file, 'b1']);
    await qemuImg(['bitmap', '--add', '-g', '64k', file, 'b2']);
    await qemuIo(file, ['write 4M 1M']);
    await expectSameCheck(file, []);
  });

  it('external data file (data clusters not refcounted) and a backing file', async () => {
    const df = await make('df.qcow2', ['-o', `data_file=${join(dir, 'df.raw')}`], ['write 0 1M'], '16M');
    await expectSameCheck(df, []);
    const base = await make('base.qcow2', [], writes);
    const ov = join(dir, 'ov.qcow2');
    await qemuImg(['create', '-q', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', ov], { cwd: dir });
    await qemuIo(ov, ['write -P 5 1M 64k']);
    await expectSameCheck(ov, []);
  });

  it('raw images: no checks (exit 63)', async () => {
    const file = join(dir, 'plain.raw');
    writeFileSync(file, Buffer.alloc(65536));
    const [q, m] = await Promise.all([qemuCheck(['-f', 'raw', 'plain.raw'], dir), qimgCheck(['-f', 'raw', 'plain.raw'], dir)]);
    expect(m).toEqual(q);
    expect(m.code).toBe(63);
  });

  it('usage errors', async () => {
    for (const args of [['-r', 'some', 'x'], [], ['a', 'b'], ['--output=xml', 'nosuch.qcow2']]) {
      const [q, m] = await Promise.all([qemuCheck(args, dir), qimgCheck(args, dir)]);
      expect(m.code, args.join(' ')).toBe(q.code);
      expect(m.stderr.replace(/qimg --help/, 'qemu-img --help')).toBe(q.stderr.replace(/qimg --help/, 'qemu-img --help'));
    }
  });
});

/** Both tools check the same file (read-only, so side by side), named relative to `dir`. */
async function expectSameCheck(file: string, args: string[]): Promise<Out> {
  const name = relative(dir, file);
  const [q, m] = await Promise.all([qemuCheck([...args, name], dir), qimgCheck([...args, name], dir)]);
  expect(m, `check ${args.join(' ')} ${name}`).toEqual(q);
  return m;
}

// ---- broken images and repairs -----------------------------------------------------------------

/**
 * The image every breakage patches (made once, small: each case copies it six times): header,
 * reftable, refblock, L1, L2 in clusters 0-4, data from cluster 5 on, and a freed cluster inside
 * the file.
 */
let brokenBase: Promise<string> | undefined;
const getBrokenBase = (): Promise<string> =>
  (brokenBase ??= make('broken-base.qcow2', [], ['write -P 1 0 1M', 'write -P 2 10M 256k', 'discard 10M 64k']));

describe('broken images: same findings, same repairs as qemu-img', () => {
  it.concurrent.each(Object.keys(breakages))('%s', async (name) => {
    const broken = join(dir, `broken-${name.replace(/\W/g, '_')}.qcow2`);
    copyFileSync(await getBrokenBase(), broken);
    patch(broken, breakages[name]!);
    const [human] = await Promise.all([expectSameCheck(broken, []), expectSameCheck(broken, ['--output=json'])]);
    // The patch did break something (an image qemu-img finds clean would compare nothing broken).
    expect(human.code, human.stdout).not.toBe(0);
    await Promise.all(
      ['leaks', 'all'].map(async (mode) => {
        const dq = copyTo(broken, 'rq');
        const dm = copyTo(broken, 'rm');
        const [q, m] = await Promise.all([
          qemuCheck(['-r', mode, 'x.qcow2'], dq),
          qimgCheck(['-r', mode, 'x.qcow2'], dm),
        ]);
        expect(m, `-r ${mode}`).toEqual(q);
        // The repaired files are the same bytes (rebuilt refcount structures included): so the
        // guest data and what qemu-img check says after qimg's repair are what they are after
        // QEMU's, with no need to look again.
        expect(readFileSync(join(dm, 'x.qcow2')).equals(readFileSync(join(dq, 'x.qcow2'))), `-r ${mode} bytes`).toBe(true);
      }),
    );
  });
});

// ---- -q ---------------------------------------------------------------------------------------

describe.concurrent('check -q: the exit code says it, the output is what qemu-img check -q prints', () => {
  /** Checks a copy of base patched by `breakage` with -q (and -q -r leaks), both tools; returns qimg's results. */
  async function quiet(tag: string, breakage?: string): Promise<{ check: Out; repair: Out }> {
    const file = join(dir, `q-${tag}.qcow2`);
    copyFileSync(await getBrokenBase(), file);
    if (breakage) patch(file, breakages[breakage]!);
    const check = await expectSameCheck(file, ['-q']);
    const dq = copyTo(file, 'qq');
    const dm = copyTo(file, 'qm');
    const [q, m] = await Promise.all([qemuCheck(['-q', '-r', 'leaks', 'x.qcow2'], dq), qimgCheck(['-q', '-r', 'leaks', 'x.qcow2'], dm)]);
    expect(m, '-q -r leaks').toEqual(q);
    return { check, repair: m };
  }

  it('clean: exit 0, nothing printed', async () => {
    const { check, repair } = await quiet('clean');
    expect(check).toEqual({ code: 0, stdout: '', stderr: '' });
    expect(repair).toEqual({ code: 0, stdout: '', stderr: '' });
  });

  it('leaked clusters: exit 3, only the leak on stderr; -q -r leaks repairs them', async () => {
    const { check, repair } = await quiet('leak', 'refcount of a free cluster set (leak)');
    expect(check.code).toBe(3);
    expect(check.stdout).toBe('');
    expect(check.stderr).toMatch(/^Leaked cluster \d+ refcount=1 reference=0\n$/);
    expect(repair.code).toBe(0);
    expect(repair.stdout).toBe('');
    expect(repair.stderr).toMatch(/^Leaked cluster (\d+) refcount=1 reference=0\nRepairing cluster \1 refcount=1 reference=0\n$/);
  });

  it('corruption: exit 2, the ERROR lines still on stderr', async () => {
    const { check, repair } = await quiet('corrupt', 'refcount of a used cluster zeroed');
    expect(check.code).toBe(2);
    expect(check.stdout).toBe('');
    expect(check.stderr).toMatch(/^ERROR cluster 6 refcount=0 reference=1$/m);
    // -r leaks does not repair corruption: the check fails.
    expect(repair.code).toBe(1);
    expect(repair.stderr).toMatch(/\nqimg: Check failed: Input\/output error\n$/);
  });

  it('raw image: exit 63 and its message', async () => {
    const file = join(dir, 'q-plain.raw');
    writeFileSync(file, Buffer.alloc(65536));
    const r = await expectSameCheck(file, ['-q', '-f', 'raw']);
    expect(r.code).toBe(63);
    expect(r.stderr).toBe('qimg: This image format does not support checks\n');
  });
});

// ---- library ----------------------------------------------------------------------------------

describe('library', () => {
  it('rebuildRefcounts repairs a lazy-refcount image killed mid-write and clears the dirty bit', async () => {
    const file = await make('lazy.qcow2', ['-o', 'compat=1.1,lazy_refcounts=on'], [], '16M');
    // qemu-io dies by SIGKILL after the writes: the refcounts were never written, the dirty bit is set.
    await run('qemu-io', ['-f', 'qcow2', '-c', 'write -P 5 0 2M', '-c', 'write -P 6 8M 64k', '-c', 'sigraise 9', file]);
    expect(readFileSync(file).readBigUInt64BE(72) & 1n).toBe(1n);
    const before = await referenceRaw(file);
    expect((await qemuCheck([file], dir)).code).toBe(2);
    const storage = await FileStorage.open(file, { readOnly: false });
    try {
      const res = await rebuildRefcounts(storage);
      expect(res.corruptionsFixed).toBeGreaterThan(0);
      expect(res.corruptions).toBe(0);
    } finally {
      await storage.close();
    }
    expect(readFileSync(file).readBigUInt64BE(72) & 1n).toBe(0n);
    const after = await qemuCheck(['--output=json', file], dir);
    expect(after.code).toBe(0);
    expect((await referenceRaw(file)).equals(before)).toBe(true);
    // The header keeps what QEMU keeps (lazy refcounts, feature table).
    const info = JSON.parse((await qemuImg(['info', '--output=json', file])).stdout);
    expect(info['format-specific'].data['lazy-refcounts']).toBe(true);
    expect(info['dirty-flag']).toBe(false);
  });

  it('refuses a counter array larger than the memory bound', async () => {
    const file = await make('mem.qcow2', [], ['write 0 1M'], '16M');
    const storage = await FileStorage.open(file, { readOnly: true });
    try {
      const res = await checkQcow2(storage, { maxMemoryBytes: 4 });
      expect(res.failure?.errno).toBe('ENOMEM');
      expect(res.checkErrors).toBe(1);
    } finally {
      await storage.close();
    }
  });

  it('returns QEMU\'s counters and messages', async () => {
    const file = await make('lib.qcow2', [], ['write 0 1M'], '16M');
    patch(file, (_b, g) => g.setRefcount(5, 2));
    const storage = await FileStorage.open(file, { readOnly: true });
    try {
      const res = await checkQcow2(storage);
      expect(res).toMatchObject({ leaks: 1, corruptions: 1, checkErrors: 0, allocatedClusters: 16, totalClusters: 256 });
      expect(res.messages).toEqual([
        'Leaked cluster 5 refcount=2 reference=1',
        'ERROR OFLAG_COPIED data cluster: l2_entry=8000000000050000 refcount=2',
      ]);
    } finally {
      await storage.close();
    }
  });
});
