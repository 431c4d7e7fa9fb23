// A long-lived qimg command line for tests (bundled by global.ts as cli-server.js, started by
// test/cli/harness.ts): runs one command line at a time through main(), the CLI's own dispatch,
// in the directory the test asks for, and answers with its exit status and output. Starting Node
// costs ~0.15 s of CPU on a 2-core CI machine, and the suite runs qimg ~750 times; a server per
// test file saves most of that. Tests about the process itself (environment variables, signals,
// the launcher) run real processes: the harness sends only plain command lines here.
//
// A command must leave nothing running behind it (a real process would have exited): when it
// leaves more active handles than it found, this server answers and then exits, so the next
// command gets a fresh process.

import { main } from '../../src/cli/main.js';
import type { CliContext } from '../../src/cli/common.js';

interface Request {
  id: number;
  args: string[];
  cwd: string;
}

interface Reply {
  id: number;
  code: number;
  stdout: string;
  stderr: string;
  /** The server exits after this reply. */
  retiring: boolean;
}

let current: { id: number; out: string[]; err: string[] } | undefined;

// Anything written to the process's own streams during a command is part of its output.
const realStdout = process.stdout.write.bind(process.stdout);
const realStderr = process.stderr.write.bind(process.stderr);
process.stdout.write = ((chunk: string | Uint8Array, ...rest: unknown[]) => {
  if (current) {
    current.out.push(typeof chunk === 'string' ? chunk : Buffer.from(chunk).toString());
    return true;
  }
  return (realStdout as (...a: unknown[]) => boolean)(chunk, ...rest);
}) as typeof process.stdout.write;
process.stderr.write = ((chunk: string | Uint8Array, ...rest: unknown[]) => {
  if (current) {
    current.err.push(typeof chunk === 'string' ? chunk : Buffer.from(chunk).toString());
    return true;
  }
  return (realStderr as (...a: unknown[]) => boolean)(chunk, ...rest);
}) as typeof process.stderr.write;

function send(reply: Reply): Promise<void> {
  return new Promise((resolve) => process.send!(reply, undefined, {}, () => resolve()));
}

// As runCli: an exception nothing caught ends the command with one line and status 1.
async function die(e: unknown): Promise<void> {
  const c = current;
  if (c) {
    c.err.push(`qimg: ${e instanceof Error ? e.message : String(e)}\n`);
    current = undefined;
    await send({ id: c.id, code: 1, stdout: c.out.join(''), stderr: c.err.join(''), retiring: true });
  }
  process.exit(1);
}
process.on('uncaughtException', (e) => void die(e));
process.on('unhandledRejection', (e) => void die(e));

/** Active handles and requests by kind, less the server's own (IPC channel, stdio). */
function resources(): Map<string, number> {
  const m = new Map<string, number>();
  for (const r of process.getActiveResourcesInfo()) m.set(r, (m.get(r) ?? 0) + 1);
  return m;
}

function leftBehind(before: Map<string, number>, after: Map<string, number>): string[] {
  const extra: string[] = [];
  for (const [k, n] of after) if (n > (before.get(k) ?? 0)) extra.push(k);
  return extra;
}

process.on('message', (req: Request) => {
  void (async () => {
    const before = resources();
    process.chdir(req.cwd);
    current = { id: req.id, out: [], err: [] };
    const c = current;
    const ctx: CliContext = {
      stdout: { write: (t) => void c.out.push(t) },
      stderr: { write: (t) => void c.err.push(t) },
    };
    let code: number;
    try {
      code = await main(req.args, ctx);
    } catch (e) {
      c.err.push(`qimg: ${e instanceof Error ? e.message : String(e)}\n`);
      code = 1;
    }
    // Let callbacks already due run (closing files), then see whether anything is still going.
    await new Promise((r) => setImmediate(r));
    current = undefined;
    const retiring = leftBehind(before, resources()).length > 0;
    await send({ id: req.id, code, stdout: c.out.join(''), stderr: c.err.join(''), retiring });
    if (retiring) process.exit(0);
  })();
});
