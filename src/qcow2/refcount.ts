// Refcounts: the two-level table (refcount table -> refcount blocks) with widths 1..64 bits,
// accessed through one get function picked when the image is opened.

import type { Storage } from '../io/storage.js';
import { readFullZeroFill } from '../io/storage.js';
import { FormatError } from '../errors.js';
import { TableCache } from './table-cache.js';
import { entryOffset, hex, TWO_POW_32 } from './layout.js';

export type RefcountGetter = (block: DataView, index: number) => number;

/** Returns the reader of entry `index` of a refcount block for refcount_order 0..6 (sub-byte widths LSB first). */
export function refcountGetter(order: number): RefcountGetter {
  switch (order) {
    case 0: return (b, i) => (b.getUint8(i >>> 3) >>> (i & 7)) & 1;
    case 1: return (b, i) => (b.getUint8(i >>> 2) >>> ((i & 3) * 2)) & 3;
    case 2: return (b, i) => (b.getUint8(i >>> 1) >>> ((i & 1) * 4)) & 15;
    case 3: return (b, i) => b.getUint8(i);
    case 4: return (b, i) => b.getUint16(i * 2);
    case 5: return (b, i) => b.getUint32(i * 4);
    case 6: return (b, i) => b.getUint32(i * 8) * TWO_POW_32 + b.getUint32(i * 8 + 4);
    default: throw new FormatError(`Unsupported refcount order ${order}`);
  }
}

/** Read access to an image's refcounts. */
export class RefcountReader {
  private table: DataView | null = null;
  private readonly blocks: TableCache;
  private readonly get: RefcountGetter;
  readonly entriesPerBlock: number;

  constructor(
    private readonly storage: Storage,
    private readonly tableOffset: number,
    private readonly tableClusters: number,
    private readonly clusterSize: number,
    refcountOrder: number,
  ) {
    this.blocks = new TableCache(storage, clusterSize, 1024 * 1024, 4);
    this.get = refcountGetter(refcountOrder);
    this.entriesPerBlock = (clusterSize * 8) / 2 ** refcountOrder;
  }

  private async loadTable(): Promise<DataView> {
    if (!this.table) {
      // Bounded by QEMU's 8 MiB refcount-table limit (checked when the header was parsed) and the file size.
      const fileSize = await this.storage.size();
      const bytes = Math.max(0, Math.min(this.tableClusters * this.clusterSize, fileSize - this.tableOffset));
      const buf = new Uint8Array(Math.floor(bytes / 8) * 8);
      await readFullZeroFill(this.storage, buf, this.tableOffset);
      this.table = new DataView(buf.buffer);
    }
    return this.table;
  }

  /** The refcount of host cluster `clusterIndex` (0 where no refcount block covers it). */
  async refcount(clusterIndex: number): Promise<number> {
    const table = await this.loadTable();
    const tableIndex = Math.floor(clusterIndex / this.entriesPerBlock);
    if (tableIndex * 8 >= table.byteLength) return 0;
    const blockOffset = entryOffset(table.getUint32(tableIndex * 8), table.getUint32(tableIndex * 8 + 4));
    if (blockOffset === 0) return 0;
    if (blockOffset < 0 || blockOffset % this.clusterSize !== 0) {
      throw new FormatError(`Refblock offset ${hex(blockOffset)} unaligned (reftable index: ${hex(tableIndex)})`);
    }
    const block = await this.blocks.get(blockOffset);
    return this.get(block, clusterIndex - tableIndex * this.entriesPerBlock);
  }
}

export type RefcountSetter = (block: DataView, index: number, value: number) => void;

/** The writer of entry `index` of a refcount block for refcount_order 0..6 (QEMU's set_refcount_ro0..6). */
export function refcountSetter(order: number): RefcountSetter {
  switch (order) {
    case 0: return (b, i, v) => b.setUint8(i >>> 3, (b.getUint8(i >>> 3) & ~(1 << (i & 7))) | ((v & 1) << (i & 7)));
    case 1: return (b, i, v) => b.setUint8(i >>> 2, (b.getUint8(i >>> 2) & ~(3 << ((i & 3) * 2))) | ((v & 3) << ((i & 3) * 2)));
    case 2: return (b, i, v) => b.setUint8(i >>> 1, (b.getUint8(i >>> 1) & ~(15 << ((i & 1) * 4))) | ((v & 15) << ((i & 1) * 4)));
    case 3: return (b, i, v) => b.setUint8(i, v);
    case 4: return (b, i, v) => b.setUint16(i * 2, v);
    case 5: return (b, i, v) => b.setUint32(i * 4, v);
    case 6: return (b, i, v) => {
      b.setUint32(i * 8, Math.floor(v / TWO_POW_32));
      b.setUint32(i * 8 + 4, v >>> 0);
    };
    default: throw new FormatError(`Unsupported refcount order ${order}`);
  }
}

/** The largest refcount a width can hold (64-bit refcounts are capped at 2^53 - 1 here). */
export function refcountMax(order: number): number {
  return order === 6 ? Number.MAX_SAFE_INTEGER : 2 ** (2 ** order) - 1;
}
