// Runs the qimg CLI (bundled once per test run by test/setup/global.ts, like tsup's bundle) side by
// side with the real qemu-img on the same files.

import { execFile } from 'node:child_process';
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

export async function qimg(args: string[], cwd: string, env: NodeJS.ProcessEnv = {}): Promise<RunResult> {
  return exec(process.execPath, [await cliPath(), ...args], cwd, env);
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
