// qimg: qemu-img's command line over the qimg library. Run by bin.ts (`node dist/cli.cjs <command> [options]`).

import { setFlagsFromString } from 'node:v8';
import { availableParallelism } from 'node:os';
import { runInNewContext } from 'node:vm';
import { basename } from 'node:path';
import packageJson from '../../package.json';
import { getopt, type OptionSpec } from './getopt.js';
import { CliError, PROGRAM, reportError, setProgramName, usageError, withLockNotice, type CliContext, type CliOutput } from './common.js';
import { cmdInfo } from './info.js';
import { cmdMap } from './map.js';
import { cmdConvert } from './convert.js';
import { cmdCreate } from './create.js';
import { cmdCheck } from './check.js';
import { cmdCompare } from './compare.js';
import { cmdResize } from './resize.js';
import { cmdSnapshot } from './snapshot.js';
import { cmdCommit } from './commit.js';
import { cmdRebase } from './rebase.js';

const VERSION: string = packageJson.version;

const help = (): string => `${PROGRAM} version ${VERSION} (qemu-img 7.2 compatible)
usage: ${PROGRAM} [standard options] command [command options]
Disk image utility (qcow2 and raw), speaking qemu-img's command line

    '-h', '--help'       display this help and exit
    '-V', '--version'    output version information and exit

Command syntax:
  check [-q] [-f fmt] [--output=ofmt] [-r [leaks | all]] [-U] filename
  commit [-q] [-f fmt] [-t cache] [-b base] [-r rate_limit] [-d] [-p] filename
  compare [-f fmt] [-F fmt] [-T src_cache] [-p] [-q] [-s] [-U] filename1 filename2
  convert [-U] [-c] [-f fmt] [-O output_fmt] [-B backing_file [-F backing_fmt]] [-o options] [-l snapshot_param] [-S sparse_size] [-m num] [-W] [--target-is-zero] [-n] [-p | -q] [--progress=json] filename [filename2 [...]] output_filename
  create [-q] [-f fmt] [-b backing_file [-F backing_fmt]] [-u] [-o options] filename [size]
  info [-f fmt] [--output=ofmt] [--backing-chain] [-U] filename
  map [-f fmt] [--output=ofmt] [--start-offset=offset] [--max-length=len] [-U] filename
  snapshot [-U] [-q] [-l | -a snapshot | -c snapshot | -d snapshot] filename
  rebase [-U] [-q] [-f fmt] [-t cache] [-T src_cache] [-p] [-u] -b backing_file [-F backing_fmt] filename
  resize [-f fmt] [--preallocation=prealloc] [-q] [--shrink] filename [+ | -]size

Supported formats: qcow2 raw

convert --progress=json prints one JSON object per line on stderr:
  {"type":"progress","done":<bytes>,"total":<bytes>,"percent":<0-100>} ... {"type":"done"}
  (done/total count the source's data bytes, as -p does; --progress=human is -p).
convert stops cleanly on SIGINT: writes in flight finish, the target is flushed and closed
  (consistent but incomplete), exit status 130.
`;

type Command = (args: string[], ctx: CliContext, showHelp: () => number) => Promise<number>;

const COMMANDS: Record<string, Command> = {
  check: cmdCheck,
  compare: cmdCompare,
  commit: cmdCommit,
  convert: cmdConvert,
  create: cmdCreate,
  info: cmdInfo,
  map: cmdMap,
  rebase: cmdRebase,
  resize: cmdResize,
  snapshot: cmdSnapshot,
};

const MAIN_OPTIONS: OptionSpec[] = [
  { key: 'help', short: 'h', long: 'help', hasArg: false },
  { key: 'version', short: 'V', long: 'version', hasArg: false },
  { key: 'trace', short: 'T', long: 'trace', hasArg: true },
];

/** Runs one qimg command line (argv without the node and script names); resolves with the exit status. */
export async function main(argv: readonly string[], ctx: CliContext): Promise<number> {
  try {
    if (argv.length < 1) throw usageError('Not enough arguments');
    const { options, operands } = getopt(argv, MAIN_OPTIONS, true);
    for (const o of options) {
      if (o.key === 'help') {
        ctx.stdout.write(help());
        return 0;
      }
      if (o.key === 'version') {
        ctx.stdout.write(`${PROGRAM} version ${VERSION} (qemu-img 7.2 compatible)\n`);
        return 0;
      }
    }
    if (operands.length < 1) return 0;
    const [name, ...rest] = operands as [string, ...string[]];
    const command = COMMANDS[name];
    if (!command) throw usageError(`Command not found: ${name}`);
    // Images opened without the locks they want (no native helpers) get a one-line notice.
    return await withLockNotice(ctx, () => command(rest, ctx, () => {
      ctx.stdout.write(help());
      return 0;
    }));
  } catch (e) {
    return reportError(ctx, e);
  }
}

/** A stdout/stderr writer that batches small writes (qemu-img's stdio buffering) into large ones. */
class BufferedOutput implements CliOutput {
  private chunks: string[] = [];
  private size = 0;
  constructor(private readonly fd: NodeJS.WriteStream) {}
  write(text: string): void {
    this.chunks.push(text);
    this.size += text.length;
    if (this.size >= 1 << 16) this.flush();
  }
  flush(): void {
    if (this.chunks.length === 0) return;
    const text = this.chunks.join('');
    this.chunks = [];
    this.size = 0;
    this.fd.write(text);
  }
}

/**
 * Young-generation collections when dead buffers pile up, for the CLI process. Streaming an image
 * allocates a few small ArrayBuffers per cluster (compressed outputs, zlib streams) and little else
 * on the JS heap, so V8 scavenges rarely and dead buffers accumulate: a 2 GiB `convert -c` peaked
 * at ~110 MiB RSS, ~35 MiB of it dead ArrayBuffers. Every 25 ms, when ArrayBuffer memory grew by
 * 8 MiB since the last collection, a minor GC (well under a millisecond with a small heap) frees
 * them: ~87 MiB. (Collecting on a fixed clock instead made V8 grow the young generation when
 * little was garbage.) The CLI owns its process, so it may expose gc; the library never does this.
 */
function startScavenging(): void {
  try {
    setFlagsFromString('--expose-gc');
    const gc = runInNewContext('gc') as ((options?: { type: 'minor' | 'major' }) => void) | undefined;
    if (typeof gc !== 'function') return;
    const external = (): number => process.memoryUsage().arrayBuffers;
    let base = external();
    setInterval(() => {
      const now = external();
      if (now - base < SCAVENGE_GROWTH) {
        base = Math.min(base, now);
        return;
      }
      gc({ type: 'minor' });
      base = external();
    }, 25).unref();
  } catch {
    // Not available (another runtime): nothing to do.
  }
}

/** External (ArrayBuffer) memory growth that triggers a minor GC. */
const SCAVENGE_GROWTH = 8 * 1024 * 1024;

/**
 * Holds V8's optimizing compiler back for the first OPTIMIZE_AFTER_MS of the CLI process. Most
 * commands finish within that time, and optimizing their hot functions costs more than it saves:
 * in a 0.3 s raw -> qcow2 convert of 1.2 GB, TurboFan's background compiles took ~90 ms of CPU on
 * a 2-core machine where the reads and writes were waiting for a core (with the budget raised:
 * ~15 ms, and the convert 10-15% faster). Longer commands get the usual budget back after that
 * time. Node 20's V8 (11.x) only, where it was measured and whose default budget is restored.
 */
function deferOptimization(): void {
  if (!process.versions.v8.startsWith('11.')) return;
  try {
    setFlagsFromString(`--interrupt-budget=${DEFERRED_INTERRUPT_BUDGET}`);
    setTimeout(() => setFlagsFromString(`--interrupt-budget=${V8_11_INTERRUPT_BUDGET}`), OPTIMIZE_AFTER_MS).unref();
  } catch {
    // Not available: nothing to do.
  }
}

const DEFERRED_INTERRUPT_BUDGET = 1_000_000;
/** V8 11's default --interrupt-budget (66 KiB of bytecode executed). */
const V8_11_INTERRUPT_BUDGET = 67_584;
const OPTIMIZE_AFTER_MS = 400;

async function run(): Promise<void> {
  // Both change V8 flags, which a code cache records: not while making the launcher's (see launch.ts).
  if (!process.env.QIMG_CODE_CACHE_WRITE) {
    deferOptimization();
    // Only commands that run long need it; a quick one exits before this (it costs ~1.5 ms to set up).
    setTimeout(startScavenging, 100).unref();
  }
  const stdout = new BufferedOutput(process.stdout);
  const stderr = new BufferedOutput(process.stderr);
  // A closed pipe on stdout (qimg map | head) ends quietly, as qemu-img ignores SIGPIPE and exits.
  process.stdout.on('error', () => process.exit(process.exitCode ?? 0));
  let code: number;
  try {
    // stdout is batched; an error message first pushes out what stdout holds, keeping their order.
    const ctx: CliContext = {
      stdout,
      stderr: {
        write: (t) => {
          stdout.flush();
          stderr.write(t);
          stderr.flush();
        },
      },
    };
    code = await main(process.argv.slice(2), ctx);
  } catch (e) {
    // main catches everything; this is the last line of defence against a stack trace.
    stderr.write(`${PROGRAM}: ${e instanceof Error ? e.message : String(e)}\n`);
    code = 1;
  }
  stdout.flush();
  stderr.flush();
  // Wait for the streams to drain, then exit even if worker threads (zstd) are still alive.
  await Promise.all([
    new Promise<void>((resolve) => process.stdout.write('', () => resolve())),
    new Promise<void>((resolve) => process.stderr.write('', () => resolve())),
  ]);
  process.exit(code);
}

/**
 * libuv's thread pool (file I/O, zlib, native zstd decoding) as large as the machine has cores,
 * unless UV_THREADPOOL_SIZE says otherwise; at least 2 (the default is 4 whatever the machine).
 * More threads than cores made writes to one file spin on its inode lock: on 2 cores, qcow2 -> raw
 * of the 2 GiB bench image took 1.1-1.9 s (1.7-2.7 s system time) in half the runs with 4 threads,
 * 0.32-0.34 s in every run with 2; zlib and zstd reading 30-40% faster. Must run before the pool's
 * first use.
 */
function sizeThreadPool(): void {
  if (process.env.UV_THREADPOOL_SIZE) return;
  process.env.UV_THREADPOOL_SIZE = String(Math.min(Math.max(availableParallelism(), 2), MAX_POOL_THREADS));
}

/** libuv's own limit is 1024; more than this many cores gain nothing here. */
const MAX_POOL_THREADS = 64;

/** Runs the command line of this process (process.argv) and exits with its status. */
export function runCli(): void {
  sizeThreadPool();
  // Started through a link named qemu-img: speak as qemu-img (its scripts match "qemu-img: ...").
  if (basename(process.argv[1] ?? '') === 'qemu-img') setProgramName('qemu-img');
  process.on('uncaughtException', (e) => {
    process.stderr.write(`${PROGRAM}: ${e instanceof Error ? e.message : String(e)}\n`);
    process.exit(1);
  });
  process.on('unhandledRejection', (e) => {
    process.stderr.write(`${PROGRAM}: ${e instanceof Error ? e.message : String(e)}\n`);
    process.exit(1);
  });
  void run();
}

export { CliError };
