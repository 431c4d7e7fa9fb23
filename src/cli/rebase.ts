// qimg rebase: qemu-img 7.2's img_rebase.

import { realpathSync } from 'node:fs';
import { getopt, type OptionSpec } from './getopt.js';
import { CACHE_MODES, CliError, checkFormat, errorText, openError, probedRawWarning, usageError, type CliContext } from './common.js';
import { Progress } from './progress.js';
import { findBackingDepth } from './commit.js';
import { openImage } from '../open.js';
import { rebaseImage } from '../rebase.js';
import { QimgError } from '../errors.js';
import { resolveRelativeName } from '../io/gate.js';
import type { Image } from '../image.js';

const OPTIONS: OptionSpec[] = [
  { key: 'help', short: 'h', long: 'help', hasArg: false },
  { key: 'object', long: 'object', hasArg: true },
  { key: 'image-opts', long: 'image-opts', hasArg: false },
  { key: 'U', short: 'U', long: 'force-share', hasArg: false },
  { key: 'f', short: 'f', hasArg: true },
  { key: 'F', short: 'F', hasArg: true },
  { key: 'b', short: 'b', hasArg: true },
  { key: 'u', short: 'u', hasArg: false },
  { key: 'p', short: 'p', hasArg: false },
  { key: 't', short: 't', hasArg: true },
  { key: 'T', short: 'T', hasArg: true },
  { key: 'q', short: 'q', hasArg: false },
];

/** Format names QEMU 7.2 knows (bdrv_find_format); -u may write any of them into the header. */
const KNOWN_FORMATS = new Set([
  'qcow2', 'raw', 'blkdebug', 'blklogwrites', 'blkverify', 'bochs', 'cloop', 'compress', 'copy-before-write',
  'copy-on-read', 'dmg', 'file', 'ftp', 'ftps', 'host_cdrom', 'host_device', 'http', 'https', 'iscsi', 'luks', 'nbd',
  'nfs', 'null-aio', 'null-co', 'nvme', 'parallels', 'preallocate', 'qcow', 'qed', 'quorum', 'rbd', 'replication',
  'snapshot-access', 'ssh', 'throttle', 'vdi', 'vhdx', 'vmdk', 'vpc', 'vvfat',
]);

/** Whether two names reach the same existing file. */
function samePath(a: string, b: string): boolean {
  try {
    return realpathSync(a) === realpathSync(b);
  } catch {
    return false;
  }
}

/** qemu-img's IO_BUF_SIZE: rebase advances its progress by one step of this size. */
const STEP_BYTES = 2 * 1024 * 1024;

export async function cmdRebase(args: string[], ctx: CliContext, showHelp: () => number): Promise<number> {
  const { options, operands } = getopt(args, OPTIONS);
  let fmt: string | undefined;
  let backingFmt: string | undefined;
  let backing: string | undefined;
  let unsafe = false;
  let progress = false;
  let quiet = false;
  let forceShare = false;
  let cache = 'writeback';
  let srcCache = 'writeback';
  for (const o of options) {
    switch (o.key) {
      case 'help': return showHelp();
      case 'f': fmt = o.value; break;
      case 'F': backingFmt = o.value; break;
      case 'b': backing = o.value!; break;
      case 'u': unsafe = true; break;
      case 'p': progress = true; break;
      case 't': cache = o.value!; break;
      case 'T': srcCache = o.value!; break;
      case 'q': quiet = true; break;
      case 'U': forceShare = true; break;
      case 'object': throw new CliError('--object is not supported by qimg');
      case 'image-opts': throw new CliError('--image-opts is not supported by qimg');
    }
  }
  if (quiet) progress = false;
  if (operands.length !== 1) throw usageError('Expecting one image file name');
  if (!unsafe && backing === undefined) throw usageError('Must specify backing file (-b) or use unsafe mode (-u)');
  const filename = operands[0]!;

  const meter = progress ? new Progress(ctx.stdout, 2.0) : null;
  meter?.print(0, 100);
  let image: Image | null = null;
  let newBacking: Image | null = null;
  let ownsNewBacking = false;
  try {
    if (!CACHE_MODES.has(cache)) throw new CliError(`Invalid cache option: ${cache}`);
    if (!CACHE_MODES.has(srcCache)) throw new CliError(`Invalid source cache option: ${srcCache}`);
    const prefix = `Could not open '${filename}': `;
    const format = fmt === undefined ? undefined : checkFormat(fmt, prefix);
    try {
      // -u leaves the old backing file closed: it may be the one that moved.
      const opened = await openImage(filename, { readOnly: false, ...(unsafe ? { noBacking: true } : {}), ...(format ? { format } : {}) });
      image = opened.image;
      if (opened.probed && image.format === 'raw') ctx.stderr.write(probedRawWarning(filename));
    } catch (e) {
      throw openError(prefix, e);
    }
    if (backingFmt !== undefined && !KNOWN_FORMATS.has(backingFmt)) throw new CliError(`Invalid format name: '${backingFmt}'`);

    if (!unsafe && backing) {
      // The new backing file's name is taken relative to the image, as QEMU opens it.
      const path = resolveRelativeName(backing, image.storage.name);
      if (samePath(path, filename)) {
        // The image itself: its own write lock stops QEMU from opening it again (and qimg never
        // opens an image a second time while it is open for writing).
        throw new CliError(`Could not open new backing file '${backing}': Failed to get shared "write" lock`, {
          trailer: `Is another process using the image [${path}]?`,
        });
      }
      const depth = await findBackingDepth(image, path);
      if (depth > 0) {
        newBacking = image;
        for (let k = 0; k < depth; k++) newBacking = newBacking.backing!;
      } else {
        const failPrefix = `Could not open new backing file '${backing}': `;
        const newFormat = backingFmt === undefined ? undefined : checkFormat(backingFmt, failPrefix);
        try {
          newBacking = (await openImage(path, { readOnly: true, ...(forceShare ? { forceShare: true } : {}), ...(newFormat ? { format: newFormat } : {}) })).image;
        } catch (e) {
          throw openError(failPrefix, e);
        }
        ownsNewBacking = true;
      }
    }

    const size = image.virtualSize;
    // qemu-img's per-step progress (integer division of the size by the step, as in C).
    const stepPercent = size !== 0 ? 100 / Math.floor(size / Math.min(size, STEP_BYTES)) : 0;
    try {
      await rebaseImage(image, {
        ...(backing ? { backingFile: backing } : {}),
        ...(backing && backingFmt !== undefined ? { backingFormat: backingFmt } : {}),
        requireFormat: true,
        unsafe,
        newBacking,
        ...(meter ? { onStep: () => meter.print(stepPercent, 100) } : {}),
      });
    } catch (e) {
      const errno = e instanceof QimgError ? e.data.errno : undefined;
      if (errno === 'ENOSPC') throw new CliError(`Could not change the backing file to '${backing}': No space left in the file header`);
      if (errno === 'EINVAL' && backing && backingFmt === undefined) {
        throw new CliError(`Could not change the backing file to '${backing}': backing format must be specified`);
      }
      if (errno !== undefined) throw new CliError(`Could not change the backing file to '${backing ?? '(null)'}': ${errorText(e)}`);
      throw new CliError(errorText(e));
    }
    meter?.print(100, 0);
    if (ownsNewBacking) await newBacking!.close();
    await image.close();
  } finally {
    meter?.end();
    if (ownsNewBacking) await newBacking?.close().catch(() => undefined);
    await image?.close().catch(() => undefined);
  }
  return 0;
}
