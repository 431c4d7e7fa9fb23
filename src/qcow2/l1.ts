// The active L1 table in memory: entry access, dirty tracking, growth by relocation (QEMU's
// qcow2_grow_l1_table: the new table is written, then the header names it, then the old is freed).

import type { Storage } from '../io/storage.js';
import { FormatError } from '../errors.js';
import { COPIED_HI, TWO_POW_32, entryOffset, hex } from './layout.js';


export class L1Table {
  bytes: Uint8Array;
  view: DataView;
  /** Entries in use (the header's l1_size). */
  size: number;
  offset: number;
  private dirtyLo = Infinity;
  private dirtyHi = -1;
  /** A grown table not yet written (the header still names the old one). */
  relocated = false;

  constructor(bytes: Uint8Array, size: number, offset: number) {
    this.bytes = bytes;
    this.view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
    this.size = size;
    this.offset = offset;
  }

  /** The L2 table offset of entry i (0 = none). */
  l2Offset(i: number): number {
    if (i >= this.size || i * 8 >= this.bytes.length) return 0;
    const off = entryOffset(this.view.getUint32(i * 8), this.view.getUint32(i * 8 + 4));
    return off;
  }

  /** True when entry i has the COPIED flag (its L2 table has refcount 1 and may be written in place). */
  copied(i: number): boolean {
    return (this.view.getUint32(i * 8) & COPIED_HI) !== 0;
  }

  set(i: number, l2Offset: number, copied: boolean): void {
    if (l2Offset % 512 !== 0) throw new FormatError(`L2 table offset ${hex(l2Offset)} unaligned (L1 index: ${hex(i)})`);
    this.view.setUint32(i * 8, Math.floor(l2Offset / TWO_POW_32) | (copied ? COPIED_HI : 0));
    this.view.setUint32(i * 8 + 4, l2Offset >>> 0);
    this.dirtyLo = Math.min(this.dirtyLo, i);
    this.dirtyHi = Math.max(this.dirtyHi, i + 1);
  }

  /** Replaces the table by a larger one of `size` entries at newOffset (written by writeOut). */
  grow(size: number, newOffset: number, clusterSize: number): void {
    const bytes = new Uint8Array(Math.ceil((size * 8) / clusterSize) * clusterSize);
    bytes.set(this.bytes.subarray(0, Math.min(this.bytes.length, this.size * 8)));
    this.bytes = bytes;
    this.view = new DataView(bytes.buffer);
    this.size = size;
    this.offset = newOffset;
    this.relocated = true;
  }

  /** Clears entries [from, size) in memory (shrinking); returns the L2 offsets they named. */
  clearFrom(from: number): number[] {
    const freed: number[] = [];
    for (let i = from; i < this.size; i++) {
      const off = this.l2Offset(i);
      if (off !== 0 || this.view.getUint32(i * 8) !== 0) {
        if (off > 0) freed.push(off);
        this.view.setUint32(i * 8, 0);
        this.view.setUint32(i * 8 + 4, 0);
        this.dirtyLo = Math.min(this.dirtyLo, i);
        this.dirtyHi = Math.max(this.dirtyHi, i + 1);
      }
    }
    return freed;
  }

  /** Writes the dirty entries (whole 512-byte sectors), or the whole relocated table and then the header. */
  async writeOut(storage: Storage, commit: (offset: number, size: number) => Promise<void>): Promise<void> {
    if (this.relocated) {
      // As qcow2_grow_l1_table: exactly the entries in use (the rest of the cluster stays a hole).
      await storage.write(this.bytes.subarray(0, Math.min(this.bytes.length, this.size * 8)), this.offset);
      this.relocated = false;
      await commit(this.offset, this.size);
    } else if (this.dirtyHi > this.dirtyLo) {
      const lo = Math.floor((this.dirtyLo * 8) / 512) * 512;
      const hi = Math.min(this.size * 8, Math.ceil((this.dirtyHi * 8) / 512) * 512);
      await storage.write(this.bytes.subarray(lo, hi), this.offset + lo);
    }
    this.dirtyLo = Infinity;
    this.dirtyHi = -1;
  }
}
