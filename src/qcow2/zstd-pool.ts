// A small pool of worker threads running WebAssembly zstd (zstd-worker.ts), so that
// compressing many clusters uses every core. Workers start lazily, one per core at most,
// and are unref'd whenever they have nothing in flight, so they never keep the process alive.

import { existsSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { Worker } from 'node:worker_threads';
import { FormatError, QimgError } from '../errors.js';
import type { ZstdRequest, ZstdResponse } from './zstd-protocol.js';

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
