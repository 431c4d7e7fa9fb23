// Gates: QEMU's path_combine for relative names, the deny gate, the memory gate.

import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { writeFile, mkdir } from 'node:fs/promises';
import { join } from 'node:path';
import { createFileGate, denyGate, fileGate, memoryGate, resolveRelativeName } from '../../src/io/gate.js';
import { MemoryStorage } from '../../src/io/memory.js';
import type { Storage } from '../../src/io/storage.js';
import { IoError, QimgError } from '../../src/errors.js';
import { tempDirFixture } from './backends.js';
import { qemuImg } from '../helpers/qemu.js';

const tmp = tempDirFixture();
beforeAll(tmp.setup);
afterAll(tmp.teardown);

describe('resolveRelativeName follows QEMU path_combine', () => {
  const base = new MemoryStorage(undefined, '/images/vm/top.qcow2');
  it.each([
    ['base.qcow2', base, '/images/vm/base.qcow2'],
    ['../b/base.qcow2', base, '/images/vm/../b/base.qcow2'], // not normalised, as QEMU reports it
    ['/abs/base.qcow2', base, '/abs/base.qcow2'],
    ['base.qcow2', undefined, 'base.qcow2'],
    ['base.qcow2', new MemoryStorage(undefined, 'top.qcow2'), 'base.qcow2'],
    ['base.qcow2', new MemoryStorage(undefined, 'dir/top.qcow2'), 'dir/base.qcow2'],
    ['sub/base', '/x/', '/x/sub/base'],
  ] as const)('%s relative to %s', (name, rel, expected) => {
    expect(resolveRelativeName(name, rel as Storage | string | undefined)).toBe(expected);
    expect(fileGate.resolveName!(name, typeof rel === 'string' ? undefined : rel)).toBe(
      typeof rel === 'string' ? name : expected,
    );
  });
});

describe('resolveRelativeName names the backing file QEMU names', () => {
  // qemu-img info's full-backing-filename for images written with these backing names, opened by
  // an absolute and by a relative path: the same string qimg resolves to (no normalisation).
  it.each(['base.qcow2', '../b/base.qcow2', './sub/../base.qcow2', 'sub/base.qcow2', '/abs/base.qcow2'])('%s', async (name) => {
    const root = join(tmp.dir(), 'pc');
    await mkdir(join(root, 'vm'), { recursive: true });
    const file = `top-${name.replace(/\W/g, '_')}.qcow2`;
    await qemuImg(['create', '-q', '-f', 'qcow2', '-u', '-b', name, '-F', 'qcow2', join(root, 'vm', file), '1M']);
    for (const top of [join(root, 'vm', file), `vm/${file}`]) {
      const info = JSON.parse((await qemuImg(['info', '--output=json', top], { cwd: root })).stdout) as Record<string, unknown>;
      expect(resolveRelativeName(name, top), top).toBe(info['full-backing-filename']);
    }
  });
});

describe('fileGate', () => {
  it('opens a name relative to the directory of the naming image', async () => {
    const dir = join(tmp.dir(), 'g');
    await mkdir(dir);
    await writeFile(join(dir, 'base.img'), 'BASE');
    const top = new MemoryStorage(undefined, join(dir, 'top.img'));
    const s = await createFileGate({ native: false }).open('base.img', { readOnly: true, relativeTo: top, purpose: 'backing' });
    expect(s.name).toBe(join(dir, 'base.img'));
    expect(s.readOnly).toBe(true);
    const buf = new Uint8Array(4);
    expect(await s.read(buf, 0)).toBe(4);
    expect(new TextDecoder().decode(buf)).toBe('BASE');
    await s.close();
  });

  it('reports a missing file with QEMU wording for the combined path', async () => {
    const top = new MemoryStorage(undefined, join(tmp.dir(), 'top.img'));
    await expect(fileGate.open('nope.img', { readOnly: true, relativeTo: top, purpose: 'backing' })).rejects.toThrow(
      `Could not open '${join(tmp.dir(), 'nope.img')}': No such file or directory`,
    );
  });
});

describe('denyGate', () => {
  it('refuses every name', async () => {
    const err = await denyGate.open('base.img', { readOnly: true, purpose: 'backing' }).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(QimgError);
    expect((err as QimgError).message).toContain('Opening "base.img" was refused');
  });
});

describe('memoryGate', () => {
  it('opens named storages relative to the naming one, read-only views, unclosable', async () => {
    const base = new MemoryStorage(new Uint8Array([1, 2, 3]), 'vm/base');
    const map = new Map<string, Storage>([['vm/base', base]]);
    const gate = memoryGate(map);
    const top = new MemoryStorage(undefined, 'vm/top');
    const s = await gate.open('base', { readOnly: true, relativeTo: top, purpose: 'backing' });
    expect(s.readOnly).toBe(true);
    await expect(s.write(new Uint8Array(1), 0)).rejects.toBeInstanceOf(IoError);
    expect(s.discard).toBeUndefined();
    await s.close();
    expect(await base.size()).toBe(3); // still open
    await expect(gate.open('missing', { readOnly: true, purpose: 'data-file' })).rejects.toThrow(
      "Could not open 'missing': No such file or directory",
    );
    const created = await gate.open('new', { readOnly: false, create: true, purpose: 'data-file' });
    await created.write(new Uint8Array([9]), 0);
    expect(await map.get('new')!.size()).toBe(1);
  });
});
