// Emptying the active layer of a qcow2 image (what `qemu-img commit` does to the overlay after
// committing it): every guest cluster becomes unallocated, so the image reads through to its
// backing file again. QEMU rebuilds a fresh image or discards cluster by cluster; qimg drops the
// references first and the refcounts after, which a crash can interrupt anywhere and leave at
// worst leaked clusters (never a refcount below its references).

import type { Storage } from '../io/storage.js';
import type { Refcounts } from './allocator.js';
import type { MetaCache } from './cache.js';
import type { L1Table } from './l1.js';
import { decodeCompressed, standardHostOffset, type L2Geometry } from './l2-entry.js';
import { COMPRESSED_HI } from './layout.js';

/** The driver state emptying works on (Qcow2Driver supplies it, its writer flushed and idle). */
export interface MakeEmptyHost {
  storage: Storage;
  geometry: L2Geometry;
  l1: L1Table;
  l2Cache: MetaCache;
  refcounts: Refcounts;
}

/**
 * Clears every active L1 entry (one write of the table, then a flush), then drops one reference
 * from each cluster the old L2 tables named and from the tables themselves, and writes the
 * refcount blocks. A shared L2 table (internal snapshots) keeps its other references: as
 * qemu-img check counts them, each L1 table that reaches a table (or data cluster through it)
 * holds one reference, so removing the active L1's path removes exactly one.
 */
export async function makeEmpty(host: MakeEmptyHost): Promise<void> {
  const { storage, geometry: g, l1, l2Cache, refcounts } = host;
  const tables = l1.clearFrom(0);
  if (tables.length === 0) return;
  await l1.writeOut(storage, async () => undefined);
  await storage.flush();
  const cs = g.clusterSize;
  for (const l2Offset of tables) {
    const table = await l2Cache.get(l2Offset);
    for (let i = 0; i < g.l2Entries; i++) {
      const hi = table.getUint32(i * g.entryBytes);
      const lo = table.getUint32(i * g.entryBytes + 4);
      if (hi & COMPRESSED_HI) {
        const desc = decodeCompressed(g, hi, lo);
        if (!desc) continue;
        const start = desc.hostOffset - (desc.hostOffset % 512);
        const end = desc.hostOffset + desc.length;
        for (let c = Math.floor(start / cs); c <= Math.floor((end - 1) / cs); c++) await refcounts.update(c, -1);
        continue;
      }
      // Clusters of an external data file carry no refcounts.
      if (g.hasDataFile) continue;
      const hostOffset = standardHostOffset(hi, lo);
      if (hostOffset > 0) await refcounts.update(Math.floor(hostOffset / cs), -1);
    }
    await refcounts.update(l2Offset / cs, -1);
  }
  await refcounts.blocks.writeDirty();
  await storage.flush();
  // The freed clusters at the end of the file are given back (nothing names them any more).
  const fileSize = await storage.size();
  const end = ((await refcounts.lastUsedCluster(fileSize)) + 1) * cs;
  if (end > 0 && end < fileSize) await storage.truncate(end);
}
