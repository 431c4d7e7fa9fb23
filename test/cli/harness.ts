// Runs the qimg CLI (bundled once per test run by test/setup/global.ts, like tsup's bundle) side by
// side with the real qemu-img on the same files.
//
// Plain command lines go to a few long-lived CLI servers (test/setup/cli-server.ts: main(), the
// CLI's own dispatch, one command at a time in the test's directory), since a Node process start
// costs ~0.15 s of CPU on a 2-core machine and the suite runs qimg ~750 times. A call with
// environment variables runs a real process, as does every call when QIMG_TEST_CLI=process.

import { type ChildProcess, execFile, fork } from 'node:child_process';
import { availableParallelism } from 'node:os';
import { ROOT, bundles } from '../helpers/bundle.js';
export interface RunResult {
  code: number;
  stdout: string;
  stderr: string;
}

/** The path of the bundled cli.js (async for the callers that await it). */
export function cliPath(): Promise<string> {
  return Promise.resolve(bundles().cli);
}

function exec(cmd: string, args: string[], cwd: string, env: NodeJS.ProcessEnv = {}): Promise<RunResult> {
  return new Promise((resolvePromise, reject) => {
    execFile(
      cmd,
      args,
      { cwd, encoding: 'utf8', maxBuffer: 256 * 1024 * 1024, env: { ...process.env, LC_ALL: 'C', ...env } },
      (err, stdout, stderr) => {
        if (err && typeof (err as NodeJS.ErrnoException).code === 'string') {
          reject(err);
          return;
        }
        const code = err ? ((err as { code?: number }).code ?? 1) : 0;
        resolvePromise({ code: typeof code === 'number' ? code : 1, stdout, stderr });
      },
    );
  });
}

/** qimg as its own process (what a user runs). */
export async function qimgProcess(args: string[], cwd: string, env: NodeJS.ProcessEnv = {}): Promise<RunResult> {
  return exec(process.execPath, [await cliPath(), ...args], cwd, env);
}

export async function qimg(args: string[], cwd: string, env: NodeJS.ProcessEnv = {}): Promise<RunResult> {
  if (Object.keys(env).length > 0 || process.env.QIMG_TEST_CLI === 'process') return qimgProcess(args, cwd, env);
  return serverRun(args, cwd);
}

// ---- the CLI servers ------------------------------------------------------------------------

interface Server {
  child: ChildProcess;
  busy: boolean;
  /** The reply awaited, with what to do when it comes (or the server dies). */
  pending?: { id: number; resolve: (r: RunResult) => void; reject: (e: Error) => void };
}

/** Servers per test file: tests run a few commands at once (Promise.all), rarely more. */
const MAX_SERVERS = 3;
const servers: Server[] = [];
const waiting: (() => void)[] = [];
let nextId = 0;

function startServer(): Server {
  const child = fork(bundles().cliServer, [], {
    cwd: ROOT,
    // As the real CLI sizes libuv's pool (src/cli/main.ts); LC_ALL as for every tool run here.
    env: { ...process.env, LC_ALL: 'C', UV_THREADPOOL_SIZE: process.env.UV_THREADPOOL_SIZE ?? String(Math.max(2, availableParallelism())) },
    stdio: ['ignore', 'inherit', 'inherit', 'ipc'],
    serialization: 'json',
  });
  const server: Server = { child, busy: false };
  const drop = (why: string): void => {
    const i = servers.indexOf(server);
    if (i >= 0) servers.splice(i, 1);
    server.pending?.reject(new Error(`qimg CLI server ${why}`));
    server.pending = undefined;
    waiting.shift()?.();
  };
  child.on('message', (m: RunResult & { id: number; retiring: boolean }) => {
    const p = server.pending;
    if (!p || p.id !== m.id) return;
    server.pending = undefined;
    if (m.retiring) {
      const i = servers.indexOf(server);
      if (i >= 0) servers.splice(i, 1);
    }
    p.resolve({ code: m.code, stdout: m.stdout, stderr: m.stderr });
  });
  child.on('exit', (code, signal) => drop(`exited (${signal ?? code})`));
  child.on('error', (e) => drop(`failed: ${e.message}`));
  idle(server);
  servers.push(server);
  return server;
}

/** An idle server does not keep the test process alive. */
function idle(server: Server): void {
  server.busy = false;
  server.child.unref();
  (server.child.channel as { unref?: () => void } | undefined)?.unref?.();
}

async function serverRun(args: string[], cwd: string): Promise<RunResult> {
  let server = servers.find((s) => !s.busy);
  while (!server) {
    if (servers.length < MAX_SERVERS) {
      server = startServer();
      break;
    }
    await new Promise<void>((resolve) => waiting.push(resolve));
    server = servers.find((s) => !s.busy);
  }
  const s = server;
  s.busy = true;
  s.child.ref();
  (s.child.channel as { ref?: () => void } | undefined)?.ref?.();
  const id = nextId++;
  try {
    return await new Promise<RunResult>((resolve, reject) => {
      s.pending = { id, resolve, reject };
      s.child.send({ id, args, cwd });
    });
  } finally {
    idle(s);
    waiting.shift()?.();
  }
}

export function qemuImg(args: string[], cwd: string, env: NodeJS.ProcessEnv = {}): Promise<RunResult> {
  return exec('qemu-img', args, cwd, env);
}

export async function qemuImgOk(args: string[], cwd: string): Promise<RunResult> {
  const r = await qemuImg(args, cwd);
  if (r.code !== 0) throw new Error(`qemu-img ${args.join(' ')} failed (${r.code}): ${r.stderr}`);
  return r;
}

export async function qemuIoOk(file: string, format: 'qcow2' | 'raw', cmds: string[], cwd: string): Promise<void> {
  const args = ['-f', format];
  for (const c of cmds) args.push('-c', c);
  args.push(file);
  const r = await exec('qemu-io', args, cwd);
  if (r.code !== 0 || /failed|error/i.test(r.stdout + r.stderr)) {
    throw new Error(`qemu-io ${args.join(' ')} failed (${r.code}): ${r.stdout}${r.stderr}`);
  }
}

/** qemu-img's stderr with our program name, for comparing error output. */
export function asQimg(stderr: string): string {
  return stderr.replace(/^qemu-img: /gm, 'qimg: ').replace(/'qemu-img --help'/g, "'qimg --help'");
}

/**
 * Runs the same command with qemu-img and qimg, one right after the other on the same files, and
 * returns both results. `disk size`/`actual-size` and map output depend on the file's allocation at
 * that moment; if they differ, both are run once more (writeback may have changed allocation).
 */
export async function both(args: string[], cwd: string, env: NodeJS.ProcessEnv = {}): Promise<{ qemu: RunResult; ours: RunResult }> {
  let qemu = await qemuImg(args, cwd, env);
  let ours = await qimg(args, cwd, env);
  if (qemu.stdout !== ours.stdout) {
    qemu = await qemuImg(args, cwd, env);
    ours = await qimg(args, cwd, env);
  }
  return { qemu, ours };
}

export { ROOT };
