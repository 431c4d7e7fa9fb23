// Linked under the name qemu-img, qimg is a drop-in: its messages start with "qemu-img:" and its
// hints name qemu-img, so scripts matching qemu-img's text keep working. Each command line runs
// through the real qemu-img and through a link named qemu-img to qimg's bundled CLI, on the same
// files; stdout, stderr and exit status must be equal, without translating program names.

import { symlinkSync } from 'node:fs';
import { join } from 'node:path';
import { beforeAll, describe, expect, it } from 'vitest';
import { run, tmpDir } from '../helpers/qemu.js';
import { cliPath, qemuImgOk } from './harness.js';

const dir = tmpDir('qimg-progname-');
const link = join(dir, 'bin', 'qemu-img');

beforeAll(async () => {
  await run('mkdir', ['-p', join(dir, 'bin')]);
  symlinkSync(await cliPath(), link);
  await qemuImgOk(['create', '-q', '-f', 'qcow2', 'b.qcow2', '1M'], dir);
  await qemuImgOk(['create', '-q', '-f', 'qcow2', '-b', 'b.qcow2', '-F', 'qcow2', 't.qcow2'], dir);
  await qemuImgOk(['create', '-q', '-f', 'raw', 'r.raw', '1M'], dir);
});

const LINES: string[][] = [
  ['snapshot', '-d', 'nosuch', 't.qcow2'],
  ['snapshot', '-c', 'x', 'r.raw'],
  ['snapshot', '-x', 't.qcow2'],
  ['commit', 'b.qcow2'],
  ['commit', '-r', 'abc', 't.qcow2'],
  ['rebase', 't.qcow2'],
  ['compare', 't.qcow2', 'nosuch'],
  ['compare', 't.qcow2'],
  ['info', 'nosuch'],
  ['check', 'nosuch'],
  ['resize', 't.qcow2', '-5G'],
  ['convert', '-O', 'qcow2', 'nosuch', 'o.qcow2'],
];

describe('qimg started through a link named qemu-img', () => {
  it.concurrent.each(LINES.map((l) => [l.join(' '), l] as const))('%s: the same text as qemu-img, program name included', async (_n, args) => {
    const [theirs, ours] = await Promise.all([run('qemu-img', args, { cwd: dir }), run(process.execPath, [link, ...args], { cwd: dir })]);
    expect(theirs.code, theirs.stderr).not.toBe(0);
    expect(theirs.stderr).toMatch(/^qemu-img: /m);
    expect(ours).toEqual(theirs);
  });

  it('names itself qemu-img in its help, and qimg when run under its own name', async () => {
    const help = await run(process.execPath, [link, '--help'], { cwd: dir });
    expect(help.stdout).toMatch(/^usage: qemu-img \[standard options\]/m);
    const own = await run(process.execPath, [await cliPath(), 'rebase', 't.qcow2'], { cwd: dir });
    expect(own.stderr).toBe("qimg: Must specify backing file (-b) or use unsafe mode (-u)\nTry 'qimg --help' for more information\n");
  });
});
