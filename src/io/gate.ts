// Storage gates: how files named inside an image (backing files, data files) get opened.

import type { Storage, StorageExtent, StorageGate } from './storage.js';
import { IoError, UsageError } from '../errors.js';
import { FileStorage } from './file.js';
import { MemoryStorage } from './memory.js';
import { checkWritable } from './check.js';

type GateOpenOptions = Parameters<StorageGate['open']>[1];

/**
 * QEMU's path_combine (POSIX): an absolute name, or any name without a base, is used as is;
 * otherwise the name replaces everything after the base's last '/'. No normalisation ("..",
 * "./") is done, so the result is what QEMU reports as the backing file's full name.
 */
export function resolveRelativeName(name: string, relativeTo?: Storage | string): string {
  const base = typeof relativeTo === 'string' ? relativeTo : relativeTo?.name;
  if (base === undefined || name.startsWith('/')) return name;
  const slash = base.lastIndexOf('/');
  if (slash < 0) return name;
  return base.slice(0, slash + 1) + name;
}

export interface FileGateOptions {
  /** Passed to FileStorage.open (default true; QIMG_NO_NATIVE=1 overrides). */
  native?: boolean;
}

/** A permissive gate over the file system, as qemu-img behaves: opens any named file. */
export function createFileGate(gateOptions: FileGateOptions = {}): StorageGate {
  return {
    open(name: string, options: GateOpenOptions): Promise<Storage> {
      const path = resolveRelativeName(name, options.relativeTo);
      return FileStorage.open(path, {
        readOnly: options.readOnly,
        create: options.create,
        native: gateOptions.native,
        ...(options.locks ? { locks: options.locks } : {}),
      });
    },
    resolveName: resolveRelativeName,
  };
}

/** The default permissive file gate. */
export const fileGate: StorageGate = createFileGate();

/** A gate that refuses every file an image names (for untrusted images). */
export const denyGate: StorageGate = {
  async open(name: string, options: GateOpenOptions): Promise<Storage> {
    throw new UsageError(`Opening "${name}" was refused: the ${options.purpose} file may not be opened`, {
      name,
      purpose: options.purpose,
    });
  },
  resolveName: resolveRelativeName,
};

/**
 * A gate over named in-memory storages (no file system). Names resolve as with files; `create`
 * adds a new MemoryStorage to the map. Storages opened read-only are handed out through a
 * read-only view, and closing what the gate handed out never closes the stored storage.
 */
export function memoryGate(storages: Map<string, Storage>): StorageGate {
  return {
    async open(name: string, options: GateOpenOptions): Promise<Storage> {
      const path = resolveRelativeName(name, options.relativeTo);
      if (options.create) {
        const created = new MemoryStorage(undefined, { name: path });
        storages.set(path, created);
        return unclosableView(created, false);
      }
      const storage = storages.get(path);
      if (!storage) {
        throw new IoError(`Could not open '${path}': No such file or directory`, { path, errno: 'ENOENT' });
      }
      if (!options.readOnly && storage.readOnly) {
        throw new IoError(`Could not open '${path}': Read-only file system`, { path, errno: 'EROFS' });
      }
      return unclosableView(storage, options.readOnly);
    },
    resolveName: resolveRelativeName,
  };
}

/** A view of `storage` whose close is a no-op and, when readOnly, refuses every change. */
export function unclosableView(storage: Storage, readOnly: boolean): Storage {
  const ro = readOnly || storage.readOnly;
  const view: Storage = {
    name: storage.name,
    readOnly: ro,
    read: (buf, offset) => storage.read(buf, offset),
    write: async (buf, offset) => {
      checkWritable(storage.name, ro);
      return storage.write(buf, offset);
    },
    size: () => storage.size(),
    truncate: async (size) => {
      checkWritable(storage.name, ro);
      return storage.truncate(size);
    },
    flush: () => storage.flush(),
    close: async () => undefined,
  };
  if (storage.extents) {
    const extents = storage.extents.bind(storage);
    view.extents = (offset: number, length: number): Promise<StorageExtent[]> => extents(offset, length);
  }
  if (storage.allocatedSize) view.allocatedSize = storage.allocatedSize.bind(storage);
  if (!ro && storage.discard) view.discard = storage.discard.bind(storage);
  if (!ro && storage.writeZeroes) view.writeZeroes = storage.writeZeroes.bind(storage);
  if (!ro && storage.allocate) view.allocate = storage.allocate.bind(storage);
  if (!ro && storage.writev) view.writev = storage.writev.bind(storage);
  if (!ro && storage.reserveHint) view.reserveHint = storage.reserveHint.bind(storage);
  return view;
}

