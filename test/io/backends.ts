// Storage backend factories for the conformance suite and the property tests.

import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { Storage } from '../../src/io/storage.js';
import { MemoryStorage } from '../../src/io/memory.js';
import { FileStorage } from '../../src/io/file.js';
import { loadNative } from '../../src/io/native.js';

export interface Backend {
  name: string;
  /** Allocation granularity for exact extent expectations (data runs are rounded out to it). */
  granularity: number;
  /** True when discard deallocates (allocatedSize drops). */
  deallocates: boolean;
  create(initial?: Uint8Array): Promise<Storage>;
  /** Opens an existing storage made by create (the same bytes) read-only. */
  reopenReadOnly(storage: Storage): Promise<Storage>;
}

let counter = 0;

export function tempDirFixture(): { dir: () => string; setup: () => Promise<void>; teardown: () => Promise<void> } {
  let dir = '';
  return {
    dir: () => dir,
    setup: async () => {
      dir = await mkdtemp(join(tmpdir(), 'qimg-io-'));
    },
    teardown: async () => {
      if (dir) await rm(dir, { recursive: true, force: true });
    },
  };
}

export function backends(dir: () => string): Backend[] {
  const memories = new Map<string, MemoryStorage>();
  const memory = (chunkSize: number): Backend => ({
    name: `memory (${chunkSize}-byte chunks)`,
    granularity: chunkSize,
    deallocates: true,
    async create(initial) {
      const name = `mem${counter++}`;
      const s = new MemoryStorage(initial, { name, chunkSize });
      memories.set(name, s);
      return s;
    },
    async reopenReadOnly(storage) {
      return new MemoryStorage(memories.get(storage.name)!.toUint8Array(), { name: storage.name, readOnly: true, chunkSize });
    },
  });
  const file = (native: boolean): Backend => ({
    name: native ? 'file (native)' : 'file (no native)',
    granularity: 4096,
    deallocates: native,
    async create(initial) {
      const s = await FileStorage.open(join(dir(), `f${counter++}.img`), { readOnly: false, create: true, native });
      if (initial && initial.length) await s.write(initial, 0);
      return s;
    },
    async reopenReadOnly(storage) {
      return FileStorage.open(storage.name, { readOnly: true, native });
    },
  });
  const list = [memory(64 * 1024), memory(512), file(false)];
  if (loadNative()) list.push(file(true));
  return list;
}
