// Two copies of the same input for commands that change images (commit, rebase): the inputs are
// made once (qemu-img create/bitmap/snapshot and qemu-io) in q/ and copied to o/; qemu-img runs in q/, qimg in o/, with the same relative file
// names, so their output is compared as is. Then every image qimg wrote is judged by QEMU: clean
// `qemu-img check`, and `qemu-img compare` equal to qemu-img's result, each file alone (its backing
// chain cut off) and as the chain it heads (unless the two files are identical byte for byte).

import { cp, mkdir, readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { expect } from 'vitest';
import { type RunResult, asQimg, qemuImg, qemuImgOk, qemuIoOk, qimg } from './harness.js';

/** One step of making the inputs: a qemu-img command line, or qemu-io commands on a file. */
export type Step = { img: string[] } | { io: [file: string, format: 'qcow2' | 'raw', ...cmds: string[]] };

export interface Twin {
  q: string;
  o: string;
}

export async function makeTwin(root: string, name: string, steps: Step[], subdirs: string[] = []): Promise<Twin> {
  const q = join(root, name, 'q');
  const o = join(root, name, 'o');
  await mkdir(q, { recursive: true });
  for (const s of subdirs) await mkdir(join(q, s), { recursive: true });
  for (const s of steps) {
    if ('img' in s) await qemuImgOk(s.img, q);
    else await qemuIoOk(s.io[0], s.io[1], s.io.slice(2), q);
  }
  // The second copy byte for byte (the files name each other by relative names only).
  await cp(q, o, { recursive: true });
  return { q, o };
}

/**
 * Keeps the first and the last of a run of progress lines: qemu-img's commit job prints one per
 * poll (as many as it happens to poll), at percentages that follow its copy requests in flight.
 */
export function normaliseProgress(stdout: string): string {
  return stdout.replace(/(    \(\s*[\d.]+\/100%\)\r)(?:    \(\s*[\d.]+\/100%\)\r)*(    \(\s*[\d.]+\/100%\)\r)/g, '$1$2');
}

/** Runs args with qemu-img in q/ and with qimg in o/; expects the same stdout, stderr and exit status. */
export async function runTwin(t: Twin, args: string[], options: { progress?: boolean } = {}): Promise<{ qemu: RunResult; ours: RunResult }> {
  const qemu = await qemuImg(args, t.q);
  const ours = await qimg(args, t.o);
  const norm = options.progress ? normaliseProgress : (s: string): string => s;
  expect({ code: ours.code, stdout: norm(ours.stdout), stderr: ours.stderr }).toEqual({
    code: qemu.code, stdout: norm(qemu.stdout), stderr: asQimg(qemu.stderr),
  });
  return { qemu, ours };
}

/** A file opened alone (backing cut off), as qemu-img's json: syntax names it. */
function alone(path: string, format: 'qcow2' | 'raw'): string {
  if (format === 'raw') return path;
  return `json:${JSON.stringify({ driver: 'qcow2', file: { driver: 'file', filename: path }, backing: null })}`;
}

/** A file of the inputs and how to judge it; `chain: false` when its backing file cannot be opened. */
export type FileSpec = [name: string, format: 'qcow2' | 'raw', options?: { chain?: boolean }];

/**
 * QEMU's verdict on qimg's files: a file byte-identical to qemu-img's result passes as is;
 * otherwise it checks clean (opened alone), equals qemu-img's result alone and as the chain it
 * heads (the backing format read from the header), and names the same backing file and format.
 */
export async function expectSameImages(t: Twin, files: FileSpec[]): Promise<void> {
  await Promise.all(files.map(async ([name, format, options]) => {
    const q = join(t.q, name);
    const o = join(t.o, name);
    if (Buffer.compare(await readFile(q), await readFile(o)) === 0) return;
    if (format === 'qcow2') {
      const check = await qemuImg(['check', alone(o, 'qcow2')], t.o);
      expect(check.code, `qemu-img check ${name}: ${check.stdout}${check.stderr}`).toBe(0);
    }
    const single = await qemuImg(['compare', alone(q, format), alone(o, format)], t.o);
    expect(single.code, `qemu-img compare of ${name} alone: ${single.stdout}${single.stderr}`).toBe(0);
    if (options?.chain !== false) {
      const chain = await qemuImg(['compare', '-f', format, '-F', format, q, o], t.o);
      expect(chain.code, `qemu-img compare of ${name}'s chain: ${chain.stdout}${chain.stderr}`).toBe(0);
    }
    if (format === 'qcow2') {
      const infoOf = async (path: string, cwd: string): Promise<unknown> => {
        const r = await qemuImgOk(['info', '--output=json', '-U', alone(path, 'qcow2')], cwd);
        const j = JSON.parse(r.stdout) as Record<string, unknown>;
        return { size: j['virtual-size'], backing: j['backing-filename'], backingFormat: j['backing-filename-format'] };
      };
      expect(await infoOf(o, t.o)).toEqual(await infoOf(q, t.q));
    }
  }));
}
