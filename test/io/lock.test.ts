// Image locks taken by the library (openImage, createImage) against QEMU's: the bytes held in
// /proc/locks equal what a qemu-io holding the same image the same way holds (read-write,
// read-only, read-only with -U), on the image, its backing file and its data file; conflicting
// opens are refused with QEMU's text, in one process as between processes; a refused create
// leaves the file intact; closing releases everything; without the native binding nothing is
// locked and the library says so only through its listener.

import { createHash } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { beforeAll, describe, expect, it } from 'vitest';
import { openImage, type OpenImageOptions } from '../../src/open.js';
import { createImage } from '../../src/create.js';
import { IoError } from '../../src/errors.js';
import { imageLockingAvailable, onLockingUnavailable } from '../../src/io/lock.js';
import { qemuImg, qemuIo, tmpDir } from '../helpers/qemu.js';
import { holdWithQemuIo, lockBytesOf, probeBytes } from '../helpers/proc-locks.js';

const dir = tmpDir('qimg-lock-lib-');
const at = (name: string): string => join(dir, name);
const sha = (file: string): string => createHash('sha256').update(readFileSync(file)).digest('hex');

async function make(args: string[]): Promise<void> {
  await qemuImg(['create', '-q', ...args], { cwd: dir });
}

/** One image and the files it consists of, and how qemu-io and openImage open it. */
interface Chain {
  files: string[];
  format: 'qcow2' | 'raw';
}

async function chains(prefix: string): Promise<Chain[]> {
  await make(['-f', 'qcow2', at(`${prefix}base.qcow2`), '1M']);
  await make(['-f', 'qcow2', '-b', `${prefix}base.qcow2`, '-F', 'qcow2', at(`${prefix}top.qcow2`)]);
  await make(['-f', 'qcow2', '-o', `data_file=${at(`${prefix}d.data`)}`, at(`${prefix}d.qcow2`), '1M']);
  await make(['-f', 'raw', at(`${prefix}r.raw`), '1M']);
  await qemuIo(at(`${prefix}top.qcow2`), ['write -P 7 0 64k']);
  return [
    { files: [at(`${prefix}top.qcow2`), at(`${prefix}base.qcow2`)], format: 'qcow2' },
    { files: [at(`${prefix}d.qcow2`), at(`${prefix}d.data`)], format: 'qcow2' },
    { files: [at(`${prefix}r.raw`)], format: 'raw' },
  ];
}

/** qemu-io's options and the openImage options that open an image the same way. */
const MODES: { qemuIo: string[]; ours: OpenImageOptions }[] = [
  { qemuIo: [], ours: { readOnly: false } },
  { qemuIo: ['-r'], ours: {} },
  { qemuIo: ['-r', '-U'], ours: { forceShare: true } },
];

describe('openImage takes the locks qemu-io takes', () => {
  let all: Chain[] = [];
  beforeAll(async () => {
    all = await chains('m-');
  });
  it.concurrent.each(['qcow2 with a backing file', 'qcow2 with a data file', 'raw'].map((label, i) => [label, i] as const))(
    '%s: the same bytes on each file (rw, read-only, -U); released on close',
    async (_label, i) => {
      const { files, format } = all[i]!;
      for (const mode of MODES) {
        const holder = await holdWithQemuIo(files, format, mode.qemuIo, dir);
        let expected: string[][];
        try {
          expected = lockBytesOf(files);
        } finally {
          await holder.stop();
        }
        expect(files.map(probeBytes), 'qemu-io released its locks').toEqual(files.map(() => []));
        const { image } = await openImage(files[0]!, { format, ...mode.ours });
        let got: string[][];
        try {
          got = lockBytesOf(files);
        } finally {
          await image.close();
        }
        expect(got, `${files[0]} opened like qemu-io ${mode.qemuIo.join(' ')}`).toEqual(expected);
        expect(files.map(probeBytes), 'closing released the locks').toEqual(files.map(() => []));
      }
    },
  );

  it('lock: false takes none', async () => {
    const [chain] = await chains('n-');
    const { image } = await openImage(chain!.files[0]!, { readOnly: false, lock: false });
    try {
      expect(chain!.files.map(probeBytes)).toEqual([[], []]);
    } finally {
      await image.close();
    }
  });
});

describe('conflicts', () => {
  it('in one process: a writer is refused while a reader is open and the reverse, with QEMU\'s text; the first keeps its locks', async () => {
    const [chain] = await chains('c-');
    const [top, base] = chain!.files as [string, string];
    const reader = await openImage(top);
    try {
      const before = [probeBytes(top), probeBytes(base)];
      const err = await openImage(top, { readOnly: false }).catch((e: unknown) => e);
      expect(err).toBeInstanceOf(IoError);
      expect((err as IoError).message).toBe('Failed to get "write" lock');
      expect((err as IoError).data.hint).toBe(`Is another process using the image [${top}]?\n`);
      expect([probeBytes(top), probeBytes(base)], 'the refused open left no locks behind').toEqual(before);
      // Readers do not conflict with each other; -U readers neither.
      const second = await openImage(top, { forceShare: true });
      await second.image.close();
    } finally {
      await reader.image.close();
    }
    const writer = await openImage(top, { readOnly: false });
    try {
      const err = await openImage(top).catch((e: unknown) => e);
      expect((err as IoError).message).toBe('Failed to get shared "write" lock');
      // The backing file of an image being written is only read: another reader may open it.
      const b = await openImage(base);
      await b.image.close();
      const shared = await openImage(top, { forceShare: true });
      await shared.image.close();
    } finally {
      await writer.image.close();
    }
  });

  it('against qemu-io: writable opens and creation refused, the file left byte-identical', async () => {
    const [chain] = await chains('q-');
    const [top, base] = chain!.files as [string, string];
    const holder = await holdWithQemuIo([top, base], 'qcow2', ['-r'], dir);
    try {
      const before = sha(top);
      const open = await openImage(top, { readOnly: false }).catch((e: unknown) => e);
      expect((open as IoError).message).toBe('Failed to get "write" lock');
      const created = await createImage(top, { format: 'qcow2', size: 2 * 1024 * 1024 }).catch((e: unknown) => e);
      expect((created as IoError).message).toBe('Failed to get "write" lock');
      const raw = await createImage(top, { format: 'raw', size: 4096 }).catch((e: unknown) => e);
      expect((raw as IoError).message).toBe('Failed to get "write" lock');
      // The image is a backing file here: opening its overlay reads it, which a reader allows.
      expect(sha(top)).toBe(before);
      const { image } = await openImage(top);
      await image.close();
    } finally {
      await holder.stop();
    }
  });
});

describe('without the native binding', () => {
  it('opens without locks and reports it through onLockingUnavailable only', async () => {
    const [chain] = await chains('u-');
    const saved = process.env.QIMG_NO_NATIVE;
    let calls = 0;
    const previous = onLockingUnavailable(() => calls++);
    process.env.QIMG_NO_NATIVE = '1';
    try {
      expect(imageLockingAvailable()).toBe(false);
      const { image } = await openImage(chain!.files[0]!, { readOnly: false });
      try {
        expect(lockBytesOf(chain!.files)).toEqual([[], []]);
      } finally {
        await image.close();
      }
      expect(calls).toBeGreaterThan(0);
    } finally {
      onLockingUnavailable(previous);
      if (saved === undefined) delete process.env.QIMG_NO_NATIVE;
      else process.env.QIMG_NO_NATIVE = saved;
    }
    expect(imageLockingAvailable()).toBe(true);
  });
});
