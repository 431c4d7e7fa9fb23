// qimg snapshot against qemu-img snapshot 7.2. Each case makes two images the same way (qemu-img
// create, qemu-io writes), then runs the same steps on both: snapshot commands with qemu-img on
// one and qimg on the other (same stdout, same stderr after the program name, same exit status),
// qemu-io writes on both, and "cross" steps where each tool works on the other tool's image (qemu-img
// applies and deletes what qimg created, and the reverse). At the end, through qemu-img only:
// qimg's image checks clean (qimg commits each operation with one header write, so it never leaks
// where QEMU may), the snapshot tables agree but for the dates, and every snapshot and the active
// layer read the same bytes in both images.

import { mkdir, open, readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { tmpDir } from '../helpers/qemu.js';
import { asQimg, qemuImg, qemuImgOk, qemuIoOk, qimg, type RunResult } from './harness.js';

const dir = tmpDir('qimg-snapshot-cli-');
const IMG = 'img.qcow2';

type Step =
  | { snap: string[] } // snapshot arguments (the image name is appended)
  | { io: string[] } // qemu-io commands on both images
  | { cross: string[] } // snapshot arguments, qemu-img on qimg's image and qimg on qemu-img's
  | { img: string[] } // another qemu-img command on both (IMG = the image)
  | { patch: (file: string) => Promise<void> }; // a change to both files' bytes

interface Case {
  name: string;
  create: string[];
  backing?: { create: string[]; io: string[] };
  io?: string[];
  steps: Step[];
  /** qemu-io format of the image (default qcow2). */
  raw?: boolean;
  /** Skip the content comparison (images qemu-img cannot convert, e.g. a data file's). */
  noCompare?: boolean;
}

const qcow2 = (size: string, ...opts: string[]): string[] => ['-f', 'qcow2', ...(opts.length ? ['-o', opts.join(',')] : []), IMG, size];

const CASES: Case[] = [
  {
    name: '64 KiB clusters: several snapshots, writes between, apply, delete, duplicate names, ids reused',
    create: qcow2('4M'),
    io: ['write -P 0x11 0 192k', 'write -P 0x12 2M 64k'],
    steps: [
      { snap: ['-l'] },
      { snap: ['-c', 's1'] },
      { io: ['write -P 0x21 64k 64k', 'write -z 2M 64k', 'discard 0 64k'] },
      { snap: ['-c', 's2'] },
      { snap: ['-c', 's1'] },
      { io: ['write -P 0x31 3M 100k'] },
      { snap: ['-l'] },
      { snap: ['-a', 's1'] }, // the id wins over the name? no id "s1": the first named s1
      { snap: ['-a', '2'] }, // an id
      { io: ['write -P 0x41 32k 64k'] },
      { snap: ['-d', 's1'] }, // by name: the first of the two
      { snap: ['-d', '2'] }, // not a name: not found
      { snap: ['-d', 's2'] },
      { snap: ['-c', 's4'] },
      { snap: ['-l'] },
      { snap: ['-a', 'nope'] },
      { snap: ['-d', 'nope'] },
    ],
  },
  {
    name: '512 B clusters, refcount_bits=16, snapshot of an empty image, then data',
    create: qcow2('256k', 'cluster_size=512'),
    steps: [
      { snap: ['-c', 'empty'] },
      { io: ['write -P 0x51 1000 70k', 'write -z 100k 3k'] },
      { snap: ['-c', 'full'] },
      { io: ['write -P 0x52 0 10k', 'discard 50k 20k'] },
      { snap: ['-a', 'empty'] },
      { io: ['write -P 0x53 7k 3k'] },
      { snap: ['-c', 'again'] },
      { snap: ['-d', 'full'] },
      { snap: ['-l'] },
    ],
  },
  {
    name: '2 MiB clusters, refcount_bits=64',
    create: qcow2('8M', 'cluster_size=2M', 'refcount_bits=64'),
    io: ['write -P 0x61 0 3M'],
    steps: [
      { snap: ['-c', 'a'] },
      { io: ['write -P 0x62 1M 2M'] },
      { snap: ['-c', 'b'] },
      { snap: ['-a', 'a'] },
      { snap: ['-d', 'b'] },
      { snap: ['-l'] },
    ],
  },
  {
    name: 'refcount_bits=1: nothing can be shared (QEMU: -EINVAL)',
    create: qcow2('1M', 'refcount_bits=1'),
    io: ['write -P 0x71 0 64k'],
    steps: [{ snap: ['-c', 's'] }, { snap: ['-l'] }],
  },
  {
    name: 'refcount_bits=2: the third snapshot overflows',
    create: qcow2('1M', 'refcount_bits=2', 'cluster_size=4k'),
    io: ['write -P 0x72 0 12k'],
    steps: [{ snap: ['-c', 'a'] }, { snap: ['-c', 'b'] }, { snap: ['-c', 'c'] }, { snap: ['-l'] }, { snap: ['-d', 'a'] }, { snap: ['-c', 'c'] }],
  },
  {
    name: 'compat 0.10 (v2)',
    create: qcow2('1M', 'compat=0.10'),
    io: ['write -P 0x81 0 100k'],
    steps: [
      { snap: ['-c', 'v2'] },
      { io: ['write -P 0x82 64k 64k'] },
      { snap: ['-c', 'v2b'] },
      { snap: ['-a', 'v2'] },
      { snap: ['-d', 'v2b'] },
    ],
  },
  {
    name: 'extended L2 entries, subcluster writes',
    create: qcow2('2M', 'extended_l2=on', 'cluster_size=64k'),
    io: ['write -P 0x91 2k 6k', 'write -z 64k 4k'],
    steps: [
      { snap: ['-c', 'x1'] },
      { io: ['write -P 0x92 4k 2k', 'write -P 0x93 128k 2k'] },
      { snap: ['-c', 'x2'] },
      { snap: ['-a', 'x1'] },
      { io: ['write -P 0x94 6k 2k'] },
      { snap: ['-d', 'x2'] },
    ],
  },
  {
    name: 'compressed clusters packed into shared host clusters, refcount_bits=4',
    create: qcow2('1M', 'refcount_bits=4', 'cluster_size=4k'),
    io: ['write -c -P 0xa1 0 4k', 'write -c -P 0xa2 4k 4k', 'write -c -P 0xa3 8k 4k', 'write -P 0xa4 64k 8k'],
    steps: [
      { snap: ['-c', 'c1'] },
      { io: ['write -P 0xa5 4k 2k', 'write -c -P 0xa6 128k 4k'] },
      { snap: ['-c', 'c2'] },
      { snap: ['-a', 'c1'] },
      { snap: ['-d', 'c1'] },
      { snap: ['-d', 'c2'] },
    ],
  },
  {
    name: 'an overlay over a backing file',
    backing: { create: ['-f', 'qcow2', 'base.qcow2', '1M'], io: ['write -P 0xb1 0 1M'] },
    create: ['-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', IMG, '1M'],
    io: ['write -P 0xb2 64k 64k'],
    steps: [
      { snap: ['-c', 'o1'] },
      { io: ['write -P 0xb3 0 32k', 'write -z 256k 64k'] },
      { snap: ['-c', 'o2'] },
      { snap: ['-a', 'o1'] },
      { snap: ['-d', 'o2'] },
    ],
  },
  {
    name: 'lazy refcounts',
    create: qcow2('1M', 'lazy_refcounts=on'),
    io: ['write -P 0xc1 0 128k'],
    steps: [{ snap: ['-c', 'l1'] }, { io: ['write -P 0xc2 0 64k'] }, { snap: ['-a', 'l1'] }, { snap: ['-d', 'l1'] }],
  },
  {
    name: 'counters past 2^53 in a snapshot survive every rewrite of the table',
    create: qcow2('1M'),
    io: ['write -P 0xc3 0 64k'],
    steps: [{ snap: ['-c', 'huge'] }, { patch: hugeCounters }, { snap: ['-c', 'next'] }, { snap: ['-l'] }, { snap: ['-d', 'next'] }, { snap: ['-l'] }],
  },
  {
    name: 'an empty disk (no L1 entries) and a name past QEMU\'s 255 bytes (cut inside a character)',
    create: qcow2('0'),
    steps: [{ snap: ['-c', 'é'.repeat(200)] }, { snap: ['-l'] }, { snap: ['-a', '1'] }, { snap: ['-c', 'z'] }, { snap: ['-d', 'z'] }, { snap: ['-l'] }],
  },
  {
    name: 'apply restores the snapshot size (grown and shrunk since)',
    create: qcow2('1M'),
    io: ['write -P 0xd1 0 1M'],
    steps: [
      { snap: ['-c', 'small'] },
      { img: ['resize', IMG, '3M'] },
      { io: ['write -P 0xd2 2M 64k'] },
      { snap: ['-c', 'big'] },
      { snap: ['-a', 'small'] },
      { snap: ['-a', 'big'] },
    ],
  },
  {
    name: 'each tool applies and deletes the snapshots the other created',
    create: qcow2('2M'),
    io: ['write -P 0xe1 0 256k'],
    steps: [
      { snap: ['-c', 'mine'] },
      { io: ['write -P 0xe2 64k 64k'] },
      { snap: ['-c', 'second'] },
      { cross: ['-a', 'mine'] },
      { io: ['write -P 0xe3 128k 64k'] },
      { cross: ['-c', 'third'] },
      { snap: ['-a', 'third'] },
      { cross: ['-d', 'mine'] },
      { snap: ['-d', 'second'] },
      { cross: ['-l'] },
    ],
  },
  {
    name: 'persistent bitmaps: create and delete work, apply is refused',
    create: qcow2('1M'),
    io: ['write -P 0xf1 0 64k'],
    steps: [
      { img: ['bitmap', '--add', IMG, 'bm'] },
      { snap: ['-c', 'b1'] },
      { io: ['write -P 0xf2 0 64k'] },
      { snap: ['-a', 'b1'] },
      { snap: ['-a', 'nope'] },
      { snap: ['-d', 'b1'] },
    ],
  },
];

/**
 * Sets the first snapshot's 64-bit counters to values past 2^53 (a JS number cannot hold them):
 * vm clock and VM state size (past 4 GiB, so the old 32-bit field says 0), and a large icount.
 */
async function hugeCounters(file: string): Promise<void> {
  const f = await open(file, 'r+');
  try {
    const head = Buffer.alloc(72);
    await f.read(head, 0, 72, 0);
    const table = Number(head.readBigUInt64BE(64));
    const entry = Buffer.alloc(64);
    await f.read(entry, 0, 64, table);
    entry.writeBigUInt64BE(0x0123456789abcdefn, 24); // vm clock (ns)
    entry.writeUInt32BE(0, 32);
    entry.writeBigUInt64BE(0x100000001n, 40); // extra: VM state size
    entry.writeBigUInt64BE(0x1fffffffffffffn, 56); // extra: icount (qimg's listing prints it as a number: kept below 2^53)
    await f.write(entry, 0, 64, table);
  } finally {
    await f.close();
  }
}

async function runStep(step: Step, q: string, o: string): Promise<void> {
  if ('patch' in step) {
    await Promise.all([step.patch(join(q, IMG)), step.patch(join(o, IMG))]);
    return;
  }
  if ('io' in step) {
    await Promise.all([qemuIoOk(IMG, 'qcow2', step.io, q), qemuIoOk(IMG, 'qcow2', step.io, o)]);
    return;
  }
  if ('img' in step) {
    await Promise.all([qemuImgOk(step.img, q), qemuImgOk(step.img, o)]);
    return;
  }
  const args = 'snap' in step ? step.snap : step.cross;
  const full = ['snapshot', ...args, IMG];
  let qemu: RunResult;
  let ours: RunResult;
  if ('snap' in step) [qemu, ours] = await Promise.all([qemuImg(full, q), qimg(full, o)]);
  else [qemu, ours] = await Promise.all([qemuImg(full, o), qimg(full, q)]);
  const what = `snapshot ${args.join(' ')}${'cross' in step ? ' (cross)' : ''}`;
  expect({ what, code: ours.code, stdout: stripDates(ours.stdout), stderr: ours.stderr }).toEqual({
    what, code: qemu.code, stdout: stripDates(qemu.stdout), stderr: asQimg(qemu.stderr),
  });
  // After every qimg step: no corruption in what qimg wrote (and no leak on an image only qimg changed).
  const chk = await qemuImg(['check', IMG], 'snap' in step ? o : q);
  const out = chk.stdout + chk.stderr;
  expect(out, `check after ${what}`).not.toMatch(/^ERROR|corrupt/m);
  if ('snap' in step) expect([chk.code, out], `check after ${what}`).toEqual([0, expect.stringMatching(/^No errors were found on the image\./m)]);
}

/** The DATE column of `snapshot -l` rows (each image's snapshot was taken at its own moment). */
function stripDates(list: string): string {
  return list.replace(/\d{4}-\d\d-\d\d \d\d:\d\d:\d\d/g, 'DATE');
}

async function snapshotsOf(cwd: string): Promise<{ size: number; snapshots: Record<string, unknown>[] }> {
  const info = JSON.parse((await qemuImgOk(['info', '-U', '--output=json', IMG], cwd)).stdout) as Record<string, unknown>;
  const snapshots = ((info.snapshots ?? []) as Record<string, unknown>[]).map((s) => {
    const { 'date-sec': _s, 'date-nsec': _n, ...rest } = s;
    return rest;
  });
  return { size: info['virtual-size'] as number, snapshots };
}

/** The bytes qemu-img reads from the active layer (no option) or a snapshot (`-l snapshot.id=N`). */
async function contents(cwd: string, snapshotId?: string): Promise<Buffer> {
  const out = `read-${snapshotId ?? 'active'}.raw`;
  const sel = snapshotId === undefined ? [] : ['-l', `snapshot.id=${snapshotId}`];
  await qemuImgOk(['convert', '-U', '-O', 'raw', ...sel, IMG, out], cwd);
  return readFile(join(cwd, out));
}

async function runCase(c: Case, index: number): Promise<void> {
  const q = join(dir, `${index}-qemu`);
  const o = join(dir, `${index}-qimg`);
  await Promise.all([mkdir(q), mkdir(o)]);
  for (const d of [q, o]) {
    if (c.backing) {
      await qemuImgOk(['create', '-q', ...c.backing.create], d);
      await qemuIoOk('base.qcow2', 'qcow2', c.backing.io, d);
    }
    await qemuImgOk(['create', '-q', ...c.create], d);
    if (c.io?.length) await qemuIoOk(IMG, 'qcow2', c.io, d);
  }
  for (const step of c.steps) await runStep(step, q, o);
  // qimg's image: clean (no leaks either) — for cross steps qemu-img wrote it last, which may leak.
  const check = await qemuImg(['check', IMG], o);
  const crossed = c.steps.some((s) => 'cross' in s);
  if (!crossed) expect(check.stdout + check.stderr).toMatch(/^No errors were found on the image\./m);
  expect(check.stdout + check.stderr).not.toMatch(/^ERROR|corrupt/m);
  expect(check.code === 0 || (crossed && check.code === 3)).toBe(true);
  const qcheck = await qemuImg(['check', IMG], q);
  expect(qcheck.stdout + qcheck.stderr).not.toMatch(/^ERROR|corrupt/m);
  const [qs, os] = await Promise.all([snapshotsOf(q), snapshotsOf(o)]);
  expect(os).toEqual(qs);
  if (c.noCompare) return;
  for (const id of [undefined, ...qs.snapshots.map((s) => s.id as string)]) {
    const [a, b] = await Promise.all([contents(q, id), contents(o, id)]);
    expect(b.equals(a), `contents of ${id === undefined ? 'the active layer' : `snapshot ${id}`}`).toBe(true);
  }
}

// The cases run side by side: each works in its own directories, and most of the time goes to
// waiting for qemu-img processes.
describe.concurrent('qimg snapshot matches qemu-img snapshot', () => {
  it.each(CASES.map((c, i) => [c.name, c, i] as const))('%s', async (_name, c, i) => {
    await runCase(c, i);
  });
});

describe('errors and refusals, as qemu-img words them', () => {
  const cmp = async (args: string[], prep: (d: string) => Promise<void>): Promise<void> => {
    const base = join(dir, `err-${Math.random().toString(36).slice(2)}`);
    const q = join(base, 'q');
    const o = join(base, 'o');
    await mkdir(q, { recursive: true });
    await mkdir(o, { recursive: true });
    await Promise.all([prep(q), prep(o)]);
    const [qemu, ours] = await Promise.all([qemuImg(args, q), qimg(args, o)]);
    expect({ args, code: ours.code, stdout: ours.stdout, stderr: ours.stderr }).toEqual({
      args, code: qemu.code, stdout: qemu.stdout, stderr: asQimg(qemu.stderr),
    });
  };
  const plain = async (d: string): Promise<void> => {
    await qemuImgOk(['create', '-q', '-f', 'qcow2', IMG, '1M'], d);
  };
  const raw = async (d: string): Promise<void> => {
    await qemuImgOk(['create', '-q', '-f', 'raw', 'r.raw', '1M'], d);
  };
  const dataFile = async (d: string): Promise<void> => {
    await qemuImgOk(['create', '-q', '-f', 'qcow2', '-o', 'data_file=d.raw', IMG, '1M'], d);
  };

  it('usage errors', async () => {
    await Promise.all([
      cmp(['snapshot', '-l', '-c', 'x', IMG], plain),
      cmp(['snapshot', '-c', 'x'], plain),
      cmp(['snapshot', '-c', 'x', IMG, IMG], plain),
      cmp(['snapshot', IMG, '-c'], plain),
      cmp(['snapshot', '-z', IMG], plain),
      cmp(['snapshot', '-U', '-c', 'x', IMG], plain),
      cmp(['snapshot', '-U', IMG], plain),
      cmp(['snapshot', '-U', '-l', IMG], plain),
      cmp(['snapshot', '-q', IMG], plain),
      cmp(['snapshot', '-l', 'missing.qcow2'], plain),
      cmp(['snapshot', '-c', 'x', 'missing.qcow2'], plain),
      cmp(['snapshot', '-U', '-c', 'x', 'missing.qcow2'], plain),
    ]);
  });

  it('raw images and images with an external data file hold no snapshots', async () => {
    await Promise.all([
      ...['-l', '-c', '-a', '-d'].map((a) => cmp(['snapshot', ...(a === '-l' ? [a] : [a, 'x']), 'r.raw'], raw)),
      cmp(['snapshot', 'r.raw'], raw),
      ...['-l', '-c', '-a', '-d'].map((a) => cmp(['snapshot', ...(a === '-l' ? [a] : [a, 'x']), IMG], dataFile)),
    ]);
  });
});
