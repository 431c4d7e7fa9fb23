// Data/hole extents of a storage: the native capability (SEEK_DATA/SEEK_HOLE) or a zero-scan fallback.
// PLACEHOLDER: the storage helper replaces this with the full implementation.

import type { Storage, StorageExtent } from '../io/storage.js';

export async function storageExtents(storage: Storage, offset: number, length: number): Promise<StorageExtent[]> {
  if (storage.extents) return storage.extents(offset, length);
  const size = await storage.size();
  const end = Math.min(size, offset + length);
  return end > offset ? [{ offset, length: end - offset, hole: false }] : [];
}
