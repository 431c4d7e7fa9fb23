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
  /**
   * The 64-bit counters exactly as stored (vm clock, VM state size, icount): the numbers above may
   * have lost precision past 2^53, and a rewritten table must keep them bit for bit.
   */
  exact?: { vmClock: Uint8Array; vmState?: Uint8Array; icount?: Uint8Array };
  /** The id and name bytes as stored (rewritten as is: a name need not be valid UTF-8). */
  idBytes?: Uint8Array;
  nameBytes?: Uint8Array;
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
    snap.exact = { vmClock: head.slice(24, 32) };
    pos += SNAPSHOT_HEADER_SIZE;
    if (extraDataSize > MAX_SNAPSHOT_EXTRA_DATA) {
      throw new FormatError(`Too much extra metadata in snapshot table entry ${i}`);
    }
    if (extraDataSize > 0) {
      const extra = await reader.bytes(pos, extraDataSize);
      const ev = new DataView(extra.buffer, extra.byteOffset, extra.byteLength);
      if (extraDataSize >= 8) {
        snap.vmStateSize = readU64Lossy(ev, 0);
        snap.exact.vmState = extra.slice(0, 8);
      }
      if (extraDataSize >= 16) snap.diskSize = readU64(ev, 8, `Snapshot ${i} disk size`);
      if (extraDataSize >= 24) {
        const hi = ev.getUint32(16);
        const lo = ev.getUint32(20);
        snap.icount = hi === 0xffffffff && lo === 0xffffffff ? -1 : hi * TWO_POW_32 + lo;
        snap.exact.icount = extra.slice(16, 24);
      }
      if (extraDataSize > 24) snap.unknownExtraData = extra.slice(24);
      pos += extraDataSize;
    }
    snap.idBytes = (await reader.bytes(pos, idSize)).slice();
    snap.id = decoder.decode(snap.idBytes);
    pos += idSize;
    snap.nameBytes = (await reader.bytes(pos, nameSize)).slice();
    snap.name = decoder.decode(snap.nameBytes);
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

const encoder = new TextEncoder();
/** Bytes of the extra data QEMU 7.2 writes for every snapshot (VM state size, disk size, icount). */
export const SNAPSHOT_EXTRA_DATA_SIZE = 24;

function idBytesOf(s: Qcow2Snapshot): Uint8Array {
  return s.idBytes ?? encoder.encode(s.id);
}

function nameBytesOf(s: Qcow2Snapshot): Uint8Array {
  return s.nameBytes ?? encoder.encode(s.name);
}

/**
 * Size in bytes of the table as QEMU's qcow2_write_snapshots lays it out: each entry starts at a
 * multiple of 8 and carries at least the 24 bytes of extra data QEMU knows. Returns -1 past QEMU's
 * 64 MiB limit.
 */
export function snapshotTableSize(snapshots: readonly Qcow2Snapshot[]): number {
  let size = 0;
  for (const s of snapshots) {
    size = Math.ceil(size / 8) * 8;
    size += SNAPSHOT_HEADER_SIZE + Math.max(SNAPSHOT_EXTRA_DATA_SIZE, s.extraDataSize) + idBytesOf(s).length + nameBytesOf(s).length;
    if (size > MAX_SNAPSHOTS_TABLE_BYTES) return -1;
  }
  return size;
}

/** Size in bytes of the table as it was read (entries keep their own extra data sizes): what it occupies. */
export function storedSnapshotTableSize(snapshots: readonly Qcow2Snapshot[]): number {
  let size = 0;
  for (const s of snapshots) {
    size = Math.ceil(size / 8) * 8;
    size += SNAPSHOT_HEADER_SIZE + s.extraDataSize + idBytesOf(s).length + nameBytesOf(s).length;
  }
  return size;
}

/** Serialises the table (the layout of qcow2_write_snapshots; padding between entries is zero). */
export function serializeSnapshotTable(snapshots: readonly Qcow2Snapshot[]): Uint8Array {
  const size = snapshotTableSize(snapshots);
  if (size < 0) throw new FormatError('Snapshot table is too big');
  const out = new Uint8Array(size);
  const v = new DataView(out.buffer);
  let pos = 0;
  const u64 = (at: number, n: number): void => {
    v.setUint32(at, Math.floor(n / TWO_POW_32));
    v.setUint32(at + 4, n >>> 0);
  };
  for (const s of snapshots) {
    pos = Math.ceil(pos / 8) * 8;
    const id = idBytesOf(s);
    const name = nameBytesOf(s);
    if (id.length > 0xffff || name.length > 0xffff) throw new FormatError('Snapshot id or name too long');
    const extraSize = Math.max(SNAPSHOT_EXTRA_DATA_SIZE, s.extraDataSize);
    u64(pos, s.l1TableOffset);
    v.setUint32(pos + 8, s.l1Size);
    v.setUint16(pos + 12, id.length);
    v.setUint16(pos + 14, name.length);
    v.setUint32(pos + 16, s.dateSec);
    v.setUint32(pos + 20, s.dateNsec);
    if (s.exact) out.set(s.exact.vmClock, pos + 24);
    else u64(pos + 24, s.vmClockNsec);
    v.setUint32(pos + 36, extraSize);
    pos += SNAPSHOT_HEADER_SIZE;
    if (s.exact?.vmState) out.set(s.exact.vmState, pos);
    else u64(pos, s.vmStateSize);
    // A VM state past 4 GiB is left out of the old 32-bit field (older readers then see a disk-only snapshot).
    if (v.getUint32(pos) === 0) v.setUint32(pos - SNAPSHOT_HEADER_SIZE + 32, v.getUint32(pos + 4));
    u64(pos + 8, s.diskSize);
    if (s.exact?.icount) {
      out.set(s.exact.icount, pos + 16);
    } else if (s.icount < 0) {
      v.setUint32(pos + 16, 0xffffffff);
      v.setUint32(pos + 20, 0xffffffff);
    } else {
      u64(pos + 16, s.icount);
    }
    out.set(s.unknownExtraData.subarray(0, extraSize - SNAPSHOT_EXTRA_DATA_SIZE), pos + SNAPSHOT_EXTRA_DATA_SIZE);
    pos += extraSize;
    out.set(id, pos);
    pos += id.length;
    out.set(name, pos);
    pos += name.length;
  }
  return out;
}

/** QEMU's find_snapshot_by_id_or_name (snapshot apply): an id match first, then a name match. */
export function findSnapshotIndexByIdOrName(snapshots: readonly Qcow2Snapshot[], idOrName: string): number {
  const byId = snapshots.findIndex((s) => s.id === idOrName);
  return byId >= 0 ? byId : snapshots.findIndex((s) => s.name === idOrName);
}

/**
 * QEMU's find_new_snapshot_id: one more than the largest id read as strtoul reads it (leading
 * blanks and a sign allowed, digits until the first other character, unsigned long wrap-around).
 */
export function newSnapshotId(snapshots: readonly Qcow2Snapshot[]): string {
  const ULONG = 1n << 64n;
  let max = 0n;
  for (const s of snapshots) {
    const m = /^[\t\n\v\f\r ]*([+-]?)(\d+)/.exec(s.id);
    if (!m) continue;
    let n = BigInt(m[2]!);
    if (n >= ULONG) n = ULONG - 1n; // ERANGE: ULONG_MAX
    else if (m[1] === '-') n = (ULONG - n) % ULONG;
    if (n > max) max = n;
  }
  return ((max + 1n) % ULONG).toString();
}
