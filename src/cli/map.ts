// qimg map: qemu-img 7.2's img_map, human and JSON.

import type { Image } from '../image.js';
import { getopt, type OptionSpec } from './getopt.js';
import { CliError, cvtnum, openForCli, usageError, type CliContext } from './common.js';
import { parseOutputFormat, type OutputFormat } from './info.js';
import { altHex } from './cformat.js';

const OPTIONS: OptionSpec[] = [
  { key: 'help', short: 'h', long: 'help', hasArg: false },
  { key: 'format', short: 'f', long: 'format', hasArg: true },
  { key: 'output', long: 'output', hasArg: true },
  { key: 'object', long: 'object', hasArg: true },
  { key: 'image-opts', long: 'image-opts', hasArg: false },
  { key: 'force-share', short: 'U', long: 'force-share', hasArg: false },
  { key: 'start-offset', short: 's', long: 'start-offset', hasArg: true },
  { key: 'max-length', short: 'l', long: 'max-length', hasArg: true },
];

/** qemu-img's MapEntry. */
interface MapEntry {
  start: number;
  length: number;
  data: boolean;
  zero: boolean;
  depth: number;
  present: boolean;
  offset?: number;
  filename?: string;
}

async function getBlockStatus(image: Image, offset: number, bytes: number): Promise<MapEntry> {
  const st = await image.blockStatusAt(offset, bytes);
  const e: MapEntry = {
    start: offset,
    length: st.length,
    data: st.data,
    zero: st.zero,
    depth: st.depth,
    present: st.present,
  };
  if (st.hostOffset !== undefined) {
    e.offset = st.hostOffset;
    if (st.file) e.filename = st.file.name;
  }
  return e;
}

function entryMergeable(curr: MapEntry, next: MapEntry): boolean {
  if (curr.length === 0) return false;
  if (
    curr.zero !== next.zero ||
    curr.data !== next.data ||
    curr.depth !== next.depth ||
    curr.present !== next.present ||
    (curr.filename !== undefined) !== (next.filename !== undefined) ||
    (curr.offset !== undefined) !== (next.offset !== undefined)
  ) {
    return false;
  }
  if (curr.filename !== undefined && curr.filename !== next.filename) return false;
  if (curr.offset !== undefined && curr.offset + curr.length !== next.offset) return false;
  return true;
}

/** Prints one entry; for the human format also folds the next entry's flags as qemu-img does. */
function dumpMapEntry(ctx: CliContext, format: OutputFormat, e: MapEntry, next: MapEntry | null): void {
  if (format === 'human') {
    if (e.data && e.offset === undefined) {
      throw new CliError('File contains external, encrypted or compressed clusters.');
    }
    if (e.data && !e.zero) {
      ctx.stdout.write(
        `${altHex(e.start).padEnd(16)}${altHex(e.length).padEnd(16)}${altHex(e.offset ?? 0).padEnd(16)}${e.filename ?? ''}\n`,
      );
    }
    // The human format does not tell zero, ZERO and ZERO|DATA apart: fold them for more merging.
    if (next && (!next.data || next.zero)) {
      next.data = false;
      next.zero = true;
    }
    return;
  }
  let line =
    `{ "start": ${e.start}, "length": ${e.length}, "depth": ${e.depth}, "present": ${e.present}, ` +
    `"zero": ${e.zero}, "data": ${e.data}`;
  if (e.offset !== undefined) line += `, "offset": ${e.offset}`;
  line += '}';
  if (next) line += ',\n';
  ctx.stdout.write(line);
}

export async function cmdMap(args: string[], ctx: CliContext, showHelp: () => number): Promise<number> {
  const { options, operands } = getopt(args, OPTIONS, false, 'map');
  let fmt: string | undefined;
  let output: string | undefined;
  let startOffset = 0;
  let maxLength = -1;
  let forceShare = false;
  for (const o of options) {
    switch (o.key) {
      case 'help':
        return showHelp();
      case 'format':
        fmt = o.value;
        break;
      case 'output':
        output = o.value;
        break;
      case 'start-offset':
        startOffset = cvtnum('start offset', o.value!);
        break;
      case 'max-length':
        maxLength = cvtnum('max length', o.value!);
        break;
      case 'force-share':
        forceShare = true;
        break;
      case 'object':
        throw new CliError('--object is not supported by qimg');
      case 'image-opts':
        throw new CliError('--image-opts is not supported by qimg');
    }
  }
  if (operands.length !== 1) throw usageError('Expecting one image file name');
  const filename = operands[0]!;
  const format = parseOutputFormat(output);
  const { image } = await openForCli(filename, fmt, { forceShare });
  try {
    ctx.stdout.write(format === 'human' ? `${'Offset'.padEnd(16)}${'Length'.padEnd(16)}${'Mapped to'.padEnd(16)}File\n` : '[');
    let length = image.virtualSize;
    if (maxLength !== -1) length = Math.min(startOffset + maxLength, length);
    let curr: MapEntry = { start: startOffset, length: 0, data: false, zero: false, depth: 0, present: false };
    while (curr.start + curr.length < length) {
      const offset = curr.start + curr.length;
      let next: MapEntry;
      try {
        next = await getBlockStatus(image, offset, length - offset);
      } catch (e) {
        if (e instanceof CliError) throw e;
        throw new CliError(`Could not read file metadata: ${e instanceof Error ? e.message : String(e)}`);
      }
      if (entryMergeable(curr, next)) {
        curr.length += next.length;
        continue;
      }
      if (curr.length > 0) dumpMapEntry(ctx, format, curr, next);
      curr = next;
    }
    dumpMapEntry(ctx, format, curr, null);
    if (format === 'json') ctx.stdout.write(']\n');
    return 0;
  } finally {
    await image.close().catch(() => undefined);
  }
}
