// qimg convert: qemu-img 7.2's img_convert for raw and qcow2 targets.
//
// Beyond qemu-img: --progress=json prints machine-readable progress on stderr (JSON lines), and
// SIGINT stops the copy cleanly: no new requests, those in flight finish, the target is flushed and
// closed (a qcow2 target stays consistent), and qimg exits with status 130.

import { stat } from 'node:fs/promises';
import type { Image } from '../image.js';
import type { Storage } from '../io/storage.js';
import { FileStorage } from '../io/file.js';
import { createRaw } from '../raw/create.js';
import { NotFoundError, QimgError } from '../errors.js';
import { openImage, type OpenedImage } from '../open.js';
import { createImage, type CreateImageOptions } from '../create.js';
import {
  ConvertBlockStatusError, ConvertReadError, convert, convertTargetSize, type ConvertOptions,
} from '../convert/convert.js';
import { getopt, type OptionSpec } from './getopt.js';
import { CACHE_MODES, CliError, PROGRAM, cvtnum, errnoText, errorText, openError, openForCli, type CliContext } from './common.js';
import { CREATE_PERMS, imageFilePerms, userPerms } from '../io/lock.js';
import { parseCreateOptions } from './options.js';
import {
  listPersistentBitmaps, readBitmapBits, storeNewBitmaps, type BitmapSource, type NewBitmap, type PersistentBitmap,
} from '../qcow2/bitmaps-copy.js';
import { JsonProgress, Progress } from './progress.js';

const OPTIONS: OptionSpec[] = [
  { key: 'help', short: 'h', long: 'help', hasArg: false },
  { key: 'object', long: 'object', hasArg: true },
  { key: 'image-opts', long: 'image-opts', hasArg: false },
  { key: 'force-share', short: 'U', long: 'force-share', hasArg: false },
  { key: 'target-image-opts', long: 'target-image-opts', hasArg: false },
  { key: 'salvage', long: 'salvage', hasArg: false },
  { key: 'target-is-zero', long: 'target-is-zero', hasArg: false },
  { key: 'bitmaps', long: 'bitmaps', hasArg: false },
  { key: 'skip-broken-bitmaps', long: 'skip-broken-bitmaps', hasArg: false },
  { key: 'f', short: 'f', hasArg: true },
  { key: 'O', short: 'O', hasArg: true },
  { key: 'B', short: 'B', hasArg: true },
  { key: 'C', short: 'C', hasArg: false },
  { key: 'c', short: 'c', hasArg: false },
  { key: 'F', short: 'F', hasArg: true },
  { key: 'o', short: 'o', hasArg: true },
  { key: 'l', short: 'l', hasArg: true },
  { key: 'S', short: 'S', hasArg: true },
  { key: 'p', short: 'p', hasArg: false },
  { key: 't', short: 't', hasArg: true },
  { key: 'T', short: 'T', hasArg: true },
  { key: 'q', short: 'q', hasArg: false },
  { key: 'n', short: 'n', hasArg: false },
  { key: 'm', short: 'm', hasArg: true },
  { key: 'W', short: 'W', hasArg: false },
  { key: 'r', short: 'r', hasArg: true },
  // qimg's own: --progress=json (JSON lines on stderr) or --progress=human (as -p).
  { key: 'progress', long: 'progress', hasArg: true },
];

/** Exit status after SIGINT stopped a convert (the shell's 128 + SIGINT, what a killed qemu-img yields). */
export const INTERRUPTED_EXIT = 130;

const KNOWN_ELSEWHERE = new Set(['vmdk', 'vdi', 'vhdx', 'vpc', 'qed', 'qcow', 'luks', 'parallels', 'bochs', 'cloop', 'dmg']);

const MAX_BUF_SECTORS = 32768;
const MAX_COROUTINES = 16;

/** -l snapshot.id=..,snapshot.name=.. as QemuOpts parses it (",," is a literal comma). */
function parseSnapshotOpts(arg: string): { id?: string; name?: string } {
  const result: { id?: string; name?: string } = {};
  const parts: string[] = [];
  let cur = '';
  for (let i = 0; i < arg.length; i++) {
    if (arg[i] === ',') {
      if (arg[i + 1] === ',') {
        cur += ',';
        i++;
        continue;
      }
      parts.push(cur);
      cur = '';
    } else {
      cur += arg[i];
    }
  }
  parts.push(cur);
  for (const part of parts) {
    const eq = part.indexOf('=');
    const key = eq >= 0 ? part.slice(0, eq) : part;
    const value = eq >= 0 ? part.slice(eq + 1) : 'on';
    if (key === 'snapshot.id') result.id = value;
    else if (key === 'snapshot.name') result.name = value;
    else throw new CliError([`Invalid parameter '${key}'`, `Failed in parsing snapshot param '${arg}'`]);
  }
  return result;
}

/** Parses -o for a raw target: only the options raw creation has, and only the values qimg implements. */
function checkRawCreateOptions(options: string[]): void {
  for (const group of options) {
    for (const part of group.split(',')) {
      if (part === '') continue;
      const eq = part.indexOf('=');
      const key = eq >= 0 ? part.slice(0, eq) : part;
      const value = eq >= 0 ? part.slice(eq + 1) : '';
      if (key === 'preallocation') {
        if (value !== 'off') throw new CliError(`qimg does not support preallocation=${value} for raw targets`);
      } else if (key === 'size') {
        // Overwritten by the source's size, as in qemu-img.
      } else if (key === 'help' || key === '?') {
        throw new CliError('qimg does not print creation option help');
      } else {
        throw new CliError(`Invalid parameter '${key}'`);
      }
    }
  }
}

export async function cmdConvert(args: string[], ctx: CliContext, showHelp: () => number): Promise<number> {
  const { options, operands } = getopt(args, OPTIONS, false, 'convert');
  let fmt: string | undefined;
  let outFmt: string | undefined;
  let outBaseImg: string | undefined;
  let copyRange = false;
  let compressed = false;
  const createOptions: string[] = [];
  let snapshotOpts: { id?: string; name?: string } | undefined;
  let snapshotName: string | undefined;
  let minSparse = 4096;
  let explicitMinSparse = false;
  let progress = false;
  let jsonProgress = false;
  let backingFmt: string | undefined;
  let outOfOrder = false;
  let quiet = false;
  let skipCreate = false;
  let forceShare = false;
  let parallel = 8;
  let targetIsZero = false;
  let salvage = false;
  let tgtImageOpts = false;
  let bitmaps = false;
  let skipBroken = false;
  let rateLimit = 0;
  for (const o of options) {
    switch (o.key) {
      case 'help':
        return showHelp();
      case 'f': fmt = o.value; break;
      case 'O': outFmt = o.value; break;
      case 'B': outBaseImg = o.value; break;
      case 'C': copyRange = true; break;
      case 'c': compressed = true; break;
      case 'F': backingFmt = o.value; break;
      case 'o': createOptions.push(o.value!); break;
      case 'l':
        if (o.value!.startsWith('snapshot.')) snapshotOpts = parseSnapshotOpts(o.value!);
        else snapshotName = o.value;
        break;
      case 'S': {
        const v = cvtnum('buffer size for sparse output', o.value!);
        if (v % 512 !== 0 || v / 512 > MAX_BUF_SECTORS) {
          throw new CliError(
            'Invalid buffer size for sparse output specified. Valid sizes are multiples of 512 up to ' +
              `${MAX_BUF_SECTORS * 512}. Select 0 to disable sparse detection (fully allocates output).`,
          );
        }
        minSparse = v;
        explicitMinSparse = true;
        break;
      }
      case 'p': progress = true; break;
      case 't':
      case 'T':
        break; // cache modes are checked below; qimg has one I/O path
      case 'q': quiet = true; break;
      case 'n': skipCreate = true; break;
      case 'force-share': forceShare = true; break;
      case 'm': {
        const v = parseCLong(o.value!);
        if (v === undefined || v < 1 || v > MAX_COROUTINES) {
          throw new CliError(
            `Invalid number of coroutines. Allowed number of coroutines is between 1 and ${MAX_COROUTINES}`,
          );
        }
        parallel = v;
        break;
      }
      case 'W': outOfOrder = true; break;
      case 'progress':
        if (o.value === 'json') jsonProgress = true;
        else if (o.value === 'human') progress = true;
        else throw new CliError(`Invalid progress format '${o.value}' (expected 'json' or 'human')`);
        break;
      case 'r': rateLimit = cvtnum('rate limit', o.value!); break;
      case 'object': throw new CliError('--object is not supported by qimg');
      case 'image-opts': throw new CliError('--image-opts is not supported by qimg');
      case 'target-image-opts': tgtImageOpts = true; break;
      case 'salvage': salvage = true; break;
      case 'target-is-zero': targetIsZero = true; break;
      case 'bitmaps': bitmaps = true; break;
      case 'skip-broken-bitmaps': skipBroken = true; break;
    }
  }
  const srcCache = options.filter((o) => o.key === 'T').pop()?.value;
  const dstCache = options.filter((o) => o.key === 't').pop()?.value;
  if (!outFmt && !tgtImageOpts) outFmt = 'raw';
  if (skipBroken && !bitmaps) throw new CliError('Use of --skip-broken-bitmaps requires --bitmaps');
  if (compressed && copyRange) throw new CliError('Cannot enable copy offloading when -c is used');
  if (explicitMinSparse && copyRange) throw new CliError('Cannot enable copy offloading when -S is used');
  if (copyRange && salvage) throw new CliError('Cannot use copy offloading in salvaging mode');
  if (tgtImageOpts && !skipCreate) throw new CliError('--target-image-opts requires use of -n flag');
  if (skipCreate && createOptions.length > 0) throw new CliError('-o has no effect when skipping image creation');
  if (targetIsZero && !skipCreate) throw new CliError('--target-is-zero requires use of -n flag');
  if (tgtImageOpts) throw new CliError('--target-image-opts is not supported by qimg');
  const srcNum = operands.length - 1;
  if (srcNum < 1) throw new CliError('Must specify image file name');
  if (srcCache !== undefined && !CACHE_MODES.has(srcCache)) {
    throw new CliError(`Invalid source cache option: ${srcCache}`);
  }
  const outFilename = operands[operands.length - 1]!;
  const sourceNames = operands.slice(0, srcNum);

  if (quiet) progress = false;
  const meter = new Progress(progress ? ctx.stdout : null);
  meter.print(0, 100);
  const json = jsonProgress ? new JsonProgress(ctx.stderr) : null;

  const images: Image[] = [];
  let target: Storage | null = null;
  let targetImage: Image | null = null;
  let ok = false;
  const abort = new AbortController();
  let interrupted = false;
  const onSigint = (): void => {
    // A second SIGINT does not wait for the clean stop.
    if (interrupted) process.exit(INTERRUPTED_EXIT);
    interrupted = true;
    abort.abort();
  };
  process.on('SIGINT', onSigint);
  try {
    for (const name of sourceNames) {
      // qemu-img convert's sources let others read them meanwhile, not write them (BDRV_O_NO_SHARE).
      images.push((await openForCli(name, fmt, { shareOnlyReads: true, forceShare })).image);
    }
    if (snapshotOpts !== undefined || snapshotName !== undefined) {
      if (snapshotOpts === undefined && srcNum > 1) {
        throw new CliError('No support for concatenating multiple snapshot');
      }
      images[0] = await loadSnapshot(images[0]!, sourceNames[0]!, fmt, snapshotOpts, snapshotName, forceShare);
    }
    const totalSize = convertTargetSize(images);
    let createOpts: CreateImageOptions | null = null;
    let backingFile = outBaseImg;
    if (!skipCreate) {
      if (outFmt !== 'raw' && outFmt !== 'qcow2') {
        if (KNOWN_ELSEWHERE.has(outFmt!)) throw new CliError(`qimg does not support the '${outFmt}' format`);
        throw new CliError(`Unknown file format '${outFmt}'`);
      }
      if (outFmt === 'raw') {
        checkRawCreateOptions(createOptions);
        if (outBaseImg !== undefined) throw new CliError("Backing file not supported for file format 'raw'");
      } else {
        const parsed = parseCreateOptions('qcow2', createOptions.length ? createOptions.join(',') : undefined);
        createOpts = { ...(parsed.options as CreateImageOptions), format: 'qcow2', size: totalSize, unsafe: true };
        // -B and -F take the place of -o backing_file / backing_fmt (add_old_style_options).
        if (outBaseImg !== undefined) createOpts.backingFile = outBaseImg;
        if (backingFmt !== undefined) createOpts.backingFormat = backingFmt;
        backingFile = createOpts.backingFile;
      }
    }
    const targetHasBacking = backingFile !== undefined;
    if (targetIsZero && targetHasBacking) {
      // qemu-img 7.2 reports this one and exits with status 0 (its ret is still 0 at that point).
      throw new CliError('Cannot use --target-is-zero when the destination image has a backing file', { exitCode: 0 });
    }
    if (srcNum > 1 && targetHasBacking) {
      throw new CliError('Having a backing file for the target makes no sense when concatenating multiple input images');
    }
    if (createOpts && createOpts.backingFile !== undefined && createOpts.backingFormat === undefined) {
      throw new CliError('Use of backing file requires explicit backing format');
    }
    if (compressed && !skipCreate) {
      if (outFmt === 'raw') throw new CliError('Compression not supported for this file format');
      if (createOpts?.preallocation !== undefined && createOpts.preallocation !== 'off') {
        throw new CliError('Compression and preallocation not supported at the same time');
      }
    }
    let sourceBitmaps: PersistentBitmap[] = [];
    if (bitmaps) {
      if (srcNum > 1) throw new CliError('Copying bitmaps only possible with single source');
      sourceBitmaps = await checkSourceBitmaps(images[0]!, skipBroken);
    }

    if (!skipCreate) {
      // Creating the target truncates it: never when it is one of the files being read (QEMU's
      // image locking refuses this the same way).
      if (await isInUse(outFilename, images)) {
        throw new CliError([
          `${outFilename}: error while converting ${outFmt}: Failed to get "write" lock`,
        ], { trailer: `Is another process using the image [${outFilename}]?` });
      }
    }

    // The fast path: a raw file written as bytes, in any order.
    const rawFast = outFmt === 'raw' && !targetHasBacking;
    if (!skipCreate && outFmt === 'qcow2') {
      // bdrv_create: no "Formatting" line, the backing file is not opened (a missing one fails
      // when the target is opened next).
      try {
        await createImage(outFilename, createOpts!);
      } catch (e) {
        throw openError(`${outFilename}: error while converting qcow2: `, e);
      }
    } else if (!skipCreate) {
      // As qemu-img: create (empty and size) the target, close it, then open it again for the
      // copy. Besides matching QEMU, the close matters for speed: ext4 flushes a file truncated to
      // zero on its next close (auto_da_alloc), which after the copy would wait for writeback of
      // the whole target; closing right after the truncation, with nothing dirty, is free.
      let created: FileStorage;
      try {
        created = await FileStorage.open(outFilename, { readOnly: false, create: true, locks: CREATE_PERMS });
      } catch (e) {
        const why = errorText(e).replace(/^Could not open/, 'Could not create');
        throw new CliError(`${outFilename}: error while converting raw: ${why}`, hintOf(e));
      }
      try {
        // raw creation as QEMU's: sized, and the first block written (allocate_first_block).
        await createRaw(created, totalSize);
      } finally {
        await created.close();
      }
    }
    // Checked once the target is created, as qemu-img does (an empty target stays behind).
    if (dstCache !== undefined && !CACHE_MODES.has(dstCache)) throw new CliError(`Invalid cache option: ${dstCache}`);
    // qemu-img convert writes its target with cache=unsafe unless -t says otherwise: no syncs.
    const unsafeCache = dstCache === undefined || dstCache === 'unsafe';
    if (rawFast) {
      try {
        target = await FileStorage.open(outFilename, { readOnly: false, noFlush: unsafeCache, locks: RAW_TARGET_PERMS });
      } catch (e) {
        throw openError(`Could not open '${outFilename}': `, e);
      }
      if (bitmaps) throw new CliError("Format driver 'raw' does not support bitmaps");
      if (compressed) throw new CliError('Compression not supported for this file format');
      if (skipCreate && (await target.size()) < totalSize) throw new CliError('output file is smaller than input file');
    } else {
      if (outFmt !== 'raw' && outFmt !== 'qcow2') {
        if (KNOWN_ELSEWHERE.has(outFmt!)) throw new CliError(`qimg does not support the '${outFmt}' format`);
        throw new CliError(`Unknown driver '${outFmt}'`);
      }
      try {
        const storage = await FileStorage.open(outFilename, { readOnly: false, noFlush: unsafeCache });
        targetImage = (await openImage(storage, { readOnly: false, format: outFmt })).image;
      } catch (e) {
        throw openError(`Could not open '${outFilename}': `, e);
      }
      if (bitmaps && !supportsBitmaps(targetImage)) {
        throw new CliError(`Format driver '${targetImage.format}' does not support bitmaps`);
      }
      if (compressed && targetImage.format !== 'qcow2') throw new CliError('Compression not supported for this file format');
      if (skipCreate && targetImage.virtualSize < totalSize) throw new CliError('output file is smaller than input file');
    }

    const copyOptions: ConvertOptions = {
      minSparse,
      parallel,
      signal: abort.signal,
      ...(rateLimit ? { rateLimit } : {}),
      ...(copyRange ? { copyRange: true } : {}),
      ...(salvage
        ? {
            salvage: true,
            onReadError: ({ offset, error }) => {
              if (!quiet) ctx.stderr.write(`${PROGRAM}: warning: error while reading offset ${offset}: ${errnoText(error)}\n`);
            },
            onBlockStatusError: ({ offset, error }) => {
              if (!quiet) {
                ctx.stderr.write(`${PROGRAM}: warning: error while reading block status at offset ${offset}: ${errnoText(error)}\n`);
              }
            },
          }
        : {}),
      ...(progress || json
        ? {
            onProgress: ({ done, total }) => {
              if (progress) meter.print((100 * done) / total, 0);
              json?.progress(done, total);
            },
          }
        : {}),
    };
    try {
      if (target) {
        // A created target is already sized and reads as zeros.
        await convert(images, target, { ...copyOptions, existing: true, targetIsZero: skipCreate ? targetIsZero : true });
      } else {
        await convert(images, targetImage!, {
          ...copyOptions,
          existing: skipCreate,
          targetIsZero,
          compress: compressed,
          targetHasBacking,
          outOfOrder,
        });
      }
    } catch (e) {
      if (interrupted && e instanceof Error && e.name === 'AbortError') {
        // In-flight requests have finished; the finally below flushes and closes the target.
        throw new CliError('convert interrupted by SIGINT; the target was flushed and closed but is incomplete', {
          exitCode: INTERRUPTED_EXIT,
        });
      }
      if (e instanceof ConvertReadError) throw new CliError(`error while reading at byte ${e.offset}: ${errnoText(e.cause)}`);
      if (e instanceof ConvertBlockStatusError) {
        throw new CliError(`error while reading block status at offset ${e.offset}: ${errnoText(e.cause)}`);
      }
      throw e;
    }
    // A raw target is synced at the end unless -t is unsafe (the default), as QEMU flushes it on
    // close; a qcow2 target's close flushes it (src/qcow2).
    if (target) await target.flush();
    if (bitmaps) {
      // As qemu-img: the bitmaps are added once the data is copied, then stored as the target closes.
      const tgt = targetImage!;
      const existing = await listPersistentBitmaps(tgt.driver as unknown as BitmapSource);
      const closing = tgt.close();
      targetImage = null;
      await closing;
      if (compressed) await alignFileEnd(outFilename);
      await copyBitmaps(images[0]!, sourceBitmaps, outFilename, tgt.virtualSize, existing, skipBroken, ctx);
    }
    ok = true;
  } finally {
    process.off('SIGINT', onSigint);
    if (ok) meter.print(100, 0);
    meter.end();
    if (target) await target.close().catch(() => undefined);
    if (targetImage) {
      const closing = targetImage.close();
      if (ok) await closing;
      else await closing.catch(() => undefined);
      if (ok && compressed) await alignFileEnd(outFilename);
    }
    for (const image of images) await image.close().catch(() => undefined);
  }
  json?.finish();
  return 0;
}


/** qcow2 v3 images store persistent bitmaps (QEMU's bdrv_supports_persistent_dirty_bitmap). */
function supportsBitmaps(image: Image): boolean {
  return image.format === 'qcow2' && (image.driver as unknown as BitmapSource).header.version >= 3;
}

/** convert_check_bitmaps: the source's persistent bitmaps, refusing inconsistent ones unless skipped. */
async function checkSourceBitmaps(image: Image, skipBroken: boolean): Promise<PersistentBitmap[]> {
  if (!supportsBitmaps(image)) throw new CliError('Source lacks bitmap support');
  let list: PersistentBitmap[];
  try {
    list = await listPersistentBitmaps(image.driver as unknown as BitmapSource);
  } catch (e) {
    throw new CliError(errorText(e));
  }
  // QEMU holds loaded bitmaps newest first: it visits them in reverse directory order.
  for (const bm of [...list].reverse()) {
    if (!skipBroken && bm.inUse) {
      throw new CliError(`Cannot copy inconsistent bitmap '${bm.name}'`, {
        trailer: "Try --skip-broken-bitmaps, or use 'qemu-img bitmap --remove' to delete it",
      });
    }
  }
  return list;
}

/**
 * convert_copy_bitmaps into the closed target: each source bitmap (in QEMU's order, reverse
 * directory order) is added with its granularity and enabled state and its bits; the ones added
 * before a failure are stored all the same, as QEMU stores them when it closes the target.
 */
async function copyBitmaps(
  source: Image, list: PersistentBitmap[], outFilename: string, targetSize: number, existing: PersistentBitmap[],
  skipBroken: boolean, ctx: CliContext,
): Promise<void> {
  const added: NewBitmap[] = [];
  let failure: CliError | null = null;
  for (const bm of [...list].reverse()) {
    if (skipBroken && bm.inUse) {
      ctx.stderr.write(`${PROGRAM}: warning: Skipping inconsistent bitmap '${bm.name}'\n`);
      continue;
    }
    if (existing.some((e) => e.name === bm.name) || added.some((e) => e.name === bm.name)) {
      failure = new CliError(`Failed to create bitmap ${bm.name}: Bitmap already exists: ${bm.name}`);
      break;
    }
    if (targetSize !== source.virtualSize) {
      failure = new CliError(
        `Failed to populate bitmap ${bm.name}: Bitmaps are of different sizes (destination size is ${targetSize}, ` +
          `source size is ${source.virtualSize}) and can't be merged`,
      );
      break;
    }
    try {
      const bits = await readBitmapBits(source.driver as unknown as BitmapSource, bm);
      added.push({ name: bm.name, granularity: bm.granularity, enabled: bm.enabled, bits });
    } catch (e) {
      failure = new CliError(`Failed to populate bitmap ${bm.name}: ${errorText(e)}`);
      break;
    }
  }
  // The target keeps them newest first; closing appends them to its directory in that order.
  added.reverse();
  if (added.length > 0) {
    const file = await FileStorage.open(outFilename, { readOnly: false, locks: QCOW2_WRITER_PERMS });
    try {
      await storeNewBitmaps(file, added);
    } catch (e) {
      if (!failure) failure = new CliError(`Failed to store bitmaps in '${outFilename}': ${errorText(e)}`);
    } finally {
      await file.close();
    }
  }
  if (failure) throw failure;
}

/** After compressed writes qemu-img rounds the image file up to whole sectors (a zero-length compressed write). */
async function alignFileEnd(path: string): Promise<void> {
  const file = await FileStorage.open(path, { readOnly: false, locks: QCOW2_WRITER_PERMS });
  try {
    const size = await file.size();
    if (size % 512 !== 0) await file.truncate(Math.ceil(size / 512) * 512);
  } finally {
    await file.close();
  }
}

/** True when `path` is the same file as one any source image (or its backing chain) reads. */
async function isInUse(path: string, images: Image[]): Promise<boolean> {
  const target = await stat(path).catch(() => null);
  if (!target) return false;
  for (const image of images) {
    for (let layer: Image | null = image; layer; layer = layer.backing) {
      const st = await stat(layer.storage.name).catch(() => null);
      if (st && st.dev === target.dev && st.ino === target.ino) return true;
    }
  }
  return false;
}

/** Reopens the first source at an internal snapshot, as bdrv_snapshot_load_tmp(_by_id_or_name) does. */
async function loadSnapshot(
  image: Image,
  filename: string,
  fmt: string | undefined,
  opts: { id?: string; name?: string } | undefined,
  idOrName: string | undefined,
  forceShare: boolean,
): Promise<Image> {
  if (image.format !== 'qcow2') {
    throw new CliError(
      `Failed to load snapshot: Block format '${image.format}' used by device '' does not support temporarily loading internal snapshots`,
    );
  }
  const format = image.format;
  await image.close();
  const attempts = opts ? [opts] : [{ id: idOrName! }, { name: idOrName! }];
  for (const snapshot of attempts) {
    try {
      return (await openForCliRaw(filename, fmt ?? format, snapshot, forceShare)).image;
    } catch (e) {
      if (!(e instanceof NotFoundError)) throw new CliError(`Could not open '${filename}': ${errorText(e)}`);
    }
  }
  throw new CliError("Failed to load snapshot: Can't find snapshot");
}

function openForCliRaw(
  filename: string, fmt: string, snapshot: { id?: string; name?: string }, forceShare: boolean,
): Promise<OpenedImage> {
  return openImage(filename, {
    readOnly: true, format: fmt === 'raw' ? 'raw' : 'qcow2', snapshot, shareOnlyReads: true, forceShare,
  });
}

/** The locks of convert's raw target as qemu-img holds them: written, not resized, shared with all. */
const RAW_TARGET_PERMS = imageFilePerms('raw', userPerms({ writable: true }), { writable: true });

/** A qcow2 target reopened to finish it (bitmaps, the aligned end): the writer's locks. */
const QCOW2_WRITER_PERMS = imageFilePerms('qcow2', userPerms({ writable: true }), { writable: true });

/** QEMU's hint carried by an error, as CliError options. */
function hintOf(e: unknown): { appendedHint?: string } {
  return e instanceof QimgError && typeof e.data.hint === 'string' ? { appendedHint: e.data.hint } : {};
}

/** strtol(s, &end, 0) that must consume the whole string (qemu_strtol): decimal, 0x hex, 0 octal. */
function parseCLong(s: string): number | undefined {
  const m = /^\s*([+-]?)(?:0[xX]([0-9a-fA-F]+)|(0[0-7]*)|([1-9]\d*))$/.exec(s);
  if (!m) return undefined;
  const [, sign, hex, oct, dec] = m;
  const v = hex !== undefined ? Number.parseInt(hex, 16) : oct !== undefined ? Number.parseInt(oct, 8) : Number(dec);
  return sign === '-' ? -v : v;
}
