// FileStorage specifics: QEMU-worded open errors, create, disk size, the native switch.

import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { execFile } from 'node:child_process';
import { chmod, mkdir, mkdtemp, readFile, rm, stat, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';
import { build } from 'esbuild';
import { FileStorage } from '../../src/io/file.js';
import { loadNative } from '../../src/io/native.js';
import { IoError } from '../../src/errors.js';
import { tempDirFixture } from './backends.js';

const execFileAsync = promisify(execFile);
const tmp = tempDirFixture();
beforeAll(tmp.setup);
afterAll(tmp.teardown);

describe('FileStorage.open errors use QEMU wording', () => {
  it('a missing file: Could not open \'<name>\': No such file or directory', async () => {
    const name = join(tmp.dir(), 'missing.img');
    const err = await FileStorage.open(name, { readOnly: true }).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(IoError);
    expect((err as IoError).message).toBe(`Could not open '${name}': No such file or directory`);
    expect((err as IoError).data).toMatchObject({ path: name, errno: 'ENOENT' });
  });

  it('a directory: Is a directory', async () => {
    const name = join(tmp.dir(), 'adir');
    await mkdir(name);
    await expect(FileStorage.open(name, { readOnly: true })).rejects.toThrow(`Could not open '${name}': Is a directory`);
  });

  it('an unreadable file: Permission denied, the words qemu-img uses', async () => {
    // Root opens any file whatever its mode (CAP_DAC_OVERRIDE), and CI runs as root: there the open
    // runs in a child process as nobody (65534, Debian's nobody/nogroup), and so does qemu-img.
    // The child is FileStorage.open bundled into a folder of its own that nobody may read (the
    // bundles under node_modules/.cache are private to root); koffi does not resolve from there,
    // which FileStorage tolerates.
    const dir = await mkdtemp(join(tmpdir(), 'qimg-eacces-'));
    try {
      await chmod(dir, 0o755);
      const name = join(dir, 'secret.img');
      await writeFile(name, 'x', { mode: 0o000 });
      const child = join(dir, 'open-child.mjs');
      await build({
        stdin: {
          contents: `
            import { FileStorage } from './file.js';
            FileStorage.open(process.argv[2], { readOnly: true }).then(
              (s) => s.close().then(() => console.log(JSON.stringify({ opened: true }))),
              (e) => console.log(JSON.stringify({ message: e.message, errno: e.data?.errno })),
            );`,
          resolveDir: fileURLToPath(new URL('../../src/io/', import.meta.url)),
          loader: 'ts',
        },
        outfile: child,
        bundle: true,
        format: 'esm',
        platform: 'node',
        logLevel: 'error',
      });
      const user = process.getuid?.() === 0 ? { uid: 65534, gid: 65534 } : {};
      const [ours, qemu] = await Promise.all([
        execFileAsync(process.execPath, [child, name], { ...user, cwd: dir, encoding: 'utf8' }),
        execFileAsync('qemu-img', ['info', '-f', 'raw', name], { ...user, cwd: dir, encoding: 'utf8', env: { ...process.env, LC_ALL: 'C' } }).then(
          () => expect.fail('qemu-img opened the unreadable file'),
          (e: { code: number; stderr: string }) => e,
        ),
      ]);
      const result = JSON.parse(ours.stdout) as { message?: string; errno?: string };
      expect(result).toEqual({ message: `Could not open '${name}': Permission denied`, errno: 'EACCES' });
      // qemu-img's file-posix error, inside its own "Could not open" for the image.
      expect(qemu.code).toBe(1);
      expect(qemu.stderr).toBe(`qemu-img: Could not open '${name}': ${result.message}\n`);
    } finally {
      await rm(dir, { recursive: true, force: true });
    }
  });
});

describe('FileStorage', () => {
  it('keeps the name as given and create truncates an existing file', async () => {
    const name = join(tmp.dir(), 'c.img');
    await writeFile(name, 'hello world');
    const s = await FileStorage.open(name, { readOnly: false, create: true });
    expect(s.name).toBe(name);
    expect(await s.size()).toBe(0);
    await s.close();
    await s.close(); // idempotent
  });

  it('allocatedSize is st_blocks * 512 (qemu-img\'s disk size)', async () => {
    const name = join(tmp.dir(), 'd.img');
    const s = await FileStorage.open(name, { readOnly: false, create: true });
    await s.truncate(100 << 20);
    await s.write(new Uint8Array(8192).fill(1), 50 << 20);
    await s.flush();
    const st = await stat(name);
    expect(await s.allocatedSize()).toBe(st.blocks * 512);
    expect(await s.allocatedSize()).toBeLessThan(1 << 20);
    await s.close();
  });

  it('writev writes the pieces back to back (more pieces than one pwritev takes), read back with node:fs', async () => {
    const name = join(tmp.dir(), 'v.img');
    const s = await FileStorage.open(name, { readOnly: false, create: true });
    const pieces = Array.from({ length: 1500 }, (_, i) => new Uint8Array(1 + (i % 37)).fill(i & 0xff));
    await s.writev(pieces, 4096 + 3);
    await s.close();
    const got = new Uint8Array(await readFile(name));
    const want = new Uint8Array(4096 + 3 + pieces.reduce((n, p) => n + p.length, 0));
    let at = 4096 + 3;
    for (const p of pieces) {
      want.set(p, at);
      at += p.length;
    }
    expect(got.length).toBe(want.length);
    expect(Buffer.from(got).equals(Buffer.from(want))).toBe(true);
  });

  it('reserveHint reserves blocks without changing what reads back, and is a no-op without native helpers', async () => {
    const name = join(tmp.dir(), 'h.img');
    const s = await FileStorage.open(name, { readOnly: false, create: true });
    await s.write(new Uint8Array(4096).fill(7), 0);
    s.reserveHint(4096, 1 << 20);
    // Past the end: reserved ahead without growing the file.
    expect(await s.size()).toBe(4096);
    await s.write(new Uint8Array(1 << 20).fill(9), 4096);
    if (s.nativeEnabled) expect((await stat(name)).blocks * 512).toBeGreaterThan(8 << 20);
    await s.close();
    // Closing gave back what was reserved past the end.
    expect((await stat(name)).blocks * 512).toBeLessThanOrEqual(4096 + (1 << 20) + 65536);
    const got = new Uint8Array(await readFile(name));
    expect(got.length).toBe(4096 + (1 << 20));
    expect(got[0]).toBe(7);
    expect(got[4096]).toBe(9);
    expect(got[got.length - 1]).toBe(9);
    const plain = await FileStorage.open(name, { readOnly: false, native: false });
    plain.reserveHint(2 << 20, 1 << 20);
    expect(await plain.size()).toBe(4096 + (1 << 20));
    await plain.close();
  });

  it('offers extents/discard/writeZeroes only with the native path, and never read-only discard', async () => {
    const name = join(tmp.dir(), 'n.img');
    const plain = await FileStorage.open(name, { readOnly: false, create: true, native: false });
    expect(plain.nativeEnabled).toBe(false);
    expect(plain.extents).toBeUndefined();
    expect(plain.discard).toBeUndefined();
    await plain.close();
    if (!loadNative()) return;
    const rw = await FileStorage.open(name, { readOnly: false });
    expect(rw.nativeEnabled).toBe(true);
    expect(typeof rw.extents).toBe('function');
    expect(typeof rw.discard).toBe('function');
    await rw.close();
    const ro = await FileStorage.open(name, { readOnly: true });
    expect(typeof ro.extents).toBe('function');
    expect(ro.discard).toBeUndefined();
    await ro.close();
  });
});

describe('native loading', () => {
  it.runIf(process.platform === 'linux' && process.arch === 'x64')('koffi loads on x64 Linux', () => {
    expect(loadNative()).not.toBeNull();
  });

  it('QIMG_NO_NATIVE=1 disables it', async () => {
    const saved = process.env.QIMG_NO_NATIVE;
    process.env.QIMG_NO_NATIVE = '1';
    try {
      expect(loadNative()).toBeNull();
      const s = await FileStorage.open(join(tmp.dir(), 'e.img'), { readOnly: false, create: true });
      expect(s.nativeEnabled).toBe(false);
      expect(s.extents).toBeUndefined();
      await s.close();
    } finally {
      if (saved === undefined) delete process.env.QIMG_NO_NATIVE;
      else process.env.QIMG_NO_NATIVE = saved;
    }
  });
});

describe('close with I/O in flight', () => {
  it('waits for reads and writes already started, as FileHandle.close does', async () => {
    const name = join(tmp.dir(), 'inflight.img');
    const s = await FileStorage.open(name, { readOnly: false, create: true });
    await s.write(new Uint8Array(1 << 20).fill(7), 0);
    const bufs = Array.from({ length: 16 }, () => new Uint8Array(65536));
    const reads = bufs.map((b, i) => s.read(b, i * 65536));
    const write = s.write(new Uint8Array(4096).fill(9), 1 << 20);
    await s.close();
    expect(await Promise.all(reads)).toEqual(bufs.map(() => 65536));
    await write;
    for (const b of bufs) expect(b.every((x) => x === 7)).toBe(true);
    const check = await FileStorage.open(name, { readOnly: true });
    expect(await check.size()).toBe((1 << 20) + 4096);
    await check.close();
  });
});
