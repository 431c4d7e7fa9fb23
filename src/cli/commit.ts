// qimg commit: qemu-img 7.2's img_commit.

import { realpathSync } from 'node:fs';
import { getopt, type OptionSpec } from './getopt.js';
import {
  CACHE_MODES, CliError, checkFormat, cvtnum, errnoText, errorText, openError, probedRawWarning, usageError, type CliContext,
} from './common.js';
import { Progress } from './progress.js';
import { openImage } from '../open.js';
import { commitImage } from '../commit.js';
import { resolveRelativeName } from '../io/gate.js';
import type { Image } from '../image.js';
import { UnsupportedError, UsageError } from '../errors.js';

const OPTIONS: OptionSpec[] = [
  { key: 'help', short: 'h', long: 'help', hasArg: false },
  { key: 'object', long: 'object', hasArg: true },
  { key: 'image-opts', long: 'image-opts', hasArg: false },
  { key: 'f', short: 'f', hasArg: true },
  { key: 't', short: 't', hasArg: true },
  { key: 'b', short: 'b', hasArg: true },
  { key: 'd', short: 'd', hasArg: false },
  { key: 'p', short: 'p', hasArg: false },
  { key: 'q', short: 'q', hasArg: false },
  { key: 'r', short: 'r', hasArg: true },
];



function realpathOrNull(path: string): string | null {
  try {
    return realpathSync(path);
  } catch {
    return null;
  }
}

/**
 * QEMU's bdrv_find_backing_image for plain file names: the depth (1 = the immediate backing file)
 * of the first layer whose name, taken relative to the image above it, and the name that image
 * records, resolve to the same real path; -1 when none does.
 */
export async function findBackingDepth(top: Image, name: string): Promise<number> {
  let depth = 0;
  for (let layer: Image | null = top; layer?.backing; layer = layer.backing, depth++) {
    const recorded = (await layer.info()).backingFilename;
    if (recorded === undefined) break;
    const wanted = realpathOrNull(resolveRelativeName(name, layer.storage.name));
    if (wanted === null) continue;
    if (realpathOrNull(resolveRelativeName(recorded, layer.storage.name)) === wanted) return depth + 1;
  }
  return -1;
}

export async function cmdCommit(args: string[], ctx: CliContext, showHelp: () => number): Promise<number> {
  const { options, operands } = getopt(args, OPTIONS);
  let fmt: string | undefined;
  let cache = 'writeback';
  let base: string | undefined;
  let drop = false;
  let progress = false;
  let quiet = false;
  let rateLimit = 0;
  for (const o of options) {
    switch (o.key) {
      case 'help': return showHelp();
      case 'f': fmt = o.value; break;
      case 't': cache = o.value!; break;
      case 'b':
        base = o.value!;
        drop = true; // as qemu-img: committing further down leaves the overlay as it is
        break;
      case 'd': drop = true; break;
      case 'p': progress = true; break;
      case 'q': quiet = true; break;
      case 'r': rateLimit = cvtnum('rate limit', o.value!); break;
      case 'object': throw new CliError('--object is not supported by qimg');
      case 'image-opts': throw new CliError('--image-opts is not supported by qimg');
    }
  }
  if (quiet) progress = false;
  if (operands.length !== 1) throw usageError('Expecting one image file name');
  const filename = operands[0]!;
  if (!CACHE_MODES.has(cache)) throw new CliError(`Invalid cache option: ${cache}`);

  const prefix = `Could not open '${filename}': `;
  const format = fmt === undefined ? undefined : checkFormat(fmt, prefix);
  const openTop = async (writableDepth: number): Promise<{ image: Image; probed: boolean }> => {
    try {
      return await openImage(filename, { readOnly: false, writableDepth, ...(format ? { format } : {}) });
    } catch (e) {
      throw openError(prefix, e);
    }
  };

  // The chain is first opened with only the top writable, to find the base; then reopened with
  // every image down to the base writable (the commit writes into it).
  const first = await openTop(0);
  let image = first.image;
  if (first.probed && image.format === 'raw') ctx.stderr.write(probedRawWarning(filename));
  const meter = progress ? new Progress(ctx.stdout) : null;
  meter?.print(0, 100);
  try {
    let depth = 1;
    if (base !== undefined) {
      depth = await findBackingDepth(image, base);
      if (depth < 0) throw new CliError(`Did not find '${base}' in the backing chain of '${filename}'`);
    } else if (!image.backing) {
      throw new CliError('Image does not have a backing file');
    }
    await image.close();
    image = (await openTop(depth)).image;
    let baseImage: Image = image;
    for (let k = 0; k < depth; k++) baseImage = baseImage.backing!;
    try {
      await commitImage(image, {
        base: baseImage,
        drop,
        rateLimit,
        ...(meter ? { onProgress: (done: number, total: number) => meter.print(total > 0 ? (done / total) * 100 : 0, 0) } : {}),
      });
    } catch (e) {
      if (e instanceof CliError) throw e;
      if (e instanceof UsageError) throw new CliError(errorText(e));
      // qemu-img reports a failure inside its commit job by its errno only.
      throw new CliError(`Block job failed: ${e instanceof UnsupportedError ? 'Operation not supported' : errnoText(e)}`);
    }
    meter?.print(100, 0);
    await image.close();
  } finally {
    meter?.end();
    await image.close().catch(() => undefined);
  }
  if (!quiet) ctx.stdout.write('Image committed.\n');
  return 0;
}
