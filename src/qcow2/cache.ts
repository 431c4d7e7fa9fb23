// Write-back cache of cluster-sized metadata tables (L2 tables, refcount blocks) with dirty
// tracking. Bounded softly: clean tables are evicted LRU-first; dirty ones stay until the image's
// single flush routine (write.ts writeOut) writes them, in its dependency order.

import type { Storage } from '../io/storage.js';
import { readFullZeroFill } from '../io/storage.js';

interface Entry {
  bytes: Uint8Array;
  view: DataView;
  dirty: boolean;
}

export class MetaCache {
  private readonly entries = new Map<number, Entry>();
  private readonly loading = new Map<number, Promise<Entry>>();
  private readonly maxTables: number;
  private dirtyCount = 0;

  constructor(private readonly storage: Storage, readonly tableBytes: number, maxBytes: number, minTables = 4) {
    this.maxTables = Math.max(minTables, Math.floor(maxBytes / tableBytes));
  }

  /** The table at hostOffset (bytes past the end of the file read as zeros). */
  async get(hostOffset: number): Promise<DataView> {
    const hit = this.entries.get(hostOffset);
    if (hit) {
      this.entries.delete(hostOffset);
      this.entries.set(hostOffset, hit);
      return hit.view;
    }
    let load = this.loading.get(hostOffset);
    if (!load) {
      load = (async () => {
        const bytes = new Uint8Array(this.tableBytes);
        await readFullZeroFill(this.storage, bytes, hostOffset);
        return { bytes, view: new DataView(bytes.buffer), dirty: false };
      })();
      this.loading.set(hostOffset, load);
      load.then(
        (e) => {
          this.loading.delete(hostOffset);
          // A table installed while the read was in flight (getEmpty) wins.
          if (!this.entries.has(hostOffset)) {
            this.entries.set(hostOffset, e);
            this.evictClean();
          }
        },
        () => this.loading.delete(hostOffset),
      );
    }
    await load;
    return this.entries.get(hostOffset)?.view ?? (await load).view;
  }

  /** Installs a new zero-filled (or copied) table at hostOffset without reading, marked dirty. */
  install(hostOffset: number, content?: Uint8Array): DataView {
    const bytes = new Uint8Array(this.tableBytes);
    if (content) bytes.set(content);
    const old = this.entries.get(hostOffset);
    if (old?.dirty) this.dirtyCount--;
    this.entries.delete(hostOffset);
    const e: Entry = { bytes, view: new DataView(bytes.buffer), dirty: true };
    this.entries.set(hostOffset, e);
    this.dirtyCount++;
    this.evictClean();
    return e.view;
  }

  /** Marks the table dirty; `view` (from get) is re-installed if the table was evicted meanwhile. */
  markDirty(hostOffset: number, view: DataView): void {
    let e = this.entries.get(hostOffset);
    if (!e || e.view !== view) {
      if (e?.dirty) this.dirtyCount--;
      e = { bytes: new Uint8Array(view.buffer, view.byteOffset, this.tableBytes), view, dirty: false };
      this.entries.set(hostOffset, e);
    }
    if (!e.dirty) {
      e.dirty = true;
      this.dirtyCount++;
    }
  }

  /** Forgets a table (its cluster was freed); dirty contents are dropped. */
  discard(hostOffset: number): void {
    const e = this.entries.get(hostOffset);
    if (e?.dirty) this.dirtyCount--;
    this.entries.delete(hostOffset);
  }

  get hasDirty(): boolean {
    return this.dirtyCount > 0;
  }

  /** True when dirty tables hold the cache over its bound (the owner should write them out). */
  get overBound(): boolean {
    return this.entries.size > this.maxTables && this.dirtyCount > 0;
  }

  /** Writes every dirty table, adjacent tables coalesced into one write each. */
  async writeDirty(): Promise<void> {
    if (this.dirtyCount === 0) return;
    const dirty = [...this.entries].filter(([, e]) => e.dirty).sort((a, b) => a[0] - b[0]);
    const writes: Promise<void>[] = [];
    const MAX_RUN = 64;
    let i = 0;
    while (i < dirty.length) {
      let j = i + 1;
      while (j < dirty.length && j - i < MAX_RUN && dirty[j]![0] === dirty[j - 1]![0] + this.tableBytes) j++;
      const start = dirty[i]![0];
      if (j - i === 1) {
        writes.push(this.storage.write(dirty[i]![1].bytes, start));
      } else {
        const buf = new Uint8Array((j - i) * this.tableBytes);
        for (let k = i; k < j; k++) buf.set(dirty[k]![1].bytes, (k - i) * this.tableBytes);
        writes.push(this.storage.write(buf, start));
      }
      i = j;
    }
    await Promise.all(writes);
    for (const [, e] of dirty) e.dirty = false;
    this.dirtyCount = 0;
    this.evictClean();
  }

  private evictClean(): void {
    if (this.entries.size <= this.maxTables) return;
    for (const [off, e] of this.entries) {
      if (this.entries.size <= this.maxTables) break;
      if (!e.dirty) this.entries.delete(off);
    }
  }

  clear(): void {
    this.entries.clear();
    this.dirtyCount = 0;
  }
}
