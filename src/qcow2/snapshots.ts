// The internal snapshot table: parsed with QEMU's limits; each snapshot can be opened as an image.

import { FormatError } from '../errors.js';
import type { Storage } from '../io/storage.js';
import { readFullZeroFill } from '../io/storage.js';
import { MAX_SNAPSHOTS_TABLE_BYTES, MAX_SNAPSHOT_EXTRA_DATA, SNAPSHOT_HEADER_SIZE, TWO_POW_32, readU64, readU64Lossy } from './layout.js';

export interface Qcow2Snapshot {
  l1TableOffset: number;
  l1Size: number;
  id: string;
  name: string;
  dateSec: number;
  dateNsec: number;
  vmClockNsec: number;
  vmStateSize: number;
  /** Virtual disk size when the snapshot was taken (the image's size when not recorded). */
  diskSize: number;
  /** -1 when not recorded (QEMU's "icount disabled"). */
  icount: number;
  /** Extra data bytes past the fields qimg knows, kept for rewrites. */
  unknownExtraData: Uint8Array;
  extraDataSize: number;
}

/** Sequential reads over a storage through one reused window, so a table of many small entries costs few I/Os. */
class WindowReader {
  private window = new Uint8Array(0);
  private windowStart = 0;
  constructor(private readonly storage: Storage, private readonly windowSize = 65536) {}

  async bytes(offset: number, length: number): Promise<Uint8Array> {
    if (offset < this.windowStart || offset + length > this.windowStart + this.window.length) {
      const size = Math.max(this.windowSize, length);
      const buf = new Uint8Array(size);
      await readFullZeroFill(this.storage, buf, offset);
      this.window = buf;
      this.windowStart = offset;
    }
    const at = offset - this.windowStart;
    return this.window.subarray(at, at + length);
  }
}


const decoder = new TextDecoder();

/** Reads the table (QEMU's qcow2_read_snapshots without repair). */
export async function readSnapshotTable(
  storage: Storage, offset: number, count: number, imageSize: number,
): Promise<Qcow2Snapshot[]> {
  const reader = new WindowReader(storage);
  const snapshots: Qcow2Snapshot[] = [];
  let pos = offset;
  for (let i = 0; i < count; i++) {
    pos = Math.ceil(pos / 8) * 8;
    const head = await reader.bytes(pos, SNAPSHOT_HEADER_SIZE);
    const hv = new DataView(head.buffer, head.byteOffset, head.byteLength);
    const l1TableOffset = readU64(hv, 0, `Snapshot ${i} L1 table offset`);
    const l1Size = hv.getUint32(8);
    const idSize = hv.getUint16(12);
    const nameSize = hv.getUint16(14);
    const extraDataSize = hv.getUint32(36);
    const snap: Qcow2Snapshot = {
      l1TableOffset, l1Size, id: '', name: '',
      dateSec: hv.getUint32(16), dateNsec: hv.getUint32(20),
      vmClockNsec: readU64Lossy(hv, 24), vmStateSize: hv.getUint32(32),
      diskSize: imageSize, icount: -1, unknownExtraData: new Uint8Array(0), extraDataSize,
    };
    pos += SNAPSHOT_HEADER_SIZE;
    if (extraDataSize > MAX_SNAPSHOT_EXTRA_DATA) {
      throw new FormatError(`Too much extra metadata in snapshot table entry ${i}`);
    }
    if (extraDataSize > 0) {
      const extra = await reader.bytes(pos, extraDataSize);
      const ev = new DataView(extra.buffer, extra.byteOffset, extra.byteLength);
      if (extraDataSize >= 8) snap.vmStateSize = readU64Lossy(ev, 0);
      if (extraDataSize >= 16) snap.diskSize = readU64(ev, 8, `Snapshot ${i} disk size`);
      if (extraDataSize >= 24) {
        const hi = ev.getUint32(16);
        const lo = ev.getUint32(20);
        snap.icount = hi === 0xffffffff && lo === 0xffffffff ? -1 : hi * TWO_POW_32 + lo;
      }
      if (extraDataSize > 24) snap.unknownExtraData = extra.slice(24);
      pos += extraDataSize;
    }
    snap.id = decoder.decode(await reader.bytes(pos, idSize));
    pos += idSize;
    snap.name = decoder.decode(await reader.bytes(pos, nameSize));
    pos += nameSize;
    if (pos - offset > MAX_SNAPSHOTS_TABLE_BYTES) throw new FormatError('Snapshot table is too big');
    snapshots.push(snap);
  }
  return snapshots;
}

/** Finds a snapshot the way qemu-img's -l does: by id or by name (bdrv_snapshot_find). */
export function findSnapshot(
  snapshots: Qcow2Snapshot[], query: { id?: string; name?: string },
): Qcow2Snapshot | undefined {
  if (query.id !== undefined && query.name !== undefined) {
    return snapshots.find((s) => s.id === query.id && s.name === query.name);
  }
  if (query.id !== undefined) return snapshots.find((s) => s.id === query.id);
  if (query.name !== undefined) return snapshots.find((s) => s.name === query.name);
  return undefined;
}
