// Image creation, format-neutral: the checks and size defaulting of QEMU's bdrv_img_create, the
// "Formatting ..." line qemu-img prints, then the format's own creation (src/qcow2/create.ts,
// src/raw/create.ts).

import type { Storage, StorageGate } from './io/storage.js';
import { FileStorage } from './io/file.js';
import { fileGate } from './io/gate.js';
import { CREATE_PERMS } from './io/lock.js';
import { openImage } from './open.js';
import type { Image, ImageFormat } from './image.js';
import { QimgError, UnsupportedError, UsageError } from './errors.js';
import type { Qcow2Header } from './qcow2/header.js';
import {
  LayoutPlanner, createdHeader, planQcow2, writeLayout, type Qcow2Plan, type Qcow2Preallocation,
} from './qcow2/create.js';
import { createRaw, validateRawPreallocation } from './raw/create.js';

export interface CreateImageOptions {
  format: ImageFormat;
  /** Virtual size in bytes; defaults to the backing file's size. Rounded up to 512 like QEMU. */
  size?: number;
  backingFile?: string;
  backingFormat?: string;
  /** Opens the backing file and creates the data file (default: the permissive file gate). */
  gate?: StorageGate;
  /** qemu-img create -u: do not open the backing file (a size must then be given). */
  unsafe?: boolean;
  /** Take QEMU's image locks on the files opened and created (default true). */
  lock?: boolean;
  // qcow2 options (undefined = not given: qemu-img's line then shows the default or nothing).
  compat?: '0.10' | '1.1';
  clusterSize?: number;
  refcountBits?: number;
  lazyRefcounts?: boolean;
  extendedL2?: boolean;
  compressionType?: 'zlib' | 'zstd';
  preallocation?: Qcow2Preallocation;
  dataFile?: string;
  dataFileRaw?: boolean;
  // file-protocol options: accepted and shown in the Formatting line; no effect here (QEMU itself
  // ignores failures to apply them).
  nocow?: boolean;
  extentSizeHint?: number;
  /**
   * Called with qemu-img's "Formatting ..." line at the moment qemu-img prints it: after the backing
   * checks and size defaulting, before the format's own validation (whose errors come after it).
   */
  onFormatting?: (line: string) => void;
  /**
   * Option values as the user typed them (by qemu option name), shown in the Formatting line in
   * place of the parsed values: qemu-img echoes `lazy_refcounts=yes` or `compat=v3` as given
   * (sizes it prints normalised).
   */
  optionText?: Record<string, string>;
}

export interface CreateImageResult {
  format: ImageFormat;
  filename: string;
  /** The virtual size as given or taken from the backing file (before QEMU's rounding to 512). */
  size: number;
  /** The size the image has (rounded up to a multiple of 512). */
  virtualSize: number;
  /** qemu-img's "Formatting ..." line (without newline). */
  formatting: string;
  /** qcow2: the header written. */
  header?: Qcow2Header;
  /** The image file's length after creation. */
  fileLength: number;
  dataFileLength?: number;
  /**
   * falloc preallocation: 'allocate' when the storage reserved the space itself (an `allocate`
   * capability), 'zeros' when zeros were written instead (posix_fallocate's own fallback).
   */
  fallocMethod?: 'allocate' | 'zeros';
}

type OptionKind = 'string' | 'size' | 'bool' | 'number';
interface OptionDesc {
  name: string;
  kind: OptionKind;
  default?: string;
  get: (o: CreateImageOptions) => string | number | boolean | undefined;
}

/** qcow2_create_opts' order (encryption options omitted: never set), then file-posix's extra ones. */
const QCOW2_DESCS: OptionDesc[] = [
  { name: 'cluster_size', kind: 'size', default: '65536', get: (o) => o.clusterSize },
  { name: 'extended_l2', kind: 'bool', default: 'off', get: (o) => o.extendedL2 },
  { name: 'preallocation', kind: 'string', get: (o) => o.preallocation },
  { name: 'compression_type', kind: 'string', default: 'zlib', get: (o) => o.compressionType },
  { name: 'size', kind: 'size', get: (o) => o.size },
  { name: 'compat', kind: 'string', get: (o) => o.compat },
  { name: 'backing_file', kind: 'string', get: (o) => o.backingFile },
  { name: 'backing_fmt', kind: 'string', get: (o) => o.backingFormat },
  { name: 'data_file', kind: 'string', get: (o) => o.dataFile },
  { name: 'data_file_raw', kind: 'bool', get: (o) => o.dataFileRaw },
  { name: 'lazy_refcounts', kind: 'bool', default: 'off', get: (o) => o.lazyRefcounts },
  { name: 'refcount_bits', kind: 'number', default: '16', get: (o) => o.refcountBits },
  { name: 'nocow', kind: 'bool', get: (o) => o.nocow },
  { name: 'extent_size_hint', kind: 'size', get: (o) => o.extentSizeHint },
];

/** raw_create_opts (size) then file-posix's. */
const RAW_DESCS: OptionDesc[] = [
  { name: 'size', kind: 'size', get: (o) => o.size },
  { name: 'nocow', kind: 'bool', get: (o) => o.nocow },
  { name: 'preallocation', kind: 'string', get: (o) => o.preallocation },
  { name: 'extent_size_hint', kind: 'size', get: (o) => o.extentSizeHint },
];

/** qemu_opts_print's escaping: a comma is doubled. */
function escaped(value: string): string {
  return value.replace(/,/g, ',,');
}

/**
 * qemu-img create's line `Formatting '<file>', fmt=<fmt> <options>` (bdrv_img_create +
 * qemu_opts_print): every option of the format's list in its order, given ones with their value,
 * others only when they have a default.
 */
export function formattingLine(filename: string, options: Omit<CreateImageOptions, 'onFormatting' | 'gate'>): string {
  const descs = options.format === 'qcow2' ? QCOW2_DESCS : RAW_DESCS;
  const parts: string[] = [];
  for (const d of descs) {
    const v = d.get(options as CreateImageOptions);
    const typed = options.optionText?.[d.name];
    if (typed !== undefined && v !== undefined && d.kind !== 'size') {
      parts.push(`${d.name}=${escaped(typed)}`);
      continue;
    }
    if (v === undefined) {
      if (d.default !== undefined) parts.push(`${d.name}=${d.default}`);
      continue;
    }
    if (d.kind === 'bool') parts.push(`${d.name}=${v ? 'on' : 'off'}`);
    else if (d.kind === 'string') parts.push(`${d.name}=${escaped(String(v))}`);
    else parts.push(`${d.name}=${v}`);
  }
  return `Formatting '${filename}', fmt=${options.format} ${parts.join(' ')}`;
}

/** Stands in for the image's storage as the base of relative backing names before it exists. */
function nameOnly(name: string): Storage {
  const refuse = (): never => {
    throw new UsageError(`'${name}' is not open`);
  };
  return {
    name,
    readOnly: true,
    read: refuse,
    write: refuse,
    size: refuse,
    truncate: refuse,
    flush: refuse,
    close: async () => undefined,
  };
}

function withHint(err: unknown, hint: string): unknown {
  if (err instanceof QimgError) {
    const e = new QimgError(err.code, err.message, { ...err.data, hint }, { cause: err });
    e.name = err.name;
    return e;
  }
  return err;
}

const SECTOR = 512;

/**
 * Creates an image like `qemu-img create`. `target` is a path (created or truncated) or a Storage
 * (written from offset 0 and truncated first; the caller keeps ownership and closes it).
 */
export async function createImage(target: string | Storage, options: CreateImageOptions): Promise<CreateImageResult> {
  const filename = typeof target === 'string' ? target : target.name;
  const format = options.format as string;
  if (format !== 'qcow2' && format !== 'raw') throw new UsageError(`Unknown file format '${format}'`);
  const gate = options.gate ?? fileGate;

  // bdrv_img_create's checks, in its order.
  if (options.backingFile !== undefined && format === 'raw') {
    throw new UsageError(`Backing file not supported for file format '${format}'`);
  }
  if (options.backingFormat !== undefined && format === 'raw') {
    throw new UsageError(`Backing file format not supported for file format '${format}'`);
  }
  const backingFile = options.backingFile;
  if (backingFile !== undefined) {
    if (backingFile === filename) {
      throw new UsageError('Error: Trying to create an image with the same filename as the backing file');
    }
    if (backingFile === '') throw new UsageError('Expected backing file name, got empty string');
  }
  let size = options.size;
  let backing: Image | undefined;
  try {
    if (backingFile !== undefined && !options.unsafe) {
      const relativeTo = typeof target === 'string' ? nameOnly(target) : target;
      let opened;
      try {
        const storage = await gate.open(backingFile, { readOnly: true, relativeTo, purpose: 'backing' });
        opened = await openImage(storage, {
          gate,
          // QEMU reads only the backing file's size here, with force-share and no I/O: no locks.
          lock: false,
          ...(options.backingFormat !== undefined ? { format: checkFormat(options.backingFormat) } : {}),
        });
      } catch (e) {
        throw withHint(e, 'Could not open backing image.\n');
      }
      backing = opened.image;
      if (options.backingFormat === undefined) {
        throw new UsageError('Backing file specified without backing format', { hint: `Detected format of ${backing.format}.` });
      }
      // bdrv_getlength: whole sectors.
      if (size === undefined) size = Math.ceil(backing.virtualSize / SECTOR) * SECTOR;
    } else if (backingFile !== undefined && options.backingFormat === undefined) {
      throw new UsageError('Backing file specified without backing format');
    }
    if (size === undefined) throw new UsageError('Image creation needs a size parameter');
    const lineOptions = { ...options, size };
    const formatting = formattingLine(filename, lineOptions);
    options.onFormatting?.(formatting);

    if (format === 'raw') {
      validateRawPreallocation(options.preallocation);
      const storage = typeof target === 'string' ? await createFile(target, options) : target;
      try {
        const r = await createRaw(storage, size, options.preallocation);
        await storage.flush();
        return {
          format: 'raw', filename, size, virtualSize: r.size, formatting, fileLength: r.size,
          ...(r.fallocMethod ? { fallocMethod: r.fallocMethod } : {}),
        };
      } finally {
        if (typeof target === 'string') await storage.close();
      }
    }

    // qcow2: validate and lay the image out before touching any file (QEMU creates the file first
    // and deletes it again on failure; not creating it at all leaves an existing file intact).
    const plan = planQcow2({
      size,
      compat: options.compat,
      clusterSize: options.clusterSize,
      refcountBits: options.refcountBits,
      lazyRefcounts: options.lazyRefcounts,
      extendedL2: options.extendedL2,
      compressionType: options.compressionType,
      preallocation: options.preallocation,
      backingFile: options.backingFile,
      backingFormat: options.backingFormat,
      dataFile: options.dataFile,
      dataFileRaw: options.dataFileRaw,
    });
    const planner = new LayoutPlanner(plan);
    try {
      planner.run();
    } catch (e) {
      if (e instanceof QimgError && e.data.errno === 'EFBIG') {
        throw new UsageError(`The image size is too large for file format 'qcow2' (try using a larger cluster size)`);
      }
      throw e;
    }
    const layout = planner.layout();
    const header = createdHeader(plan, layout, planner.reftableClusters);
    return await writeQcow2(target, filename, gate, plan, layout, header, { size, formatting, lock: options.lock !== false });
  } finally {
    await backing?.close().catch(() => undefined);
  }
}

/**
 * Creates (or truncates) an image file as QEMU's raw_co_create: locked for writing and sizing,
 * refusing others' resizes, before an existing file is truncated.
 */
function createFile(path: string, options: { lock?: boolean }): Promise<FileStorage> {
  return FileStorage.open(path, { readOnly: false, create: true, ...(options.lock !== false ? { locks: CREATE_PERMS } : {}) });
}

function checkFormat(name: string): ImageFormat {
  if (name === 'qcow2' || name === 'raw') return name;
  throw new UnsupportedError(`Unknown driver '${name}'`);
}

async function writeQcow2(
  target: string | Storage, filename: string, gate: StorageGate, plan: Qcow2Plan,
  layout: ReturnType<LayoutPlanner['layout']>, header: Qcow2Header,
  facts: { size: number; formatting: string; lock: boolean },
): Promise<CreateImageResult> {
  const storage = typeof target === 'string' ? await createFile(target, { lock: facts.lock }) : target;
  let data: Storage | undefined;
  try {
    if (typeof target !== 'string') await storage.truncate(0);
    if (plan.dataFile !== undefined) {
      // QEMU creates the data file by the name as given (bdrv_create_file), not relative to the image.
      data = await gate.open(plan.dataFile, {
        readOnly: false,
        create: true,
        purpose: 'data-file',
        ...(facts.lock ? { locks: CREATE_PERMS } : {}),
      });
      await data.truncate(0);
    }
    const fallocMethod = await writeLayout(layout, header, { image: storage, ...(data ? { data } : {}) });
    if (data) await data.flush();
    await storage.flush();
    return {
      format: 'qcow2',
      filename,
      size: facts.size,
      virtualSize: plan.size,
      formatting: facts.formatting,
      header,
      fileLength: layout.fileLength,
      ...(data ? { dataFileLength: layout.dataFileLength } : {}),
      ...(fallocMethod ? { fallocMethod } : {}),
    };
  } finally {
    await data?.close().catch(() => undefined);
    if (typeof target === 'string') await storage.close();
  }
}
