// A bounded LRU cache of metadata tables (L2 tables now; refcount blocks with the writer), keyed by
// host offset. Concurrent loads of one table share a single read.

import type { Storage } from '../io/storage.js';
import { readFullZeroFill } from '../io/storage.js';

export class TableCache {
  private readonly storage: Storage;
  private readonly tableBytes: number;
  private readonly maxTables: number;
  private readonly tables = new Map<number, Promise<DataView>>();

  /** Holds at most max(minTables, maxBytes / tableBytes) tables. */
  constructor(storage: Storage, tableBytes: number, maxBytes: number, minTables = 2) {
    this.storage = storage;
    this.tableBytes = tableBytes;
    this.maxTables = Math.max(minTables, Math.floor(maxBytes / tableBytes));
  }

  /** The table at hostOffset (bytes past the end of the file read as zeros, as QEMU's reads do). */
  get(hostOffset: number): Promise<DataView> {
    const hit = this.tables.get(hostOffset);
    if (hit) {
      // Move to the most recently used end.
      this.tables.delete(hostOffset);
      this.tables.set(hostOffset, hit);
      return hit;
    }
    const load = this.load(hostOffset);
    this.tables.set(hostOffset, load);
    load.catch(() => this.tables.delete(hostOffset));
    while (this.tables.size > this.maxTables) {
      const oldest = this.tables.keys().next().value as number;
      this.tables.delete(oldest);
    }
    return load;
  }

  private async load(hostOffset: number): Promise<DataView> {
    const buf = new Uint8Array(this.tableBytes);
    await readFullZeroFill(this.storage, buf, hostOffset);
    return new DataView(buf.buffer);
  }

  clear(): void {
    this.tables.clear();
  }
}
