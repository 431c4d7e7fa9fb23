// qimg create: qemu-img 7.2's img_create.

import { createImage, type CreateImageOptions } from '../create.js';
import { QimgError } from '../errors.js';
import { getopt, type OptionSpec } from './getopt.js';
import { CliError, cvtnum, errorText, usageError, type CliContext } from './common.js';
import { parseCreateOptions } from './options.js';

const OPTIONS: OptionSpec[] = [
  { key: 'help', short: 'h', long: 'help', hasArg: false },
  { key: 'object', long: 'object', hasArg: true },
  { key: 'F', short: 'F', hasArg: true },
  { key: 'b', short: 'b', hasArg: true },
  { key: 'f', short: 'f', hasArg: true },
  { key: 'o', short: 'o', hasArg: true },
  { key: 'q', short: 'q', hasArg: false },
  { key: 'u', short: 'u', hasArg: false },
];

const KNOWN_ELSEWHERE = new Set(['vmdk', 'vdi', 'vhdx', 'vpc', 'qed', 'qcow', 'luks', 'parallels', 'bochs', 'cloop', 'dmg']);

export async function cmdCreate(args: string[], ctx: CliContext, showHelp: () => number): Promise<number> {
  const { options, operands } = getopt(args, OPTIONS);
  let fmt = 'raw';
  let backingFile: string | undefined;
  let backingFormat: string | undefined;
  const opts: string[] = [];
  let quiet = false;
  let unsafe = false;
  for (const o of options) {
    switch (o.key) {
      case 'help': return showHelp();
      case 'F': backingFormat = o.value; break;
      case 'b': backingFile = o.value; break;
      case 'f': fmt = o.value!; break;
      case 'o': opts.push(o.value!); break;
      case 'q': quiet = true; break;
      case 'u': unsafe = true; break;
      case 'object': throw new CliError('--object is not supported by qimg');
    }
  }
  if (operands.length < 1) throw usageError('Expecting image file name');
  const filename = operands[0]!;
  let size: number | undefined;
  if (operands.length >= 2) size = cvtnum('image size', operands[1]!);
  if (operands.length > 2) throw usageError(`Unexpected argument: ${operands[2]}`);

  const fail = (e: unknown): CliError => {
    const hint = e instanceof QimgError && typeof e.data.hint === 'string' ? e.data.hint : undefined;
    if (e instanceof CliError) {
      return new CliError(`${filename}: ${e.message}`, e.trailer !== undefined ? { trailer: e.trailer } : {});
    }
    return new CliError(`${filename}: ${errorText(e)}`, hint !== undefined ? { appendedHint: hint } : {});
  };
  if (fmt !== 'qcow2' && fmt !== 'raw') {
    if (KNOWN_ELSEWHERE.has(fmt)) throw fail(new CliError(`qimg does not support the '${fmt}' format`));
    throw fail(new CliError(`Unknown file format '${fmt}'`));
  }
  let parsed;
  try {
    parsed = parseCreateOptions(fmt, opts.length ? opts.join(',') : undefined);
  } catch (e) {
    throw fail(e);
  }
  const createOptions: CreateImageOptions = { ...(parsed.options as CreateImageOptions), format: fmt };
  if (size !== undefined) {
    if (createOptions.size !== undefined) throw fail(new CliError('The image size must be specified only once'));
    createOptions.size = size;
  }
  if (backingFile !== undefined) createOptions.backingFile = backingFile;
  if (backingFormat !== undefined) createOptions.backingFormat = backingFormat;
  if (unsafe) createOptions.unsafe = true;
  // -b and -F take precedence over -o backing_file/backing_fmt.
  if (backingFile !== undefined) delete parsed.text.backing_file;
  if (backingFormat !== undefined) delete parsed.text.backing_fmt;
  createOptions.optionText = parsed.text;
  createOptions.onFormatting = (line) => {
    if (!quiet) ctx.stdout.write(`${line}\n`);
  };
  try {
    await createImage(filename, createOptions);
  } catch (e) {
    throw fail(e);
  }
  return 0;
}
