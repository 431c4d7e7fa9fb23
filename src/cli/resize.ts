// qimg resize: qemu-img 7.2's img_resize.

import { getopt, type OptionSpec } from './getopt.js';
import { CliError, PROGRAM, checkFormat, openError, probedRawWarning, usageError, type CliContext } from './common.js';
import { openImage } from '../open.js';
import { QimgError } from '../errors.js';
import { parseSize } from './options.js';

const OPTIONS: OptionSpec[] = [
  { key: 'help', short: 'h', long: 'help', hasArg: false },
  { key: 'object', long: 'object', hasArg: true },
  { key: 'image-opts', long: 'image-opts', hasArg: false },
  { key: 'preallocation', long: 'preallocation', hasArg: true },
  { key: 'shrink', long: 'shrink', hasArg: false },
  { key: 'f', short: 'f', hasArg: true },
  { key: 'q', short: 'q', hasArg: false },
];

const PREALLOC_MODES = new Set(['off', 'metadata', 'falloc', 'full']);

export async function cmdResize(args: string[], ctx: CliContext, showHelp: () => number): Promise<number> {
  // The size is taken off the end first so that "-1G" is not parsed as an option (as qemu-img does).
  if (args.length < 2) throw usageError('Not enough arguments');
  const sizeText = args[args.length - 1]!;
  const { options, operands } = getopt(args.slice(0, -1), OPTIONS);
  let fmt: string | undefined;
  let quiet = false;
  let shrink = false;
  let prealloc = 'off';
  for (const o of options) {
    switch (o.key) {
      case 'help': return showHelp();
      case 'f': fmt = o.value; break;
      case 'q': quiet = true; break;
      case 'shrink': shrink = true; break;
      case 'preallocation':
        if (!PREALLOC_MODES.has(o.value!)) throw new CliError(`Invalid preallocation mode '${o.value}'`);
        prealloc = o.value!;
        break;
      case 'object': throw new CliError('--object is not supported by qimg');
      case 'image-opts': throw new CliError('--image-opts is not supported by qimg');
    }
  }
  if (operands.length !== 1) throw usageError('Expecting image file name and size');
  const filename = operands[0]!;
  let relative = 0;
  let text = sizeText;
  if (text.startsWith('+')) {
    relative = 1;
    text = text.slice(1);
  } else if (text.startsWith('-')) {
    relative = -1;
    text = text.slice(1);
  }
  // The size operand goes through QemuOpts' size parser, as in qemu-img.
  const n = parseSize('size', text);

  const prefix = `Could not open '${filename}': `;
  const format = fmt === undefined ? undefined : checkFormat(fmt, prefix);
  let opened;
  try {
    opened = await openImage(filename, { readOnly: false, resize: true, ...(format ? { format } : {}) });
  } catch (e) {
    throw openError(prefix, e);
  }
  const { image, probed } = opened;
  try {
    if (probed && image.format === 'raw') ctx.stderr.write(probedRawWarning(filename));
    const current = image.virtualSize;
    const total = relative ? current + n * relative : n;
    if (total <= 0) throw new CliError('New image size must be positive');
    if (total <= current && prealloc !== 'off') throw new CliError('Preallocation can only be used for growing images');
    if (total < current && !shrink) {
      throw new CliError([
        'Use the --shrink option to perform a shrink operation.',
        "warning: Shrinking an image will delete all data beyond the shrunken image's end. Before performing such an operation, make sure there is no important data there.",
      ]);
    }
    try {
      await image.resize(total, {
        shrink,
        preallocation: prealloc as 'off' | 'metadata' | 'falloc' | 'full',
        onWarning: (message) => ctx.stderr.write(`${PROGRAM}: ${message}\n`),
      });
    } catch (e) {
      if (e instanceof QimgError) {
        // An inconsistent bitmap's refusal carries QEMU's hint (printed as is, after the message).
        const hint = typeof e.data.hint === 'string' ? e.data.hint : undefined;
        throw new CliError(e.message, hint !== undefined ? { appendedHint: hint } : {});
      }
      throw e;
    }
    await image.close();
    if (!quiet) ctx.stdout.write('Image resized.\n');
    return 0;
  } finally {
    await image.close().catch(() => undefined);
  }
}
