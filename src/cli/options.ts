// qemu-img's `-o key=value,...` creation options (QemuOpts syntax) turned into createImage options.

import type { CreateImageOptions } from '../create.js';
import type { ImageFormat } from '../image.js';
import { CliError } from './common.js';

/** QemuOpts splitting: ',' separates, ',,' is a literal comma, a bare key means "on". */
export function splitOpts(text: string): Array<[string, string | undefined]> {
  const out: Array<[string, string | undefined]> = [];
  let i = 0;
  while (i < text.length) {
    let key = '';
    while (i < text.length && text[i] !== '=' && text[i] !== ',') key += text[i++];
    let value: string | undefined;
    if (text[i] === '=') {
      i++;
      value = '';
      while (i < text.length) {
        if (text[i] === ',') {
          if (text[i + 1] === ',') {
            value += ',';
            i += 2;
            continue;
          }
          break;
        }
        value += text[i++];
      }
    }
    if (text[i] === ',') i++;
    if (key !== '' || value !== undefined) out.push([key, value]);
  }
  return out;
}

type Kind = 'size' | 'bool' | 'number' | 'string';

const QCOW2_KINDS: Record<string, Kind> = {
  size: 'size', compat: 'string', backing_file: 'string', backing_fmt: 'string', encryption: 'bool',
  cluster_size: 'size', preallocation: 'string', lazy_refcounts: 'bool', refcount_bits: 'number',
  data_file: 'string', data_file_raw: 'bool', extended_l2: 'bool', compression_type: 'string', nocow: 'bool',
  extent_size_hint: 'size',
};
const RAW_KINDS: Record<string, Kind> = { size: 'size', preallocation: 'string', nocow: 'bool', extent_size_hint: 'size' };

const SIZE_SUFFIX: Record<string, number> = { '': 0, b: 0, k: 10, m: 20, g: 30, t: 40, p: 50, e: 60 };

/** QemuOpts' size parser (qemu_strtosz): errors read as qemu-img prints them. */
export function parseSize(name: string, value: string): number {
  const m = /^\s*(\d+(?:\.\d*)?|0[xX][0-9a-fA-F]+)\s*([bBkKmMgGtTpPeE]?)$/.exec(value);
  if (m) {
    const num = m[1]!.startsWith('0x') || m[1]!.startsWith('0X') ? Number.parseInt(m[1]!, 16) : Number(m[1]);
    const result = Math.round(num * 2 ** SIZE_SUFFIX[m[2]!.toLowerCase()]!);
    if (Number.isSafeInteger(result)) return result;
  }
  throw new CliError(`Parameter '${name}' expects a non-negative number below 2^64`, {
    trailer: 'Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\nand exabytes, respectively.',
  });
}

function parseBool(name: string, value: string | undefined): boolean {
  if (value === undefined || ['on', 'yes', 'true', 'y'].includes(value)) return true;
  if (['off', 'no', 'false', 'n'].includes(value)) return false;
  throw new CliError(`Parameter '${name}' expects 'on' or 'off'`);
}

export interface ParsedCreateOptions {
  options: Partial<CreateImageOptions>;
  /** Options as typed, for the Formatting line (qemu-img echoes "lazy_refcounts=yes" as given). */
  text: Record<string, string>;
}

/**
 * Turns accumulated -o text into createImage options for `format`. Errors are worded as QEMU's
 * (the caller prefixes them with the file name).
 */
export function parseCreateOptions(format: ImageFormat, optsText: string | undefined): ParsedCreateOptions {
  const kinds = format === 'qcow2' ? QCOW2_KINDS : RAW_KINDS;
  const options: Partial<CreateImageOptions> = {};
  const text: Record<string, string> = {};
  const o = options as Record<string, unknown>;
  for (const [key, value] of splitOpts(optsText ?? '')) {
    const kind = kinds[key];
    if (!kind) throw new CliError(`Invalid parameter '${key}'`);
    if (key === 'encryption' || key.startsWith('encrypt.')) {
      throw new CliError('qimg does not support encrypted images');
    }
    if (value !== undefined) text[key] = value;
    switch (kind) {
      case 'size': {
        const n = parseSize(key, value ?? '');
        if (key === 'size') o.size = n;
        else if (key === 'cluster_size') o.clusterSize = n;
        else o.extentSizeHint = n;
        break;
      }
      case 'bool': {
        const b = parseBool(key, value);
        if (value === undefined) text[key] = 'on';
        if (key === 'lazy_refcounts') o.lazyRefcounts = b;
        else if (key === 'extended_l2') o.extendedL2 = b;
        else if (key === 'data_file_raw') o.dataFileRaw = b;
        else if (key === 'nocow') o.nocow = b;
        break;
      }
      case 'number': {
        const v = value ?? '';
        if (!/^\d+$/.test(v)) throw new CliError(`Parameter '${key}' expects a number`);
        o.refcountBits = Number(v);
        break;
      }
      case 'string': {
        const v = value ?? '';
        if (key === 'compat') o.compat = v === 'v2' ? '0.10' : v === 'v3' ? '1.1' : v;
        else if (key === 'backing_file') o.backingFile = v;
        else if (key === 'backing_fmt') o.backingFormat = v;
        else if (key === 'preallocation') o.preallocation = v;
        else if (key === 'data_file') o.dataFile = v;
        else if (key === 'compression_type') o.compressionType = v;
        break;
      }
    }
  }
  return { options, text };
}
