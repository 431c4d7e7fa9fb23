// What every qimg subcommand shares: output streams, qemu-img's error conventions, opening images.

import { QimgError } from '../errors.js';
import { strerror } from '../io/file.js';
import { openImage, type OpenImageOptions, type OpenedImage } from '../open.js';
import { onLockingUnavailable } from '../io/lock.js';
import type { ImageFormat } from '../image.js';
import { GetoptError } from './getopt.js';

/**
 * The name messages start with: qimg, or qemu-img when the command line was started through a link
 * of that name (a drop-in for scripts that match qemu-img's messages). Set once by runCli.
 */
export let PROGRAM = 'qimg';

export function setProgramName(name: string): void {
  PROGRAM = name;
}

/** Where a command writes. Text goes out as UTF-8; `flush` pushes buffered output (progress lines). */
export interface CliOutput {
  write(text: string): void;
  flush?(): void;
}

export interface CliContext {
  stdout: CliOutput;
  stderr: CliOutput;
}

/** An error already worded for the user; `hint` adds qemu-img's "Try '... --help'" line (usage errors). */
export class CliError extends Error {
  readonly exitCode: number;
  readonly hint: boolean;
  /** Messages printed before the main one, each with its own program-name prefix. */
  readonly lines: string[];
  /** A line printed after the message without the program-name prefix (error_printf). */
  readonly trailer?: string;
  /** Text printed as is after the message (QEMU's error_append_hint: it carries its own newlines). */
  readonly appendedHint?: string;
  constructor(
    message: string | string[],
    options: { exitCode?: number; hint?: boolean; trailer?: string; appendedHint?: string } = {},
  ) {
    const lines = Array.isArray(message) ? message : [message];
    super(lines[lines.length - 1]);
    this.name = 'CliError';
    this.lines = lines;
    this.exitCode = options.exitCode ?? 1;
    this.hint = options.hint ?? false;
    if (options.trailer !== undefined) this.trailer = options.trailer;
    if (options.appendedHint !== undefined) this.appendedHint = options.appendedHint;
  }
}

/** qemu-img's error_exit: the message, the --help hint, exit status 1. */
export function usageError(message: string): CliError {
  return new CliError(message, { hint: true });
}

/** Prints an error as qemu-img does and returns the exit status. Never prints a stack. */
export function reportError(ctx: CliContext, err: unknown): number {
  if (err instanceof GetoptError) err = usageError(err.message);
  if (err instanceof CliError) {
    for (const line of err.lines) ctx.stderr.write(`${PROGRAM}: ${line}\n`);
    if (err.trailer !== undefined) ctx.stderr.write(`${err.trailer}\n`);
    if (err.appendedHint !== undefined) ctx.stderr.write(err.appendedHint);
    if (err.hint) ctx.stderr.write(`Try '${PROGRAM} --help' for more information\n`);
    return err.exitCode;
  }
  ctx.stderr.write(`${PROGRAM}: ${errorText(err)}\n`);
  return 1;
}

/** One line describing any thrown value: QimgError messages as is, others as "<name>: <message>". */
export function errorText(err: unknown): string {
  if (err instanceof QimgError) return err.message;
  if (err instanceof Error) {
    const code = (err as { code?: unknown }).code;
    const text = err.message.split('\n')[0] ?? '';
    return typeof code === 'string' && !text.includes(code) ? `${text} (${code})` : text || err.name;
  }
  return String(err);
}

/** The format names QEMU 7.2 knows; those qimg does not implement get a different message than unknown ones. */
const QEMU_FORMATS = new Set([
  'blkdebug', 'blklogwrites', 'blkverify', 'bochs', 'cloop', 'compress', 'copy-before-write', 'copy-on-read',
  'dmg', 'file', 'ftp', 'ftps', 'host_cdrom', 'host_device', 'http', 'https', 'iscsi', 'luks', 'nbd', 'nfs', 'null-aio',
  'null-co', 'nvme', 'parallels', 'preallocate', 'qcow', 'qed', 'quorum', 'rbd', 'replication', 'snapshot-access',
  'ssh', 'throttle', 'vdi', 'vhdx', 'vmdk', 'vpc', 'vvfat',
]);

/** Checks a -f/-O format name: qcow2 and raw are supported; anything else fails as qemu-img would, or says qimg lacks it. */
export function checkFormat(fmt: string, failPrefix: string): ImageFormat {
  if (fmt === 'qcow2' || fmt === 'raw') return fmt;
  if (QEMU_FORMATS.has(fmt)) throw new CliError(`${failPrefix}qimg does not support the '${fmt}' format`);
  throw new CliError(`${failPrefix}Unknown driver '${fmt}'`);
}

/**
 * Opens an image as qemu-img's img_open does; failures read "Could not open '<name>': <why>".
 * (A missing file reads "Could not open 'x': Could not open 'x': No such file or directory", as in QEMU.)
 */
export async function openForCli(
  filename: string,
  fmt: string | undefined,
  options: Omit<OpenImageOptions, 'format'> = {},
): Promise<OpenedImage> {
  const prefix = `Could not open '${filename}': `;
  const format = fmt === undefined ? undefined : checkFormat(fmt, prefix);
  try {
    return await openImage(filename, { readOnly: true, ...options, ...(format ? { format } : {}) });
  } catch (e) {
    throw openError(prefix, e);
  }
}

/**
 * An open failure as qemu-img prints it: the prefix and the reason on one line, then QEMU's hint
 * when the reason has one (a refused image lock: "Is another process using the image [x]?").
 */
export function openError(prefix: string, e: unknown): CliError {
  const hint = e instanceof QimgError && typeof e.data.hint === 'string' ? e.data.hint : undefined;
  return new CliError(prefix + errorText(e), hint !== undefined ? { appendedHint: hint } : {});
}

/** The notice printed (once per command) when images are opened without locks. */
export function lockingUnavailableNotice(program: string = PROGRAM): string {
  return `${program}: warning: image locking is unavailable (no native helpers): other processes using the image are not detected\n`;
}

/** The notice as qimg prints it under its own name. */
export const LOCKING_UNAVAILABLE_NOTICE = lockingUnavailableNotice('qimg');

/**
 * Runs a command with the lock notice armed: the first file opened without the image locks it
 * wanted (no koffi, QIMG_NO_NATIVE=1) prints LOCKING_UNAVAILABLE_NOTICE on stderr, once.
 */
export async function withLockNotice<T>(ctx: CliContext, run: () => Promise<T>): Promise<T> {
  let printed = false;
  const previous = onLockingUnavailable(() => {
    if (printed) return;
    printed = true;
    ctx.stderr.write(lockingUnavailableNotice());
  });
  try {
    return await run();
  } finally {
    onLockingUnavailable(previous);
  }
}

/**
 * QEMU's qemu_strtosz as cvtnum uses it: decimal or 0x hex, an optional fraction (decimal, with a
 * unit suffix), a suffix among B k M G T P E (binary units, case-insensitive apart from B/b),
 * nothing after it. Returns the byte count or throws CliError with qemu-img's message.
 */
export function cvtnum(name: string, value: string): number {
  const fail = (): never => {
    throw new CliError([
      `Invalid ${name} specified. You may use k, M, G, T, P or E suffixes for`,
      'kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes.',
    ]);
  };
  const m = /^\s*\+?(?:(0[xX][0-9a-fA-F]+)|(\d+)(?:\.(\d*))?)([bBkKmMgGtTpPeE]?)$/.exec(value);
  if (!m) return fail();
  const [, hex, dec, frac, suffix] = m;
  const shifts: Record<string, bigint> = { '': 0n, b: 0n, k: 10n, m: 20n, g: 30n, t: 40n, p: 50n, e: 60n };
  const mul = 1n << shifts[suffix!.toLowerCase()]!;
  let result: bigint;
  if (hex !== undefined) {
    result = BigInt(hex) * mul;
  } else {
    result = BigInt(dec!) * mul;
    if (frac !== undefined && /[1-9]/.test(frac)) {
      if (mul === 1n) return fail(); // a fraction needs a unit larger than a byte
      const den = 10n ** BigInt(frac.length);
      const prod = BigInt(frac) * mul;
      result += prod / den + ((prod % den) * 2n >= den ? 1n : 0n);
    }
  }
  const INT64_MAX = (1n << 63n) - 1n;
  if (result > INT64_MAX) throw new CliError(`Invalid ${name} specified. Must be between 0 and ${INT64_MAX}.`);
  return Number(result);
}

/** The cache modes bdrv_parse_cache_mode accepts for -t/-T (qimg has one I/O path: they are only checked). */
export const CACHE_MODES: ReadonlySet<string> = new Set(['none', 'off', 'writeback', 'unsafe', 'directsync', 'writethrough']);

/** QEMU's warning when an image opened for writing was probed as raw. */
export function probedRawWarning(filename: string): string {
  return (
    `WARNING: Image format was not specified for '${filename}' and probing guessed raw.\n` +
    '         Automatically detecting the format is dangerous for raw images, write operations on block 0 will be restricted.\n' +
    "         Specify the 'raw' format explicitly to remove the restrictions.\n"
  );
}

/**
 * The strerror text QEMU reports for a failed read: the errno of a failed file operation, else EIO
 * (what QEMU's drivers return for corrupt data, e.g. a compressed cluster that does not decompress).
 */
export function errnoText(e: unknown): string {
  const code = e instanceof QimgError ? e.data.errno : (e as { code?: unknown } | null)?.code;
  return typeof code === 'string' ? strerror(code) : 'Input/output error';
}
