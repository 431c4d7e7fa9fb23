// Block-status-driven copy of one image (or several, concatenated) to a raw target storage, as
// qemu-img convert -O raw does it: zero and unallocated ranges are never read and become holes,
// data is read in large requests with several in flight, and zero runs inside data are not written.

import type { Image } from '../image.js';
import type { Storage } from '../io/storage.js';
import { writeZeroBytes } from '../io/zero.js';
import { UsageError } from '../errors.js';

const SECTOR = 512;
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
}

type ChunkStatus = 'data' | 'zero';

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
  ) {}

  async next(): Promise<Chunk | null> {
    const sector = this.sector;
    if (sector >= this.totalSectors) return null;
    let n = Math.min(this.totalSectors - sector, REQUEST_MAX_SECTORS);
    if (this.nextStatus <= sector) {
      const part = this.parts.find((p) => sector < p.start + p.sectors)!;
      const local = sector - part.start;
      const want = Math.min(n, part.sectors - local);
      // The image's end may not be sector aligned: the last sector's tail reads as zeros.
      const offset = local * SECTOR;
      const bytes = Math.min(want * SECTOR, part.image.virtualSize - offset);
      let zero: boolean;
      if (bytes > 0) {
        const st = await part.image.blockStatusAt(offset, bytes);
        n = Math.ceil(st.length / SECTOR);
        zero = st.zero;
      } else {
        n = want;
        zero = true;
      }
      const tail = (local + n) % part.alignSectors;
      if (n > tail) n -= tail;
      this.status = zero ? 'zero' : 'data';
      this.nextStatus = sector + n;
    }
    n = Math.min(n, this.nextStatus - sector);
    if (this.status === 'data' || this.zeroAsData) n = Math.min(n, this.bufSectors);
    this.sector = sector + n;
    return { sector, sectors: n, status: this.status };
  }
}

/**
 * Sector runs of a buffer as qemu-img's sparse detection sees them: returns whether the run at
 * the start holds data and how many sectors it spans. Run ends are moved to `alignment`
 * boundaries (data rounded up, zeros rounded down) so writes stay aligned.
 */
function classifyRun(
  isZeroSector: (i: number) => boolean, first: number, n: number, sectorNum: number, alignment: number,
): { data: boolean; count: number } {
  if (n <= 0) return { data: false, count: 0 };
  let zero = isZeroSector(first);
  let i = 1;
  while (i < n && isZeroSector(first + i) === zero) i++;
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
  isZeroSector: (i: number) => boolean, first: number, n: number, min: number, sectorNum: number, alignment: number,
): { data: boolean; count: number } {
  if (n < min) min = n;
  const head = classifyRun(isZeroSector, first, n, sectorNum, alignment);
  if (!head.data) return head;
  let used = head.count;
  let checked = head.count;
  while (checked < n) {
    const run = classifyRun(isZeroSector, first + checked, n - checked, sectorNum + checked, alignment);
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

/**
 * Copies `source` (or several sources, concatenated) to `target` as raw bytes. The target ends up
 * exactly the source's size rounded up to 512 bytes (as qemu-img sizes it in sectors).
 */
export async function convert(source: Image | Image[], target: Storage, options: ConvertOptions = {}): Promise<void> {
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

  let allocatedTotal = 0;
  if (options.onProgress) {
    const prepass = new ChunkPlanner(parts, totalSectors, bufSectors, zeroAsData);
    for (let c = await prepass.next(); c; c = await prepass.next()) {
      if (c.status === 'data' || zeroAsData) allocatedTotal += c.sectors;
    }
  }

  const planner = new ChunkPlanner(parts, totalSectors, bufSectors, zeroAsData);
  let planLock: Promise<unknown> = Promise.resolve();
  let allocatedDone = 0;
  let failure: { error: unknown } | null = null;

  const nextChunk = (): Promise<Chunk | null> => {
    const p = planLock.then(async () => {
      if (failure) return null;
      const c = await planner.next();
      if (c && options.onProgress && (c.status === 'data' || zeroAsData)) {
        allocatedDone += c.sectors;
        options.onProgress({ done: allocatedDone * SECTOR, total: allocatedTotal * SECTOR });
      }
      return c;
    });
    planLock = p.catch(() => undefined);
    return p;
  };

  const zeroRange = async (offset: number, length: number): Promise<void> => {
    if (targetZero || length === 0) return;
    if (target.writeZeroes) await target.writeZeroes(offset, length);
    else await writeZeroBytes((b, o) => target.write(b, o), offset, length);
  };

  const readChunk = async (buf: Uint8Array, sector: number, sectors: number): Promise<void> => {
    // A chunk never spans two sources (block status stops at each source's end).
    const part = parts.find((p) => sector < p.start + p.sectors)!;
    const offset = (sector - part.start) * SECTOR;
    const inImage = Math.max(0, Math.min(sectors * SECTOR, part.image.virtualSize - offset));
    if (inImage > 0) await part.image.readInto(buf.subarray(0, inImage), offset);
    buf.fill(0, inImage, sectors * SECTOR);
  };

  const worker = async (): Promise<void> => {
    const buf = new Uint8Array(bufSectors * SECTOR);
    const words = new Uint32Array(buf.buffer, buf.byteOffset, buf.length >>> 2);
    const isZeroSector = (i: number): boolean => {
      for (let w = i * (SECTOR / 4), end = w + SECTOR / 4; w < end; w++) if (words[w] !== 0) return false;
      return true;
    };
    for (;;) {
      const chunk = await nextChunk();
      if (!chunk || failure) return;
      const { sector, sectors } = chunk;
      if (chunk.status === 'zero' && !zeroAsData) {
        await zeroRange(sector * SECTOR, sectors * SECTOR);
        continue;
      }
      if (chunk.status === 'data') await readChunk(buf, sector, sectors);
      else buf.fill(0, 0, sectors * SECTOR);
      if (zeroAsData) {
        await target.write(buf.subarray(0, sectors * SECTOR), sector * SECTOR);
        continue;
      }
      for (let i = 0; i < sectors; ) {
        const run = classifyRunMin(isZeroSector, i, sectors - i, minSparseSectors, sector + i, alignment);
        const offset = (sector + i) * SECTOR;
        if (run.data) await target.write(buf.subarray(i * SECTOR, (i + run.count) * SECTOR), offset);
        else await zeroRange(offset, run.count * SECTOR);
        i += run.count;
      }
    }
  };

  const workers: Promise<void>[] = [];
  for (let i = 0; i < parallel; i++) {
    workers.push(
      worker().catch((error: unknown) => {
        failure ??= { error };
      }),
    );
  }
  await Promise.all(workers);
  if (failure) throw (failure as { error: unknown }).error;
}
