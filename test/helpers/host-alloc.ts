// A file's host allocation, measured the way the host reports it, and compared between the file
// qimg made and the file qemu-img made by what qimg controls.
//
// qimg controls which byte ranges of a file hold data, which are holes and which are preallocated
// (unwritten), and how long the file is. It does not control how the file system records that:
// ext4 keeps a file's extents in the inode while there are at most 4, then in a tree of 4 KiB
// blocks (340 extents each) that it counts in st_blocks. How many extents a range ends up in
// depends on the order of writes and on what else the file system is allocating at the moment (two
// files with the same bytes, the same holes and the same unwritten ranges were seen in 1 and in 3
// extents, the second with one more tree block), and a tree that once grew keeps its block when
// later writes merge the extents back. So st_blocks, and qemu-img's `actual-size` (st_blocks * 512,
// `disk size` in human output), are compared through the allocation: the allocated ranges exactly,
// and each file's blocks beyond them only as that file's own extent bookkeeping, bounded by its
// extents.
//
// How the ranges are read: FIEMAP (ioctl FS_IOC_FIEMAP with FIEMAP_FLAG_SYNC, which first writes
// back dirty pages, so delayed allocation is settled and st_blocks read afterwards is final) gives
// the extents with their unwritten flag; SEEK_DATA/SEEK_HOLE gives the data ranges. Through koffi
// (the project's optional native dependency) when it loads, else through python3, else neither (the
// comparison then falls back to length and a looser block count; failure messages name the way
// used). tmpfs has no FIEMAP and no extent tree: its block counts are compared exactly.

import { execFile } from 'node:child_process';
import { closeSync, fstatSync, fsyncSync, openSync, statfsSync } from 'node:fs';
import { open } from 'node:fs/promises';
import { createRequire } from 'node:module';

/** A byte range [start, start + length). */
export interface Range {
  start: number;
  length: number;
}

/** One FIEMAP extent (bytes). */
export interface HostExtent {
  logical: number;
  physical: number;
  length: number;
  flags: number;
}

/** A run of the logical map: allocated bytes, preallocated-but-unwritten or written. */
export interface AllocatedRun extends Range {
  unwritten: boolean;
}

export interface HostAllocation {
  path: string;
  /** st_size */
  length: number;
  /** st_blocks (512-byte units), read after FIEMAP's sync (or an fsync) */
  blocks: number;
  /** The file system's block size (statfs f_bsize). */
  blockSize: number;
  /** statfs f_type */
  fsType: number;
  /** SEEK_DATA/SEEK_HOLE data ranges; undefined when lseek could not be called. */
  data?: Range[];
  /** FIEMAP extents as the file system reports them; undefined when unsupported or not callable. */
  extents?: HostExtent[];
  /** How the ranges were read. */
  via: 'koffi' | 'python3' | 'none';
}

const TMPFS_MAGIC = 0x01021994;
const EXT4_SUPER_MAGIC = 0xef53; // ext2/3/4 share it
const XFS_SUPER_MAGIC = 0x58465342;

const FS_IOC_FIEMAP = 0xc020660b; // _IOWR('f', 11, struct fiemap)
const FIEMAP_FLAG_SYNC = 0x1;
const FIEMAP_EXTENT_LAST = 0x1;
const FIEMAP_EXTENT_DATA_INLINE = 0x200;
export const FIEMAP_EXTENT_UNWRITTEN = 0x800;
/** struct fiemap is 32 bytes, each struct fiemap_extent 56. */
const FIEMAP_HEADER = 32;
const FIEMAP_EXTENT_SIZE = 56;
const FIEMAP_BATCH = 512;
const SEEK_DATA = 3;
const SEEK_HOLE = 4;
const ENXIO = 6;

interface Native {
  ioctl(fd: number, request: number, arg: Uint8Array): number;
  lseek(fd: number, offset: number, whence: number): number;
  errno(): number;
}

let native: Native | null | undefined;

function loadKoffi(): Native | null {
  if (process.platform !== 'linux' || !['x64', 'arm64'].includes(process.arch)) return null;
  try {
    const koffi = createRequire(import.meta.url)('koffi') as {
      load(path: string): { func(definition: string): (...args: unknown[]) => unknown };
      errno(): number;
    };
    const lib = koffi.load('libc.so.6');
    // ioctl is variadic in C; with one pointer argument the fixed-argument call is the same on
    // x86-64 and aarch64 Linux.
    const ioctl = lib.func('int ioctl(int fd, unsigned long request, _Inout_ uint8_t *arg)');
    const lseek = lib.func('int64_t lseek(int fd, int64_t offset, int whence)');
    return {
      ioctl: (fd, request, arg) => Number(ioctl(fd, request, arg)),
      lseek: (fd, offset, whence) => Number(lseek(fd, offset, whence)),
      errno: () => koffi.errno(),
    };
  } catch {
    return null;
  }
}

/** QIMG_TEST_HOST_ALLOC=koffi|python3|none forces a path (to test the fallbacks); default: the first that works. */
function wanted(): 'koffi' | 'python3' | 'none' | undefined {
  const v = process.env.QIMG_TEST_HOST_ALLOC;
  return v === 'koffi' || v === 'python3' || v === 'none' ? v : undefined;
}

function u64(b: Buffer, at: number): number {
  const v = b.readBigUInt64LE(at);
  if (v > BigInt(Number.MAX_SAFE_INTEGER)) throw new Error(`FIEMAP value ${v} past 2^53`);
  return Number(v);
}

/** FIEMAP through koffi: the extents, or undefined when the file system has no FIEMAP. */
function fiemapKoffi(n: Native, fd: number): HostExtent[] | undefined {
  const extents: HostExtent[] = [];
  const buf = Buffer.alloc(FIEMAP_HEADER + FIEMAP_EXTENT_SIZE * FIEMAP_BATCH);
  let start = 0;
  let flags = FIEMAP_FLAG_SYNC;
  for (;;) {
    buf.fill(0);
    buf.writeBigUInt64LE(BigInt(start), 0);
    buf.writeBigUInt64LE(0xffffffffffffffffn, 8); // to the end (the kernel clamps it)
    buf.writeUInt32LE(flags, 16);
    buf.writeUInt32LE(FIEMAP_BATCH, 24);
    if (n.ioctl(fd, FS_IOC_FIEMAP, buf) < 0) {
      const e = n.errno();
      if (extents.length === 0 && (e === 95 || e === 25 || e === 22)) return undefined; // EOPNOTSUPP, ENOTTY, EINVAL
      throw new Error(`FIEMAP failed: errno ${e}`);
    }
    const mapped = buf.readUInt32LE(20);
    if (mapped === 0) return extents;
    let last = false;
    for (let i = 0; i < mapped; i++) {
      const at = FIEMAP_HEADER + FIEMAP_EXTENT_SIZE * i;
      const e = { logical: u64(buf, at), physical: u64(buf, at + 8), length: u64(buf, at + 16), flags: buf.readUInt32LE(at + 40) };
      extents.push(e);
      if (e.flags & FIEMAP_EXTENT_LAST) last = true;
    }
    if (last) return extents;
    const tail = extents[extents.length - 1]!;
    start = tail.logical + tail.length;
    flags = 0;
  }
}

function seekMapKoffi(n: Native, fd: number): Range[] {
  const runs: Range[] = [];
  let pos = 0;
  for (;;) {
    const d = n.lseek(fd, pos, SEEK_DATA);
    if (d < 0) {
      const e = n.errno();
      if (e === ENXIO) return runs;
      throw new Error(`lseek SEEK_DATA failed: errno ${e}`);
    }
    const h = n.lseek(fd, d, SEEK_HOLE);
    if (h < 0) throw new Error(`lseek SEEK_HOLE failed: errno ${n.errno()}`);
    runs.push({ start: d, length: h - d });
    pos = h;
  }
}

// The same two walks in python3 (fcntl.ioctl, os.lseek), for hosts where koffi does not load.
const PYTHON = String.raw`
import errno, fcntl, json, os, struct, sys
fd = os.open(sys.argv[1], os.O_RDONLY)
out = {}
ext = []; start = 0; flags = 1
try:
    while True:
        buf = bytearray(struct.pack('=QQIIII', start, 0xffffffffffffffff, flags, 0, 512, 0) + bytes(56 * 512))
        fcntl.ioctl(fd, 0xC020660B, buf, True)
        mapped = struct.unpack_from('=I', buf, 20)[0]
        if mapped == 0: break
        last = False
        for i in range(mapped):
            lo, ph, ln, _a, _b, fl = struct.unpack_from('=QQQQQI', buf, 32 + 56 * i)
            ext.append([lo, ph, ln, fl])
            last = last or bool(fl & 1)
        if last: break
        start = ext[-1][0] + ext[-1][2]; flags = 0
    out['fiemap'] = ext
except OSError as e:
    if ext or e.errno not in (errno.EOPNOTSUPP, errno.ENOTTY, errno.EINVAL): raise
runs = []; pos = 0
while True:
    try: d = os.lseek(fd, pos, os.SEEK_DATA)
    except OSError as e:
        if e.errno == errno.ENXIO: break
        raise
    h = os.lseek(fd, d, os.SEEK_HOLE)
    runs.append([d, h - d]); pos = h
out['seek'] = runs
print(json.dumps(out))
`;

function viaPython(path: string): Promise<{ extents?: HostExtent[]; data: Range[] } | null> {
  return new Promise((resolve, reject) => {
    execFile('python3', ['-c', PYTHON, path], { encoding: 'utf8', maxBuffer: 256 * 1024 * 1024 }, (err, stdout, stderr) => {
      if (err && (err as NodeJS.ErrnoException).code === 'ENOENT') {
        resolve(null); // no python3 either
        return;
      }
      if (err) {
        reject(new Error(`python3 FIEMAP/SEEK walk of ${path} failed: ${stderr}`));
        return;
      }
      const o = JSON.parse(stdout) as { fiemap?: number[][]; seek: number[][] };
      resolve({
        extents: o.fiemap?.map(([logical, physical, length, flags]) => ({ logical: logical!, physical: physical!, length: length!, flags: flags! })),
        data: o.seek.map(([start, length]) => ({ start: start!, length: length! })),
      });
    });
  });
}

/** Measures a file's host allocation (syncing it first, so delayed allocation is settled). */
export async function hostAllocation(path: string): Promise<HostAllocation> {
  const fs = statfsSync(path);
  const force = wanted();
  if (native === undefined) native = loadKoffi();
  if (force !== 'python3' && force !== 'none' && native) {
    const fd = openSync(path, 'r');
    try {
      const extents = fiemapKoffi(native, fd);
      if (!extents) fsyncSync(fd);
      const st = fstatSync(fd);
      const data = seekMapKoffi(native, fd);
      return { path, length: st.size, blocks: st.blocks, blockSize: fs.bsize, fsType: fs.type, data, extents, via: 'koffi' };
    } finally {
      closeSync(fd);
    }
  }
  if (force === 'koffi') throw new Error('QIMG_TEST_HOST_ALLOC=koffi but koffi does not load');
  const py = force === 'none' ? null : await viaPython(path);
  const fd = openSync(path, 'r');
  try {
    if (!py?.extents) fsyncSync(fd);
    const st = fstatSync(fd);
    return {
      path, length: st.size, blocks: st.blocks, blockSize: fs.bsize, fsType: fs.type,
      data: py?.data, extents: py?.extents, via: py ? 'python3' : 'none',
    };
  } finally {
    closeSync(fd);
  }
}

/** The FIEMAP extents as logical runs, adjacent ones with the same unwritten flag merged. */
export function allocatedMap(a: HostAllocation): AllocatedRun[] | undefined {
  if (!a.extents) return undefined;
  const out: AllocatedRun[] = [];
  for (const e of a.extents) {
    const unwritten = (e.flags & FIEMAP_EXTENT_UNWRITTEN) !== 0;
    const last = out[out.length - 1];
    if (last && last.start + last.length === e.logical && last.unwritten === unwritten) last.length += e.length;
    else out.push({ start: e.logical, length: e.length, unwritten });
  }
  return out;
}

function subtract(ranges: Range[], cut: Range[]): Range[] {
  const out: Range[] = [];
  for (const r of ranges) {
    let pieces: Range[] = [{ ...r }];
    for (const c of cut) {
      const next: Range[] = [];
      for (const p of pieces) {
        const pEnd = p.start + p.length;
        const cEnd = c.start + c.length;
        if (cEnd <= p.start || c.start >= pEnd) {
          next.push(p);
          continue;
        }
        if (c.start > p.start) next.push({ start: p.start, length: c.start - p.start });
        if (cEnd < pEnd) next.push({ start: cEnd, length: pEnd - cEnd });
      }
      pieces = next;
    }
    out.push(...pieces);
  }
  return out;
}

/**
 * The data ranges compared between files. Where FIEMAP says a range is unwritten, SEEK_DATA does
 * not report the allocation but the page cache: ext4 calls an unwritten range data while it has
 * up-to-date pages in memory (after a read of it, or a partial-page write), a hole once they are
 * evicted. FIEMAP's unwritten runs are compared instead, so those ranges are left out here.
 */
function comparableData(a: HostAllocation, alsoLeaveOut: Range[] = []): Range[] | undefined {
  if (!a.data) return undefined;
  const map = allocatedMap(a);
  return subtract(a.data, [...(map?.filter((r) => r.unwritten) ?? []), ...alsoLeaveOut]);
}

export interface HostCompareOptions {
  /**
   * qimg had no fallocate (koffi missing, or QIMG_NO_NATIVE=1) and wrote zeros where QEMU
   * reserves blocks, as posix_fallocate does where fallocate is missing: the same ranges are
   * allocated, written in qimg's file where unwritten in qemu-img's. Pass `!loadNative()`.
   */
  fallocEmulated?: boolean;
}

interface Bookkeeping {
  /** Bytes st_blocks counts beyond the extents' own bytes. */
  bytes: number;
  /** The most the file system's own records of these extents may take. */
  bound: number;
  why: string;
}

/**
 * The bytes a file system may spend on `records` extent records, beyond the extents themselves.
 * ext4: up to 4 extents sit in the inode; past that in a tree of leaf blocks of (block - 12) / 12
 * extents (340 in 4 KiB), indexed from the inode (4 entries) or, past 4 leaves, from index blocks.
 * A tree that once grew keeps its leaf even after writes merge the extents back to 4 or fewer, so
 * even a few extents may come with one leaf. A full leaf is split where the new extent goes, so
 * leaves are not full once there are several: they are taken to be at least half full. XFS (bmbt:
 * 72-byte headers, 16-byte records) and other file systems are bounded the same way.
 */
function bookkeepingBound(records: number, blockSize: number, fsType: number): { bound: number; why: string } {
  if (records === 0) return { bound: 0, why: 'no extents' };
  const perBlock = fsType === EXT4_SUPER_MAGIC ? Math.floor((blockSize - 12) / 12) : Math.floor((blockSize - 72) / 16);
  const atLeast = Math.floor(perBlock / 2);
  const leaves = records <= perBlock ? 1 : Math.ceil(records / atLeast);
  let blocks = leaves;
  for (let level = leaves; level > 4; level = Math.ceil(level / atLeast)) blocks += Math.ceil(level / atLeast);
  const fs = fsType === EXT4_SUPER_MAGIC ? 'ext4' : fsType === XFS_SUPER_MAGIC ? 'xfs' : `fs 0x${fsType.toString(16)}`;
  return { bound: blocks * blockSize, why: `${fs}: ${records} extent records, at most ${blocks} tree block(s) of ${blockSize}` };
}

/**
 * How many extent records the file system may keep for these extents: FIEMAP reports an extent
 * as far as its mapping cache merged it, while ext4 records at most 32768 blocks per extent
 * (32767 unwritten).
 */
function records(extents: readonly HostExtent[], blockSize: number): number {
  return extents.reduce((n, e) => n + Math.max(1, Math.ceil(e.length / (32767 * blockSize))), 0);
}

/** st_blocks * 512 less the bytes the extents cover: the file system's bookkeeping for this file. */
export function bookkeeping(a: HostAllocation): Bookkeeping | undefined {
  if (!a.extents) return undefined;
  // Inline data lives in the inode: no blocks of its own.
  const covered = a.extents.reduce((s, e) => s + (e.flags & FIEMAP_EXTENT_DATA_INLINE ? 0 : e.length), 0);
  const { bound, why } = bookkeepingBound(records(a.extents, a.blockSize), a.blockSize, a.fsType);
  return { bytes: a.blocks * 512 - covered, bound, why };
}

/** The runs with the unwritten flag dropped (adjacent ones merged). */
function allWritten(runs: AllocatedRun[]): AllocatedRun[] {
  const out: AllocatedRun[] = [];
  for (const r of runs) {
    const last = out[out.length - 1];
    if (last && last.start + last.length === r.start) last.length += r.length;
    else out.push({ start: r.start, length: r.length, unwritten: false });
  }
  return out;
}

function runsText(runs: readonly Range[] | undefined, max = 12): string {
  if (!runs) return '(not available)';
  const shown = runs.slice(0, max).map((r) => `${r.start}+${r.length}${'unwritten' in r ? ((r as AllocatedRun).unwritten ? ' unwritten' : '') : ''}`);
  return `[${shown.join(', ')}${runs.length > max ? `, … ${runs.length - max} more` : ''}] (${runs.length} runs)`;
}

function sameRuns(a: readonly Range[], b: readonly Range[]): boolean {
  return (
    a.length === b.length &&
    a.every((r, i) => {
      const s = b[i]!;
      return r.start === s.start && r.length === s.length && (r as AllocatedRun).unwritten === (s as AllocatedRun).unwritten;
    })
  );
}

/** A description of the allocation, for failure messages. */
export function describeAllocation(a: HostAllocation): string {
  const k = bookkeeping(a);
  return (
    `${a.path}: length ${a.length}, st_blocks ${a.blocks} (${a.blocks * 512} bytes), via ${a.via}\n` +
    `    SEEK data ${runsText(a.data)}\n` +
    `    FIEMAP ${runsText(allocatedMap(a))}, ${a.extents?.length ?? '?'} extents` +
    (k ? `\n    bookkeeping ${k.bytes} bytes, bound ${k.bound} (${k.why})` : '')
  );
}

/**
 * The host allocation `ours` must share with `theirs`: the same length, the same data ranges, the
 * same allocated and unwritten ranges (FIEMAP), and st_blocks that differ only by each file's own
 * extent bookkeeping (see the top of this file). Without FIEMAP: exact st_blocks on tmpfs, which
 * has no extent records; elsewhere a difference within the bookkeeping of as many extents as the
 * larger file's SEEK runs would need at ext4's 128 MiB per extent (the extents are not visible).
 */
export function expectSameHostAllocation(ours: HostAllocation, theirs: HostAllocation, label: string, options: HostCompareOptions = {}): void {
  const fail = (what: string): never => {
    throw new Error(`${label}: host allocation differs (${what})\n  qemu-img: ${describeAllocation(theirs)}\n  qimg:     ${describeAllocation(ours)}`);
  };
  if (ours.length !== theirs.length) fail('file length');
  const emulated = options.fallocEmulated ? (allocatedMap(theirs) ?? []).filter((r) => r.unwritten) : [];
  const da = comparableData(ours, emulated);
  const db = comparableData(theirs);
  if (da && db && !sameRuns(da, db)) fail('SEEK_DATA/SEEK_HOLE data ranges');
  let ma = allocatedMap(ours);
  let mb = allocatedMap(theirs);
  if (ma && mb && options.fallocEmulated) {
    ma = allWritten(ma);
    mb = allWritten(mb);
  }
  if (ma && mb) {
    if (!sameRuns(ma, mb)) fail('FIEMAP allocated/unwritten ranges');
    for (const a of [ours, theirs]) {
      const k = bookkeeping(a)!;
      if (k.bytes < 0 || k.bytes % 512 !== 0 || k.bytes > k.bound) fail(`${a === ours ? 'qimg' : 'qemu-img'}'s st_blocks beyond its extents: ${k.bytes} bytes, bound ${k.bound}`);
    }
    return;
  }
  if (ours.fsType === TMPFS_MAGIC && theirs.fsType === TMPFS_MAGIC) {
    if (ours.blocks !== theirs.blocks) fail('st_blocks (tmpfs keeps no extent records: they must be equal)');
    return;
  }
  const estimate = (a: HostAllocation): number =>
    records((a.data ?? [{ start: 0, length: a.length }]).map((r) => ({ logical: r.start, physical: 0, length: r.length, flags: 0 })), a.blockSize) + 1;
  const { bound } = bookkeepingBound(Math.max(estimate(ours), estimate(theirs)), Math.max(ours.blockSize, theirs.blockSize), ours.fsType);
  if (Math.abs(ours.blocks - theirs.blocks) * 512 > bound) fail(`st_blocks differ by more than ${bound} bytes of bookkeeping (no FIEMAP here)`);
}

/** Measures both files (at once) and compares them as expectSameHostAllocation does. */
export async function compareHostAllocation(
  ours: string,
  theirs: string,
  label: string,
  options: HostCompareOptions = {},
): Promise<[HostAllocation, HostAllocation]> {
  const [a, b] = await Promise.all([hostAllocation(ours), hostAllocation(theirs)]);
  expectSameHostAllocation(a, b, label, options);
  return [a, b];
}

/**
 * qemu-img info's `actual-size` is st_blocks * 512 of the image file. Checks that against the
 * measured allocation (taken before info ran, so writeback had settled) and removes it from `info`,
 * so that the rest of two infos can be compared whole while the sizes go through
 * expectSameHostAllocation.
 */
export function takeActualSize(info: Record<string, unknown>, a: HostAllocation, label: string): void {
  const actual = info['actual-size'];
  if (actual !== a.blocks * 512) {
    throw new Error(`${label}: qemu-img info actual-size ${String(actual)} is not st_blocks * 512 = ${a.blocks * 512} of ${a.path}`);
  }
  delete info['actual-size'];
}

/** Union of sorted-or-not ranges, sorted and merged. */
function union(a: readonly Range[], b: readonly Range[]): Range[] {
  const all = [...a, ...b].sort((x, y) => x.start - y.start);
  const out: Range[] = [];
  for (const r of all) {
    const last = out[out.length - 1];
    if (last && r.start <= last.start + last.length) last.length = Math.max(last.length, r.start + r.length - last.start);
    else out.push({ ...r });
  }
  return out;
}

/**
 * The two files hold the same bytes (what cmp(1) says), read only where either has data by
 * SEEK_DATA: a hole reads as zeros in both, and reading the holes of two sparse 4 GiB files costs
 * seconds of system time for nothing. Unwritten ranges read as zeros too, whether SEEK_DATA calls
 * them data or not. Without the SEEK map the whole files are read.
 */
export async function expectSameFileBytes(ours: HostAllocation, theirs: HostAllocation, label: string): Promise<void> {
  if (ours.length !== theirs.length) throw new Error(`${label}: ${ours.path} is ${ours.length} bytes, ${theirs.path} ${theirs.length}`);
  const ranges = ours.data && theirs.data ? union(ours.data, theirs.data) : [{ start: 0, length: ours.length }];
  const [fa, fb] = await Promise.all([open(ours.path, 'r'), open(theirs.path, 'r')]);
  try {
    const chunk = 1024 * 1024;
    const ba = Buffer.alloc(chunk);
    const bb = Buffer.alloc(chunk);
    for (const r of ranges) {
      for (let off = r.start; off < r.start + r.length; off += chunk) {
        const n = Math.min(chunk, r.start + r.length - off);
        const [ra, rb] = await Promise.all([fa.read(ba, 0, n, off), fb.read(bb, 0, n, off)]);
        if (ra.bytesRead !== n || rb.bytesRead !== n) throw new Error(`${label}: short read at ${off} (${ra.bytesRead}, ${rb.bytesRead} of ${n})`);
        if (!ba.subarray(0, n).equals(bb.subarray(0, n))) {
          let i = 0;
          while (ba[i] === bb[i]) i++;
          throw new Error(`${label}: ${ours.path} and ${theirs.path} differ at byte ${off + i}: 0x${ba[i]!.toString(16)} against qemu-img's 0x${bb[i]!.toString(16)}`);
        }
      }
    }
  } finally {
    await Promise.all([fa.close(), fb.close()]);
  }
}
