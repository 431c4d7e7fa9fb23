// Block-status-driven copy of one image (or several, concatenated), as qemu-img 7.2's convert does
// it (convert_iteration_sectors / convert_co_do_copy / convert_co_write): zero and unallocated
// ranges are never read, data is read in large requests with several in flight, and zero runs
// inside data are not written. Two kinds of target:
// - a raw Storage (the fast path: zero ranges become holes, writes go out in any order);
// - an Image opened writable (qcow2 or raw): writes in guest order unless `outOfOrder` (qemu-img's
//   rule: a request waits until the previous one is written), optional per-cluster compression,
//   and a target backing file (qemu-img -B: ranges unallocated in the source's top stay unallocated).

import { Image } from '../image.js';
import type { Storage } from '../io/storage.js';
import { isZero, writeZeroBytes } from '../io/zero.js';
import { settleAll } from '../async.js';
import { UsageError } from '../errors.js';
import { WriteThrottle } from './throttle.js';
import { copyRange, type CopyRangeTarget } from './copy-range.js';

const SECTOR = 512;
/** Bytes per request when compressing (whole clusters; at least one). */
const COMPRESS_BUFFER = 512 * 1024;
/** QEMU's BDRV_REQUEST_MAX_SECTORS: the longest block-status query. */
const REQUEST_MAX_SECTORS = Math.floor(0x7fffffff / SECTOR);

export interface ConvertProgress {
  /** Bytes of data ranges handed to a copy request so far (zero ranges do not count, as in qemu-img). */
  done: number;
  /** Bytes of data ranges in the whole source. */
  total: number;
}

export interface ConvertOptions {
  /**
   * Zero runs inside data at least this many bytes long are left as holes (qemu-img's -S);
   * a multiple of 512, default 4096; 0 writes every byte of data ranges and zero ranges too.
   */
  minSparse?: number;
  /** Bytes per read request (default 2 MiB, qemu-img's buffer). */
  bufferSize?: number;
  /** Requests in flight (default 8, qemu-img's -m). */
  parallel?: number;
  /**
   * Keep the target's existing contents where they are overwritten (qemu-img's -n): the target
   * must be at least as large as the source, and zero ranges are zeroed explicitly unless
   * `targetIsZero`. Default false: the target is emptied and sized to the source first.
   */
  existing?: boolean;
  /** With `existing`: the target already reads as zeros (qemu-img's --target-is-zero). */
  targetIsZero?: boolean;
  /**
   * Called each time a data range is handed to a copy request, in source order. Asking for it
   * costs one extra pass over the block status (to learn the total, as qemu-img does).
   */
  onProgress?: (progress: ConvertProgress) => void;
  /** Alignment of block-status runs in bytes (default: each source's cluster size, or 512). */
  alignment?: number;
  /**
   * Stops the copy when aborted: no new requests are issued, those in flight finish (a write still
   * waiting for `rateLimit` has not started: it is dropped), then convert rejects with an error
   * named 'AbortError' (the caller still flushes and closes the target).
   */
  signal?: AbortSignal;

  // Image targets only.
  /**
   * Write every data cluster compressed (qemu-img -c; qcow2 targets). All-zero clusters are not
   * written; a cluster whose compressed form does not fit in cluster_size - 1 bytes is stored
   * uncompressed (by the engine).
   */
  compress?: boolean;
  /**
   * The target has a backing file that reads like the source's backing (qemu-img -B): only ranges
   * allocated in the top image of each source are copied; unallocated ones stay unallocated in the
   * target, and zeros are written explicitly as zero clusters.
   */
  targetHasBacking?: boolean;
  /** Issue writes as soon as their data is read instead of in guest order (qemu-img -W). */
  outOfOrder?: boolean;

  /**
   * Keep going on read errors (qemu-img --salvage): a request that fails is read again sector by
   * sector, and each sector that still fails reads as zeros (reported through onReadError). A
   * block-status query that fails is retried on a quarter of the range until one sector, which is
   * then read as data (reported through onBlockStatusError).
   */
  salvage?: boolean;
  /**
   * Limit the target's write throughput to this many bytes per second (qemu-img -r; 0 or absent:
   * no limit). Written, zeroed and compressed ranges count with their guest length.
   */
  rateLimit?: number;
  /**
   * Copy offloading (qemu-img -C): data requests are copied as they are (no sparse detection), by
   * the kernel's copy_file_range where both ends are files (else read and written). The first
   * request that cannot be offloaded (a compressed source cluster, say) and all later ones are
   * copied the ordinary way. Not with `compress`, `salvage` or an explicit `minSparse`.
   */
  copyRange?: boolean;
  /** With `salvage`: one unreadable sector, at `offset` in source number `source`. */
  onReadError?: (info: { source: number; offset: number; error: unknown }) => void;
  /** With `salvage`: block status failed for the sector at `offset` in source number `source`. */
  onBlockStatusError?: (info: { source: number; offset: number; error: unknown }) => void;
}

/** A read from a source failed (without `salvage`): `offset` is the byte of the copy request in the concatenated disk. */
export class ConvertReadError extends Error {
  constructor(readonly offset: number, override readonly cause: unknown) {
    super(`error while reading at byte ${offset}: ${cause instanceof Error ? cause.message : String(cause)}`);
    this.name = 'ConvertReadError';
  }
}

/** Block status of a source failed (without `salvage`); `offset` is in that source. */
export class ConvertBlockStatusError extends Error {
  constructor(readonly offset: number, override readonly cause: unknown) {
    super(`error while reading block status at offset ${offset}: ${cause instanceof Error ? cause.message : String(cause)}`);
    this.name = 'ConvertBlockStatusError';
  }
}

/** `data`: read and write; `zero`: reads as zeros; `backing`: leave the target unallocated (-B). */
type ChunkStatus = 'data' | 'zero' | 'backing';

interface Chunk {
  sector: number;
  sectors: number;
  status: ChunkStatus;
}

interface SourcePart {
  image: Image;
  /** First sector of this source in the concatenated disk. */
  start: number;
  sectors: number;
  alignSectors: number;
}

/**
 * Splits the concatenated sources into copy requests the way qemu-img's convert loop does: one
 * block-status query per run (trimmed to the source's cluster alignment), data runs cut into
 * requests of at most one buffer.
 */
class ChunkPlanner {
  private sector = 0;
  private nextStatus = 0;
  private status: ChunkStatus = 'data';

  constructor(
    private readonly parts: SourcePart[],
    private readonly totalSectors: number,
    private readonly bufSectors: number,
    private readonly zeroAsData: boolean,
    private readonly mode: PlannerMode = DEFAULT_MODE,
    private readonly salvage: SalvageHooks | null = null,
  ) {}

  async next(): Promise<Chunk | null> {
    const sector = this.sector;
    if (sector >= this.totalSectors) return null;
    let n = Math.min(this.totalSectors - sector, REQUEST_MAX_SECTORS);
    const { targetBackingSectors, clusterSectors } = this.mode;
    let postBackingZero = false;
    if (targetBackingSectors >= 0) {
      // Past the target's backing file, zeros need not be written (the target reads zeros there).
      if (sector >= targetBackingSectors) postBackingZero = true;
      else if (sector + n > targetBackingSectors) n = targetBackingSectors - sector;
    }
    if (this.nextStatus <= sector) {
      const part = this.parts.find((p) => sector < p.start + p.sectors)!;
      const local = sector - part.start;
      const want = Math.min(n, part.sectors - local);
      // The image's end may not be sector aligned: the last sector's tail reads as zeros.
      const offset = local * SECTOR;
      const bytes = Math.min(want * SECTOR, part.image.virtualSize - offset);
      let status: ChunkStatus;
      if (bytes > 0) {
        let tryBytes = bytes;
        for (;;) {
          try {
            ({ n, status } = await this.runStatus(part, offset, tryBytes));
            break;
          } catch (error) {
            if (!this.salvage) throw new ConvertBlockStatusError(offset, error);
            if (tryBytes <= SECTOR) {
              this.salvage.onBlockStatusError?.({ source: this.parts.indexOf(part), offset, error });
              n = 1;
              status = 'data';
              break;
            }
            tryBytes = Math.min(tryBytes, Math.ceil(Math.ceil(tryBytes / SECTOR) / 4) * SECTOR);
          }
        }
      } else {
        n = want;
        status = 'zero';
      }
      const tail = (local + n) % part.alignSectors;
      if (n > tail) n -= tail;
      if (status === 'zero' && postBackingZero) status = 'backing';
      this.status = status;
      this.nextStatus = sector + n;
    }
    n = Math.min(n, this.nextStatus - sector);
    if (this.status === 'data' || (this.zeroAsData && this.status === 'zero')) {
      if (n > this.bufSectors) {
        n = this.bufSectors;
        // A run cut by the buffer is cut on a target cluster boundary: a request ending mid-cluster
        // made the engine copy-on-write (and allocate a buffer the size of) the whole request, for
        // nearly every request of an image whose data starts off a cluster boundary.
        const unit = this.mode.unitSectors;
        if (unit > 1) {
          const tail = (sector + n) % unit;
          if (n > tail) n -= tail;
        }
      }
    }
    if (clusterSectors > 0) {
      // Compressed clusters are written whole: a shorter run is taken as (part of) a data cluster.
      if (n < clusterSectors) {
        n = Math.min(clusterSectors, this.totalSectors - sector);
        this.status = 'data';
      } else {
        n -= n % clusterSectors;
      }
    }
    this.sector = sector + n;
    return { sector, sectors: n, status: this.status };
  }

  /** The status of [offset, offset+bytes) in one source: sectors of the run and its kind. */
  private async runStatus(part: SourcePart, offset: number, bytes: number): Promise<{ n: number; status: ChunkStatus }> {
    const image = part.image;
    const backing = image.backing;
    let top: Awaited<ReturnType<Image['driver']['getMapping']>> | null = null;
    if (this.mode.targetHasBacking && backing) top = await image.driver.getMapping(offset, bytes);
    if (top && top.kind === 'unallocated' && offset < backing!.virtualSize) {
      // Block status above the source's backing file: unallocated in the top image.
      return { n: Math.ceil(Math.min(top.length, bytes) / SECTOR), status: 'backing' };
    }
    const st = await image.blockStatusAt(offset, top ? Math.min(top.length, bytes) : bytes);
    return { n: Math.ceil(st.length / SECTOR), status: st.zero ? 'zero' : 'data' };
  }
}

interface SalvageHooks {
  onReadError?: ConvertOptions['onReadError'];
  onBlockStatusError?: ConvertOptions['onBlockStatusError'];
}

function salvageHooks(options: ConvertOptions): SalvageHooks | null {
  if (!options.salvage) return null;
  return { onReadError: options.onReadError, onBlockStatusError: options.onBlockStatusError };
}

interface PlannerMode {
  targetHasBacking: boolean;
  /** Sectors of the target's backing file (new target with -B), else -1. */
  targetBackingSectors: number;
  /** Target cluster size in sectors when compressing, else 0. */
  clusterSectors: number;
  /** Target cluster size in sectors (image targets; 0 for none): where the buffer cuts data runs. */
  unitSectors: number;
}

const DEFAULT_MODE: PlannerMode = { targetHasBacking: false, targetBackingSectors: -1, clusterSectors: 0, unitSectors: 0 };

/**
 * Sector runs of a buffer as qemu-img's sparse detection sees them: returns whether the run at
 * the start holds data and how many sectors it spans. Run ends are moved to `alignment`
 * boundaries (data rounded up, zeros rounded down) so writes stay aligned. `words` views the
 * buffer (see sectorWords); the scans are plain loops over it, cheap before V8 optimizes them.
 */
function classifyRun(
  words: Uint32Array, first: number, n: number, sectorNum: number, alignment: number,
): { data: boolean; count: number } {
  if (n <= 0) return { data: false, count: 0 };
  let zero = isZeroSector(words, first);
  let i = 1;
  if (zero) {
    while (i < n && isZeroSector(words, first + i)) i++;
  } else {
    // Most data sectors have a nonzero first word: only the others are looked at in full.
    for (let w = (first + i) * SECTOR_WORDS; i < n; i++, w += SECTOR_WORDS) {
      if (words[w] === 0 && isZeroSector(words, first + i)) break;
    }
  }
  if (i === n) return { data: !zero, count: i };
  const tail = (sectorNum + i) % alignment;
  if (tail) {
    // A short zero run ending mid-block is written with the data after it.
    if (zero && i <= tail) zero = false;
    if (!zero) i = Math.min(i + alignment - tail, n);
    else i -= tail;
  }
  return { data: !zero, count: i };
}

/** Like classifyRun, but a data run swallows following zero runs shorter than `min` sectors. */
function classifyRunMin(
  words: Uint32Array, first: number, n: number, min: number, sectorNum: number, alignment: number,
): { data: boolean; count: number } {
  if (n < min) min = n;
  const head = classifyRun(words, first, n, sectorNum, alignment);
  if (!head.data) return head;
  let used = head.count;
  let checked = head.count;
  while (checked < n) {
    const run = classifyRun(words, first + checked, n - checked, sectorNum + checked, alignment);
    checked += run.count;
    if (run.data) used = checked;
    else if (run.count >= min) break;
  }
  return { data: true, count: used };
}

function pow2floor(n: number): number {
  let p = 1;
  while (p * 2 <= n) p *= 2;
  return p;
}

/** The raw target's size for these sources: each source's size rounded up to 512 bytes, summed. */
export function convertTargetSize(source: Image | Image[]): number {
  const sources = Array.isArray(source) ? source : [source];
  let sectors = 0;
  for (const image of sources) sectors += Math.ceil(image.virtualSize / SECTOR);
  return sectors * SECTOR;
}

/** The error convert rejects with when its signal was aborted. */
export class ConvertAbortedError extends Error {
  constructor() {
    super('convert was interrupted');
    this.name = 'AbortError';
  }
}

/** What both kinds of target share: the sources as parts, the request sizes. */
interface Setup {
  parts: SourcePart[];
  totalSectors: number;
  bufSectors: number;
  parallel: number;
  minSparseSectors: number;
  alignment: number;
}

async function setup(source: Image | Image[], options: ConvertOptions): Promise<Setup> {
  const sources = Array.isArray(source) ? source : [source];
  if (sources.length === 0) throw new UsageError('convert needs at least one source image');
  const minSparse = options.minSparse ?? 4096;
  if (minSparse < 0 || minSparse % SECTOR !== 0) {
    throw new UsageError(`minSparse must be a multiple of ${SECTOR} bytes (got ${minSparse})`);
  }
  const bufSectors = Math.max(1, Math.floor((options.bufferSize ?? 2 * 1024 * 1024) / SECTOR));
  const parallel = Math.max(1, Math.floor(options.parallel ?? 8));
  const minSparseSectors = minSparse / SECTOR;
  const alignment = minSparseSectors ? pow2floor(minSparseSectors) : 1;
  const parts: SourcePart[] = [];
  let totalSectors = 0;
  for (const image of sources) {
    const sectors = Math.ceil(image.virtualSize / SECTOR);
    let align = options.alignment;
    if (align === undefined) {
      const cluster = image.format === 'qcow2' ? (await image.info()).clusterSize : undefined;
      align = cluster ?? SECTOR;
    }
    parts.push({ image, start: totalSectors, sectors, alignSectors: Math.max(1, Math.floor(align / SECTOR)) });
    totalSectors += sectors;
  }
  return { parts, totalSectors, bufSectors, parallel, minSparseSectors, alignment };
}

/**
 * Fills buf with the concatenated sources' sectors [sector, sector + sectors) (a request may span
 * two sources when compressing). With salvage, a failed read is retried sector by sector and the
 * sectors that still fail read as zeros; without, the failure is a ConvertReadError.
 */
async function readSectors(
  parts: SourcePart[], buf: Uint8Array, sector: number, sectors: number, salvage: SalvageHooks | null = null,
): Promise<void> {
  let pos = 0;
  while (pos < sectors) {
    const s = sector + pos;
    const part = parts.find((p) => s < p.start + p.sectors)!;
    const n = Math.min(sectors - pos, part.start + part.sectors - s);
    const offset = (s - part.start) * SECTOR;
    const dst = buf.subarray(pos * SECTOR, (pos + n) * SECTOR);
    try {
      await readPart(part, dst, offset);
    } catch (error) {
      if (!salvage) throw new ConvertReadError(sector * SECTOR, error);
      for (let i = 0; i < n; i++) {
        const one = dst.subarray(i * SECTOR, (i + 1) * SECTOR);
        try {
          await readPart(part, one, offset + i * SECTOR);
        } catch (e) {
          salvage.onReadError?.({ source: parts.indexOf(part), offset: offset + i * SECTOR, error: e });
          one.fill(0);
        }
      }
    }
    pos += n;
  }
}

/** Reads dst.length bytes at offset of one source; its last sector's tail past the image's end reads as zeros. */
async function readPart(part: SourcePart, dst: Uint8Array, offset: number): Promise<void> {
  const inImage = Math.max(0, Math.min(dst.length, part.image.virtualSize - offset));
  if (inImage > 0) await part.image.readInto(dst.subarray(0, inImage), offset);
  dst.fill(0, inImage);
}

/**
 * Runs `parallel` copy loops over the planner's requests (taken one at a time, in order), with
 * progress counted as qemu-img counts it (data requests, and zero ones with sparse detection off).
 */
async function runCopy(
  st: Setup,
  options: ConvertOptions,
  makePlanner: () => ChunkPlanner,
  zeroAsData: boolean,
  copy: (chunk: Chunk, index: number, buf: Uint8Array) => Promise<void>,
  bufBytes: number,
): Promise<void> {
  const counts = (c: Chunk): boolean => c.status === 'data' || (zeroAsData && c.status === 'zero');
  let allocatedTotal = 0;
  if (options.onProgress) {
    const prepass = makePlanner();
    for (let c = await prepass.next(); c; c = await prepass.next()) if (counts(c)) allocatedTotal += c.sectors;
  }
  const planner = makePlanner();
  let planLock: Promise<unknown> = Promise.resolve();
  let allocatedDone = 0;
  let index = 0;
  let failure: { error: unknown } | null = null;
  const signal = options.signal;

  const nextChunk = (): Promise<{ chunk: Chunk; index: number } | null> => {
    const p = planLock.then(async () => {
      if (failure || signal?.aborted) return null;
      const c = await planner.next();
      if (!c) return null;
      if (options.onProgress && counts(c)) {
        allocatedDone += c.sectors;
        options.onProgress({ done: allocatedDone * SECTOR, total: allocatedTotal * SECTOR });
      }
      return { chunk: c, index: index++ };
    });
    planLock = p.catch(() => undefined);
    return p;
  };

  const worker = async (): Promise<void> => {
    const buf = new Uint8Array(bufBytes);
    for (;;) {
      const next = await nextChunk();
      if (!next || failure) return;
      await copy(next.chunk, next.index, buf);
    }
  };
  const workers: Promise<void>[] = [];
  for (let i = 0; i < st.parallel; i++) {
    workers.push(
      worker().catch((error: unknown) => {
        failure ??= { error };
      }),
    );
  }
  await Promise.all(workers);
  if (failure) throw (failure as { error: unknown }).error;
  if (signal?.aborted) throw new ConvertAbortedError();
}

/** Sectors [from, to) of a request's buffer, holding data or zeros. */
interface SectorRun {
  data: boolean;
  from: number;
  to: number;
}

/** 32-bit words in a sector. */
const SECTOR_WORDS = SECTOR / 4;

/** A buffer's words for the sparse detection (buffers are allocated whole, so 4-byte aligned). */
function sectorWords(buf: Uint8Array): Uint32Array {
  return new Uint32Array(buf.buffer, buf.byteOffset, buf.length >>> 2);
}

function isZeroSector(words: Uint32Array, sector: number): boolean {
  for (let w = sector * SECTOR_WORDS, end = w + SECTOR_WORDS; w < end; w++) if (words[w] !== 0) return false;
  return true;
}

/**
 * Copies `source` (or several sources, concatenated) to `target`: a raw Storage (bytes, sparse)
 * or an Image opened writable (see convertToImage).
 */
export async function convert(source: Image | Image[], target: Storage | Image, options: ConvertOptions = {}): Promise<void> {
  if (options.copyRange && options.compress) throw new UsageError('Cannot enable copy offloading when -c is used');
  if (options.copyRange && options.salvage) throw new UsageError('Cannot use copy offloading in salvaging mode');
  if (target instanceof Image) return convertToImage(source, target, options);
  return convertToStorage(source, target, options);
}

/**
 * Copies `source` (or several sources, concatenated) to `target` as raw bytes. The target ends up
 * exactly the source's size rounded up to 512 bytes (as qemu-img sizes it in sectors).
 */
async function convertToStorage(source: Image | Image[], storage: Storage, options: ConvertOptions): Promise<void> {
  const target = throttledStorage(storage, options.rateLimit, options.signal);
  if (options.compress) throw new UsageError('Compression not supported for this file format');
  if (options.targetHasBacking) throw new UsageError("Backing file not supported for file format 'raw'");
  const st = await setup(source, options);
  const { parts, totalSectors, bufSectors, minSparseSectors, alignment } = st;
  const totalBytes = totalSectors * SECTOR;

  let targetZero: boolean;
  if (options.existing) {
    const size = await target.size();
    if (size < totalBytes) throw new UsageError('output file is smaller than input file');
    targetZero = options.targetIsZero ?? false;
  } else {
    await target.truncate(0);
    await target.truncate(totalBytes);
    targetZero = true;
  }
  // With sparse detection off, zero ranges are written as zero bytes (a fully allocated target).
  const zeroAsData = minSparseSectors === 0;

  const zeroRange = async (offset: number, length: number): Promise<void> => {
    if (targetZero || length === 0) return;
    await writeZeroesTo(target, offset, length);
  };

  const views = new WeakMap<Uint8Array, Uint32Array>();
  const salvage = salvageHooks(options);
  let offload = options.copyRange ?? false;
  const copyTarget: CopyRangeTarget = {
    file: storage,
    write: (offset, data) => storage.write(data, offset),
    writeZeroes: (offset, length) => writeZeroesTo(storage, offset, length),
  };
  await runCopy(st, options, () => new ChunkPlanner(parts, totalSectors, bufSectors, zeroAsData, DEFAULT_MODE, salvage), zeroAsData, async (chunk, _index, buf) => {
    let words = views.get(buf);
    if (!words) views.set(buf, (words = sectorWords(buf)));
    const { sector, sectors } = chunk;
    if (offload && chunk.status === 'data') {
      if (await copyChunk(parts, chunk, copyTarget)) return;
      offload = false;
    }
    if (chunk.status === 'zero' && !zeroAsData) {
      await zeroRange(sector * SECTOR, sectors * SECTOR);
      return;
    }
    if (chunk.status === 'data') await readSectors(parts, buf, sector, sectors, salvage);
    else buf.fill(0, 0, sectors * SECTOR);
    if (zeroAsData) {
      await target.write(buf.subarray(0, sectors * SECTOR), sector * SECTOR);
      return;
    }
    for (let i = 0; i < sectors; ) {
      const run = classifyRunMin(words, i, sectors - i, minSparseSectors, sector + i, alignment);
      const offset = (sector + i) * SECTOR;
      if (run.data) await target.write(buf.subarray(i * SECTOR, (i + run.count) * SECTOR), offset);
      else await zeroRange(offset, run.count * SECTOR);
      i += run.count;
    }
  }, bufSectors * SECTOR);
}

/**
 * Copies into an Image opened writable, as qemu-img convert writes into a format driver:
 *
 * - The target must be at least as large as the sources together. Unless `existing`, it is taken
 *   as just created: it reads as zeros when it has no backing file (qemu-img's has_zero_init), so
 *   zero ranges are not written at all; otherwise (and with `existing` without `targetIsZero`, or
 *   with -S 0) they are written with writeZeroes (may unmap: zero clusters in qcow2).
 * - Writes go out in guest order (each request waits for the one before it) unless `outOfOrder`,
 *   so a qcow2 target's clusters lie in the file in guest order, as qemu-img lays them out.
 * - `compress`: every cluster compressed (in parallel; requests are whole clusters), all-zero
 *   clusters skipped like zero ranges.
 * - `targetHasBacking`: see the option.
 */
async function convertToImage(source: Image | Image[], image: Image, options: ConvertOptions): Promise<void> {
  const target = throttledImage(image, options.rateLimit, options.signal);
  if (target.readOnly) throw new UsageError(`${target.storage.name}: the target image is open read-only`);
  const compress = options.compress ?? false;
  const targetHasBacking = options.targetHasBacking ?? false;
  if (Array.isArray(source) && source.length > 1 && targetHasBacking) {
    throw new UsageError('Having a backing file for the target makes no sense when concatenating multiple input images');
  }
  if (targetHasBacking && options.targetIsZero) {
    throw new UsageError('Cannot use --target-is-zero when the destination image has a backing file');
  }
  if (compress && target.format !== 'qcow2') throw new UsageError('Compression not supported for this file format');
  const st = await setup(source, options);
  const { parts, totalSectors, minSparseSectors, alignment } = st;
  if (target.virtualSize < totalSectors * SECTOR) throw new UsageError('output file is smaller than input file');

  const targetInfo = target.format === 'qcow2' ? await target.info() : null;
  const clusterSize = targetInfo?.clusterSize ?? SECTOR;
  const clusterSectors = compress ? Math.max(1, clusterSize / SECTOR) : 0;
  // The unit the target allocates in: zero runs shorter than it inside data are written as zero
  // bytes with the data around them (the unit is allocated anyway; writing whole units spares the
  // engine a copy-on-write for each partial one). Same guest content and allocation as qemu-img.
  const allocUnit = targetInfo ? (targetInfo.formatSpecific?.extendedL2 ? clusterSize / 32 : clusterSize) / SECTOR : 1;
  // qemu-img's buffer is 2 MiB (one cluster when compressing; here 512 KiB of whole clusters, which
  // compress in parallel: the per-cluster outcome is the same, and less memory is in flight).
  let bufSectors = st.bufSectors;
  if (compress) {
    const want = options.bufferSize === undefined ? COMPRESS_BUFFER / SECTOR : bufSectors;
    bufSectors = Math.max(clusterSectors, want - (want % clusterSectors));
  }
  const zeroAsData = minSparseSectors === 0;
  let zeroInit: boolean;
  if (options.existing) zeroInit = options.targetIsZero ?? false;
  else zeroInit = !targetHasBacking && !zeroAsData;
  const mode: PlannerMode = {
    targetHasBacking,
    targetBackingSectors:
      targetHasBacking && !options.existing && target.backing ? Math.floor(target.backing.virtualSize / SECTOR) : -1,
    clusterSectors,
    unitSectors: targetInfo ? Math.floor(clusterSize / SECTOR) : 0,
  };

  const zeroRange = async (offset: number, length: number): Promise<void> => {
    if (zeroInit || length === 0) return;
    await target.writeZeroes(offset, length, { mayUnmap: true });
  };

  // The in-order rule: request i writes after request i - 1 has written.
  const ordered = !(options.outOfOrder ?? false);
  const written = new Map<number, () => void>();
  const waiting = new Map<number, Promise<void>>();
  let nextToWrite = 0;
  let broken = false;
  const turn = (index: number): Promise<void> => {
    if (!ordered || broken || index === nextToWrite) return Promise.resolve();
    let p = waiting.get(index);
    if (!p) {
      p = new Promise<void>((resolve) => written.set(index, resolve));
      waiting.set(index, p);
    }
    return p;
  };
  const done = (index: number): void => {
    if (!ordered) return;
    nextToWrite = index + 1;
    waiting.delete(index);
    const wake = written.get(index + 1);
    if (wake) {
      written.delete(index + 1);
      wake();
    }
  };
  // A waiter registered after its turn came: turn() checks nextToWrite first, so no wake-up is lost.
  /** After a failure nothing waits any more (the loops see the failure and stop). */
  const breakOrder = (): void => {
    broken = true;
    for (const wake of written.values()) wake();
    written.clear();
  };

  const views = new WeakMap<Uint8Array, Uint32Array>();
  /**
   * The data and zero runs of a data chunk read into buf (sparse detection), to be written by
   * writeChunk. Worked out before the chunk's turn to write comes, so that the writes go out
   * as soon as it does.
   */
  const sparseRuns = (chunk: Chunk, words: Uint32Array): SectorRun[] => {
    const { sector, sectors } = chunk;
    const runs: SectorRun[] = [];
    for (let i = 0; i < sectors; ) {
      const run = classifyRunMin(words, i, sectors - i, minSparseSectors, sector + i, alignment);
      runs.push({ data: run.data, from: i, to: i + run.count });
      i += run.count;
    }
    // A zero run between two data runs keeps only the whole allocation units inside it; its ragged
    // ends go with the data around them (those units are allocated by that data anyway).
    for (let k = 1; k + 1 < runs.length; k++) {
      const z = runs[k]!;
      if (z.data || !runs[k - 1]!.data || !runs[k + 1]!.data) continue;
      const zs = z.from + ((allocUnit - ((sector + z.from) % allocUnit)) % allocUnit);
      const ze = z.to - ((sector + z.to) % allocUnit);
      if (ze <= zs) {
        z.data = true;
      } else {
        runs[k - 1]!.to = zs;
        runs[k + 1]!.from = ze;
        z.from = zs;
        z.to = ze;
      }
    }
    return runs;
  };

  /**
   * Issues the chunk's writes (all of them before returning: the target queues them in call
   * order, which is what keeps guest order) and returns them to be awaited before buf is reused.
   */
  const writeChunk = (chunk: Chunk, buf: Uint8Array, runs: SectorRun[] | null): Promise<void>[] => {
    const { sector, sectors, status } = chunk;
    const base = sector * SECTOR;
    const bytes = sectors * SECTOR;
    if (status === 'backing') return [];
    if (status === 'zero' && !zeroAsData) return [zeroRange(base, bytes)];
    // Data (or, with sparse detection off, zeros) written whole; otherwise its runs.
    if (!runs) return [target.write(base, buf.subarray(0, bytes))];
    const ops: Promise<void>[] = [];
    let dataFrom = -1;
    for (let k = 0; k < runs.length; k++) {
      const r = runs[k]!;
      if (r.data) {
        if (dataFrom < 0) dataFrom = r.from;
        if (k + 1 < runs.length && runs[k + 1]!.data) continue;
        ops.push(target.write(base + dataFrom * SECTOR, buf.subarray(dataFrom * SECTOR, r.to * SECTOR)));
        dataFrom = -1;
      } else {
        ops.push(zeroRange(base + r.from * SECTOR, (r.to - r.from) * SECTOR));
      }
    }
    return ops;
  };

  const salvage = salvageHooks(options);
  let offload = options.copyRange ?? false;
  const copyTarget: CopyRangeTarget = {
    file: image.format === 'raw' ? image.storage : null,
    write: (offset, data) => image.write(offset, data),
    writeZeroes: (offset, length) => image.writeZeroes(offset, length, { mayUnmap: false }),
  };
  try {
    await runCopy(st, options, () => new ChunkPlanner(parts, totalSectors, bufSectors, zeroAsData, mode, salvage), zeroAsData, async (chunk, index, buf) => {
      let words = views.get(buf);
      if (!words) views.set(buf, (words = sectorWords(buf)));
      try {
        const tryOffload = offload && chunk.status === 'data';
        const sparse = chunk.status === 'data' && !zeroAsData && !compress;
        if (chunk.status === 'data' && !tryOffload) await readSectors(parts, buf, chunk.sector, chunk.sectors, salvage);
        else if (chunk.status === 'zero' && zeroAsData) buf.fill(0, 0, chunk.sectors * SECTOR);
        let runs = sparse && !tryOffload ? sparseRuns(chunk, words) : null;
        await turn(index);
        if (broken) return;
        if (tryOffload) {
          if (await copyChunk(parts, chunk, copyTarget)) {
            done(index);
            return;
          }
          // As qemu-img: offloading is off from here on; this request is copied the ordinary way.
          offload = false;
          await readSectors(parts, buf, chunk.sector, chunk.sectors, salvage);
          if (sparse) runs = sparseRuns(chunk, words);
        }
        if (compress && (chunk.status === 'data' || (chunk.status === 'zero' && zeroAsData))) {
          // Queued in order now, compressed in parallel: the next request may queue its clusters
          // while these still compress (the writes keep guest order, see Qcow2Writer.writeCompressed).
          const data = buf.subarray(0, chunk.sectors * SECTOR);
          const ops = issueCompressedRuns(target, chunk.sector * SECTOR, data, clusterSize, zeroRange, !zeroAsData);
          done(index);
          await settleAll(ops);
          return;
        }
        const ops = writeChunk(chunk, buf, runs);
        done(index);
        await settleAll(ops);
      } catch (e) {
        breakOrder();
        throw e;
      }
    }, bufSectors * SECTOR);
  } finally {
    breakOrder();
  }
}

/** Zeros into a raw storage: its writeZeroes (punching a hole) where it has one, else zero bytes. */
async function writeZeroesTo(storage: Storage, offset: number, length: number): Promise<void> {
  if (storage.writeZeroes) await storage.writeZeroes(offset, length);
  else await writeZeroBytes((b, o) => storage.write(b, o), offset, length);
}

/** The storage with its writes admitted by a WriteThrottle (itself when there is no limit). */
function throttledStorage(storage: Storage, rate: number | undefined, signal: AbortSignal | undefined): Storage {
  if (!rate) return storage;
  const t = new WriteThrottle(rate, { signal });
  const writeZeroes = storage.writeZeroes;
  const wrapped: Storage = {
    name: storage.name,
    readOnly: storage.readOnly,
    read: (buf, offset) => storage.read(buf, offset),
    write: (buf, offset) => t.run(buf.length, () => storage.write(buf, offset)),
    size: () => storage.size(),
    truncate: (size) => storage.truncate(size),
    flush: () => storage.flush(),
    close: () => storage.close(),
  };
  if (writeZeroes) wrapped.writeZeroes = (offset, length) => t.run(length, () => writeZeroes.call(storage, offset, length));
  return wrapped;
}

/** What convertToImage calls on its target; writes admitted by a WriteThrottle when there is a limit. */
type ImageTarget = Pick<Image, 'write' | 'writeZeroes' | 'writeCompressed' | 'readOnly' | 'format' | 'info' | 'virtualSize' | 'backing' | 'storage'>;

function throttledImage(image: Image, rate: number | undefined, signal: AbortSignal | undefined): ImageTarget {
  if (!rate) return image;
  const t = new WriteThrottle(rate, { signal });
  return {
    write: (offset, data) => t.run(data.length, () => image.write(offset, data)),
    writeZeroes: (offset, length, opts) => t.run(length, () => image.writeZeroes(offset, length, opts)),
    writeCompressed: (offset, data) => t.run(data.length, () => image.writeCompressed(offset, data)),
    get readOnly() { return image.readOnly; },
    get format() { return image.format; },
    info: () => image.info(),
    get virtualSize() { return image.virtualSize; },
    get backing() { return image.backing; },
    get storage() { return image.storage; },
  };
}

/** Offloads a data request (see copyRange), source by source; false when some part could not be offloaded. */
async function copyChunk(parts: SourcePart[], chunk: Chunk, target: CopyRangeTarget): Promise<boolean> {
  let pos = 0;
  while (pos < chunk.sectors) {
    const s = chunk.sector + pos;
    const part = parts.find((p) => s < p.start + p.sectors)!;
    const n = Math.min(chunk.sectors - pos, part.start + part.sectors - s);
    if (!(await copyRange(part.image, (s - part.start) * SECTOR, n * SECTOR, target, s * SECTOR))) return false;
    pos += n;
  }
  return true;
}

/**
 * Queues whole clusters compressed, run by run of non-zero clusters (each run's clusters compress
 * in parallel inside the engine); with `skipZero`, all-zero clusters are zero ranges instead.
 * Every operation is issued before this returns (so in order with the caller's other requests);
 * the caller keeps `data` untouched until they all settle.
 */
function issueCompressedRuns(
  target: ImageTarget, base: number, data: Uint8Array, clusterSize: number,
  zeroRange: (offset: number, length: number) => Promise<void>, skipZero: boolean,
): Promise<void>[] {
  const ops: Promise<void>[] = [];
  let pos = 0;
  while (pos < data.length) {
    const zero = skipZero && isZero(data.subarray(pos, Math.min(data.length, pos + clusterSize)));
    let end = pos + clusterSize;
    while (end < data.length && (skipZero && isZero(data.subarray(end, Math.min(data.length, end + clusterSize)))) === zero) {
      end += clusterSize;
    }
    end = Math.min(end, data.length);
    ops.push(zero ? zeroRange(base + pos, end - pos) : target.writeCompressed(base + pos, data.subarray(pos, end)));
    pos = end;
  }
  return ops;
}
