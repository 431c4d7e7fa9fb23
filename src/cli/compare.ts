// qimg compare: qemu-img 7.2's img_compare (texts, progress and exit statuses).

import { compareImages, CompareError } from '../compare.js';
import { FormatError } from '../errors.js';
import type { Image } from '../image.js';
import { getopt, type OptionSpec } from './getopt.js';
import { CACHE_MODES, CliError, errnoText, openForCli, reportError, usageError, withLockNotice, type CliContext } from './common.js';
import { Progress } from './progress.js';

const OPTIONS: OptionSpec[] = [
  { key: 'help', short: 'h', long: 'help', hasArg: false },
  { key: 'object', long: 'object', hasArg: true },
  { key: 'image-opts', long: 'image-opts', hasArg: false },
  { key: 'force-share', short: 'U', long: 'force-share', hasArg: false },
  { key: 'f', short: 'f', hasArg: true },
  { key: 'F', short: 'F', hasArg: true },
  { key: 'T', short: 'T', hasArg: true },
  { key: 'p', short: 'p', hasArg: false },
  { key: 'q', short: 'q', hasArg: false },
  { key: 's', short: 's', hasArg: false },
];

/** The cache modes QEMU's bdrv_parse_cache_mode accepts (-T is checked, then has no effect: qimg has one I/O path). */

// qemu-img compare's exit statuses beyond 0 (identical) and 1 (different).
const EXIT_OPEN = 2;
const EXIT_BLOCK_STATUS = 3;
const EXIT_READ = 4;

export async function cmdCompare(args: string[], ctx: CliContext, showHelp: () => number): Promise<number> {
  // Images opened without the locks they wanted (no native helpers) are reported once.
  return withLockNotice(ctx, () => compare(args, ctx, showHelp));
}

async function compare(args: string[], ctx: CliContext, showHelp: () => number): Promise<number> {
  const { options, operands } = getopt(args, OPTIONS, false, 'compare');
  let fmt1: string | undefined;
  let fmt2: string | undefined;
  let cache: string | undefined;
  let progress = false;
  let quiet = false;
  let strict = false;
  let forceShare = false;
  let imageOpts = false;
  for (const o of options) {
    switch (o.key) {
      case 'help': return showHelp();
      case 'f': fmt1 = o.value; break;
      case 'F': fmt2 = o.value; break;
      case 'T': cache = o.value; break;
      case 'p': progress = true; break;
      case 'q': quiet = true; break;
      case 's': strict = true; break;
      case 'force-share': forceShare = true; break;
      // qemu-img compare exits 2 when an --object cannot be created.
      case 'object': throw new CliError('--object is not supported by qimg', { exitCode: EXIT_OPEN });
      case 'image-opts': imageOpts = true; break;
    }
  }
  if (quiet) progress = false;
  if (operands.length !== 2) throw usageError('Expecting two image file names');
  const [filename1, filename2] = operands as [string, string];
  const print = (text: string): void => {
    if (!quiet) ctx.stdout.write(text);
  };
  // From here on qemu-img ends its progress output (a newline with -p) whatever happens.
  const meter = new Progress(progress ? ctx.stdout : null, 2.0);
  let image1: Image | undefined;
  let image2: Image | undefined;
  try {
    if (cache !== undefined && !CACHE_MODES.has(cache)) {
      throw new CliError(`Invalid source cache option: ${cache}`, { exitCode: EXIT_OPEN });
    }
    // With --image-opts the operands are option strings, which qimg does not parse: an open error.
    if (imageOpts) throw new CliError('--image-opts is not supported by qimg', { exitCode: EXIT_OPEN });
    image1 = (await openImageOrExit(filename1, fmt1, forceShare)).image;
    image2 = (await openImageOrExit(filename2, fmt2, forceShare)).image;
    const total = Math.max(image1.virtualSize, image2.virtualSize);
    meter.print(0, 100);
    let result;
    try {
      result = await compareImages(image1, image2, {
        strict,
        ...(progress
          ? {
              // qemu-img adds each step's share of the larger size in single precision.
              onProgress: (_offset: number, length: number) =>
                meter.print(Math.fround(Math.fround(Math.fround(length) / Math.fround(total)) * 100), 100),
            }
          : {}),
        onSizeMismatch: () => print('Warning: Image size mismatch!\n'),
      });
    } catch (e) {
      throw compareFailure(ctx, e, [image1, image2], [filename1, filename2]);
    }
    if (result.kind === 'identical') {
      print('Images are identical.\n');
      return 0;
    }
    if (result.kind === 'content') print(`Content mismatch at offset ${result.offset}!\n`);
    else if (result.kind === 'size') print('Strict mode: Image size mismatch!\n');
    else print(`Strict mode: Offset ${result.offset} block status mismatch!\n`);
    return 1;
  } catch (e) {
    // Reported here, so that the message comes before the progress output's last newline.
    return reportError(ctx, e);
  } finally {
    if (image2) await image2.close().catch(() => undefined);
    if (image1) await image1.close().catch(() => undefined);
    meter.end();
  }
}

async function openImageOrExit(filename: string, fmt: string | undefined, forceShare: boolean): ReturnType<typeof openForCli> {
  try {
    return await openForCli(filename, fmt, forceShare ? { forceShare: true } : {});
  } catch (e) {
    if (e instanceof CliError) {
      throw new CliError(e.lines, {
        exitCode: EXIT_OPEN,
        hint: e.hint,
        ...(e.trailer !== undefined ? { trailer: e.trailer } : {}),
        ...(e.appendedHint !== undefined ? { appendedHint: e.appendedHint } : {}),
      });
    }
    throw e;
  }
}

/** qemu-img's report of a failed block status query (exit 3) or read (exit 4). */
function compareFailure(ctx: CliContext, e: unknown, images: [Image, Image], filenames: [string, string]): unknown {
  if (!(e instanceof CompareError)) return e;
  const filename = filenames[e.image];
  if (e.stage === 'block-status') {
    // Broken qcow2 metadata is reported by the qcow2 driver first, without the program name
    // (qcow2_signal_corruption; the images are read-only, so it is reported, not marked).
    const cause = e.cause;
    if (cause instanceof FormatError && chainHasQcow2(images[e.image])) {
      ctx.stderr.write(`qcow2: Image is corrupt: ${cause.message}; further non-fatal corruption events will be suppressed\n`);
    }
    return new CliError(`Sector allocation test failed for ${filename}`, { exitCode: EXIT_BLOCK_STATUS });
  }
  return new CliError(`Error while reading offset ${e.offset} of ${filename}: ${errnoText(e.cause)}`, { exitCode: EXIT_READ });
}

function chainHasQcow2(image: Image): boolean {
  for (let layer: Image | null = image; layer; layer = layer.backing) if (layer.format === 'qcow2') return true;
  return false;
}

