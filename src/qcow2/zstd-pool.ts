// A small pool of worker threads running WebAssembly zstd (zstd-worker.ts), so that
// compressing many clusters uses every core. Workers start lazily, one per core at most,
// and are unref'd whenever they have nothing in flight, so they never keep the process alive.

import { existsSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { Worker } from 'node:worker_threads';
import { FormatError, QimgError } from '../errors.js';
import { zstdRoom, type ZstdBatchRequest, type ZstdBatchResponse, type ZstdRequest, type ZstdResponse } from './zstd-protocol.js';

interface Job {
  resolve(data: ArrayBuffer | null): void;
  reject(err: Error): void;
}

interface Slot {
  worker: Worker;
  jobs: Map<number, Job>;
}

export interface ZstdPoolOptions {
  /** The built worker script; defaults to zstd-worker.js next to this module's file. */
  workerPath?: string;
  /** Defaults to os.availableParallelism(). */
  threads?: number;
}

export class ZstdWorkerPool {
  readonly workerPath: string;
  readonly threads: number;
  private readonly slots: Slot[] = [];
  private nextId = 1;

  constructor(options: ZstdPoolOptions & { workerPath: string }) {
    this.workerPath = options.workerPath;
    this.threads = Math.max(1, options.threads ?? availableParallelism());
  }

  decompress(src: Uint8Array, length: number): Promise<ArrayBuffer> {
    // Copy into a fresh ArrayBuffer, which is then transferred: the caller's buffer stays
    // usable. (Not src.slice(): on a Buffer that is a view of the same, often pooled, memory.)
    const copy = new Uint8Array(src);
    return this.run({ id: 0, op: 'decompress', src: copy.buffer, length }) as Promise<ArrayBuffer>;
  }

  compress(src: Uint8Array, maxLength: number, level: number): Promise<ArrayBuffer | null> {
    const copy = new Uint8Array(src);
    return this.run({ id: 0, op: 'compress', src: copy.buffer, length: maxLength, level });
  }

  /** Workers currently running. */
  get size(): number {
    return this.slots.length;
  }

  /** Stops every worker; the pool starts new ones if used again. */
  async close(): Promise<void> {
    const slots = this.slots.splice(0);
    await Promise.all(slots.map((s) => s.worker.terminate()));
  }

  private run(req: ZstdRequest): Promise<ArrayBuffer | null> {
    const slot = this.pick();
    const id = this.nextId++;
    req.id = id;
    return new Promise((resolve, reject) => {
      slot.jobs.set(id, { resolve, reject });
      if (slot.jobs.size === 1) slot.worker.ref();
      slot.worker.postMessage(req, [req.src]);
    });
  }

  /** The least busy worker, starting another while fewer than `threads` exist and all are busy. */
  private pick(): Slot {
    let best: Slot | undefined;
    for (const s of this.slots) if (!best || s.jobs.size < best.jobs.size) best = s;
    if (best && (best.jobs.size === 0 || this.slots.length >= this.threads)) return best;
    return this.spawn();
  }

  private spawn(): Slot {
    const worker = new Worker(this.workerPath);
    const slot: Slot = { worker, jobs: new Map() };
    worker.unref();
    worker.on('message', (res: ZstdResponse) => {
      const job = slot.jobs.get(res.id);
      if (!job) return;
      slot.jobs.delete(res.id);
      if (slot.jobs.size === 0) worker.unref();
      if (res.ok) job.resolve(res.data);
      else job.reject(res.name === 'FormatError' ? new FormatError(res.message, res.data) : new Error(res.message));
    });
    const fail = (err: Error) => {
      const i = this.slots.indexOf(slot);
      if (i >= 0) this.slots.splice(i, 1);
      const jobs = [...slot.jobs.values()];
      slot.jobs.clear();
      for (const job of jobs) job.reject(new QimgError('IO', `zstd worker failed: ${err.message}`, {}, { cause: err }));
    };
    worker.on('error', fail);
    worker.on('exit', (code) => fail(new Error(`exited with code ${code}`)));
    this.slots.push(slot);
    return slot;
  }
}

// ---------------------------------------------------------------- native batches

interface NativeJob {
  src: Uint8Array;
  maxLength: number;
  level: number;
  resolve(frame: Uint8Array | null): void;
  reject(err: Error): void;
}

/** One batch buffer pair of a worker; `jobs` is non-null while a batch in it is being compressed. */
interface Lane {
  input: SharedArrayBuffer | null;
  output: SharedArrayBuffer | null;
  jobs: NativeJob[] | null;
}

interface NativeSlot {
  worker: Worker;
  lanes: Lane[];
  busy: number;
}

export interface ZstdBatchPoolOptions {
  workerPath: string;
  /** What the workers compress with: the system libzstd (koffi) or the WebAssembly build. */
  engine: 'native' | 'wasm';
  /** Workers; defaults to os.availableParallelism(). */
  threads?: number;
  /** Most input bytes in one message (at least one cluster goes in each); default 256 KiB. */
  batchBytes?: number;
  /** Batches one worker holds at once (the next one waits in its buffers while it compresses); default 2. */
  lanes?: number;
  /**
   * A synchronous compressor for this thread (the frame's length or -(ZSTD error code)): when every
   * worker lane is busy, this thread compresses queued jobs too, one per event-loop turn, so that
   * it lends its idle time instead of another worker's ~10 MiB.
   */
  inline?: (dst: Uint8Array, src: Uint8Array, level: number) => number;
}

/**
 * Compression in worker threads (zstd-worker.ts with workerData.engine), by the system libzstd
 * or the WebAssembly build, each worker with one reused context, on batches of clusters: the main thread only
 * copies each cluster into a shared buffer, posts one message per batch and copies each frame out
 * (koffi's async calls cost ~28 us of main-thread time per cluster and shared the libuv pool with
 * file I/O; see bench/codecs.mjs). Requests made in one synchronous run are batched together
 * (dispatch waits for a microtask); the buffers are reused, so memory stays at a few MiB per
 * worker. Workers are unref'd while they have no batch, so they never keep the process alive.
 */
export class ZstdBatchPool {
  readonly workerPath: string;
  readonly engine: 'native' | 'wasm';
  readonly threads: number;
  private readonly batchBytes: number;
  private readonly laneCount: number;
  private readonly slots: NativeSlot[] = [];
  private readonly queue: NativeJob[] = [];
  private head = 0;
  private scheduled = false;
  private readonly inline: ZstdBatchPoolOptions['inline'] | null;
  private inlineScheduled = false;
  private inlineScratch: Uint8Array | null = null;
  /** Set when a worker could not load libzstd: every later request fails at once. */
  private broken: Error | null = null;

  constructor(options: ZstdBatchPoolOptions) {
    this.workerPath = options.workerPath;
    this.engine = options.engine;
    this.threads = Math.max(1, options.threads ?? availableParallelism());
    this.batchBytes = Math.max(1, options.batchBytes ?? 256 * 1024);
    this.laneCount = Math.max(1, options.lanes ?? 2);
    this.inline = options.inline ?? null;
  }

  /** One frame (ZSTD_compressCCtx at `level`), or null when it is longer than maxLength. */
  compress(src: Uint8Array, maxLength: number, level: number): Promise<Uint8Array | null> {
    if (this.broken) return Promise.reject(this.broken);
    return new Promise((resolve, reject) => {
      this.queue.push({ src, maxLength, level, resolve, reject });
      this.schedule();
    });
  }

  /** Workers currently running. */
  get size(): number {
    return this.slots.length;
  }

  /** Stops every worker once its batches are done; the pool starts new ones if used again. */
  async close(): Promise<void> {
    while (this.pending > 0 || this.slots.some((s) => s.busy > 0)) await new Promise((resolve) => setTimeout(resolve, 1));
    const slots = this.slots.splice(0);
    await Promise.all(slots.map((s) => s.worker.terminate()));
  }

  private schedule(): void {
    if (this.scheduled) return;
    this.scheduled = true;
    queueMicrotask(() => {
      this.scheduled = false;
      this.pump();
    });
  }

  private get pending(): number {
    return this.queue.length - this.head;
  }

  /** Hands queued jobs to free lanes: split evenly over idle workers, else up to batchBytes per lane. */
  private pump(): void {
    while (this.pending > 0 && !this.broken) {
      const spawnable = this.threads - this.slots.length;
      let idle = 0;
      let slot: NativeSlot | undefined;
      for (const s of this.slots) {
        if (s.busy === 0) idle++;
        if (s.busy < this.laneCount && (!slot || s.busy < slot.busy)) slot = s;
      }
      if ((!slot || slot.busy > 0) && spawnable > 0) slot = this.spawn();
      if (!slot) {
        // Every lane busy: the next reply pumps again; meanwhile this thread may take one.
        if (this.inline && !this.inlineScheduled) {
          this.inlineScheduled = true;
          setImmediate(() => this.runInline());
        }
        return;
      }
      // Idle workers share what is queued (a request's clusters all in one worker would wait for
      // each other); a busy worker's spare lane takes a full batch.
      const share = slot.busy === 0 ? Math.ceil(this.pending / (idle + spawnable)) : Infinity;
      this.post(slot, share);
    }
  }

  /** One queued job compressed in this thread (after the I/O callbacks of this turn). */
  private runInline(): void {
    this.inlineScheduled = false;
    if (this.pending === 0 || this.broken || !this.inline) return;
    const job = this.queue[this.head]!;
    this.queue[this.head++] = undefined as unknown as NativeJob;
    const room = zstdRoom(job.src.length);
    if (!this.inlineScratch || this.inlineScratch.length < room) this.inlineScratch = new Uint8Array(room);
    try {
      const n = this.inline(this.inlineScratch.subarray(0, room), job.src, job.level);
      if (n >= 0 && n <= job.maxLength) job.resolve(this.inlineScratch.slice(0, n));
      else if (n >= 0 || n === -70) job.resolve(null);
      else job.reject(new QimgError('IO', `zstd compression failed (libzstd error ${-n})`, { zstdError: -n }));
    } catch (err) {
      job.reject(err instanceof Error ? err : new Error(String(err)));
    }
    this.pump();
  }

  private post(slot: NativeSlot, maxJobs: number): void {
    const lane = slot.lanes.find((l) => l.jobs === null)!;
    const jobs: NativeJob[] = [];
    let inBytes = 0;
    let outBytes = 0;
    const level = this.queue[this.head]!.level;
    while (this.pending > 0 && jobs.length < maxJobs) {
      const job = this.queue[this.head]!;
      if (jobs.length > 0 && (inBytes + job.src.length > this.batchBytes || job.level !== level)) break;
      this.queue[this.head++] = undefined as unknown as NativeJob;
      jobs.push(job);
      inBytes += job.src.length;
      outBytes += zstdRoom(job.src.length);
    }
    if (this.head > 1024 && this.head * 2 > this.queue.length) {
      this.queue.splice(0, this.head);
      this.head = 0;
    }
    if (!lane.input || lane.input.byteLength < inBytes) lane.input = new SharedArrayBuffer(Math.max(inBytes, this.batchBytes));
    if (!lane.output || lane.output.byteLength < outBytes) lane.output = new SharedArrayBuffer(Math.max(outBytes, zstdRoom(this.batchBytes)));
    const input = new Uint8Array(lane.input);
    let pos = 0;
    for (const job of jobs) {
      input.set(job.src, pos);
      pos += job.src.length;
    }
    lane.jobs = jobs;
    const index = slot.lanes.indexOf(lane);
    if (slot.busy++ === 0) slot.worker.ref();
    const req: ZstdBatchRequest = { op: 'compress-batch', lane: index, input: lane.input, output: lane.output, lengths: jobs.map((j) => j.src.length), level };
    slot.worker.postMessage(req);
  }

  private spawn(): NativeSlot {
    // A small young generation: a worker only makes small, short-lived objects (each worker's heap
    // is part of the peak RSS of a convert).
    const worker = new Worker(this.workerPath, {
      workerData: { engine: this.engine },
      resourceLimits: { maxYoungGenerationSizeMb: 2 },
    });
    const lanes: Lane[] = Array.from({ length: this.laneCount }, () => ({ input: null, output: null, jobs: null }));
    const slot: NativeSlot = { worker, lanes, busy: 0 };
    worker.unref();
    worker.on('message', (res: ZstdBatchResponse) => {
      const lane = lanes[res.lane];
      const jobs = lane?.jobs;
      if (!lane || !jobs) return;
      lane.jobs = null;
      if (--slot.busy === 0) worker.unref();
      if (!res.ok) {
        this.broken ??= new QimgError('IO', `zstd worker: ${res.message}`);
        this.failAll(jobs, this.broken);
        return;
      }
      let outPos = 0;
      for (let k = 0; k < jobs.length; k++) {
        const job = jobs[k]!;
        const n = res.sizes[k]!;
        if (n >= 0 && n <= job.maxLength) job.resolve(new Uint8Array(lane.output!, outPos, n).slice());
        else if (n >= 0 || n === -70) job.resolve(null); // -70: ZSTD_error_dstSize_tooSmall
        else job.reject(new QimgError('IO', `zstd compression failed (libzstd error ${-n})`, { zstdError: -n }));
        outPos += zstdRoom(job.src.length);
      }
      this.pump();
    });
    const fail = (err: Error) => {
      const i = this.slots.indexOf(slot);
      if (i < 0) return;
      this.slots.splice(i, 1);
      // No restart (a worker that cannot start would fail again and again): the codec goes on without the pool.
      this.broken ??= new QimgError('IO', `zstd worker failed: ${err.message}`, {}, { cause: err });
      for (const lane of lanes) {
        if (lane.jobs) this.failAll(lane.jobs, this.broken);
        lane.jobs = null;
      }
      slot.busy = 0;
    };
    worker.on('error', fail);
    worker.on('exit', (code) => fail(new Error(`exited with code ${code}`)));
    this.slots.push(slot);
    return slot;
  }

  private failAll(jobs: NativeJob[], err: Error): void {
    for (const job of jobs) job.reject(err);
    if (this.broken) {
      while (this.pending > 0) this.queue[this.head++]!.reject(this.broken);
      this.queue.length = 0;
      this.head = 0;
    }
  }
}

export function availableParallelism(): number {
  return typeof os.availableParallelism === 'function' ? os.availableParallelism() : os.cpus().length || 1;
}

/** Directory of the running module file: dist/ when bundled (ESM or CJS), src/qcow2 under vitest. */
function moduleDir(): string | undefined {
  try {
    if (typeof __filename === 'string' && __filename) return path.dirname(__filename);
  } catch {
    // not CommonJS
  }
  try {
    return path.dirname(fileURLToPath(import.meta.url));
  } catch {
    return undefined;
  }
}

/** zstd-worker.js next to this module, or undefined when it is not there (running TS sources). */
export function defaultWorkerPath(): string | undefined {
  const dir = moduleDir();
  if (!dir) return undefined;
  const file = path.join(dir, 'zstd-worker.js');
  return existsSync(file) ? file : undefined;
}
