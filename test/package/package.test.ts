// The package as a user gets it: built once by tsup with the project's own config (what `npm run
// build` runs, into a temporary dist), packed by `npm pack`, unpacked into a temporary project's
// node_modules (no network; the project sits under this repository's node_modules, so the
// package's dependencies resolve from there as from an install). Then: the ESM and CommonJS
// entries load and work, the README's library example type-checks against the shipped .d.ts and
// runs as written (taken from README.md now, so a changed README is what gets tested), and the
// README's command line runs from the package; qemu-img judges every file made.

import { execFile } from 'node:child_process';
import { cpSync, mkdirSync, mkdtempSync, readFileSync, realpathSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { pathToFileURL } from 'node:url';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { ROOT } from '../helpers/bundle.js';
import { qemuImg, qemuImgResult, qemuIo, qemuMap, referenceRaw, run, type MapEntry, type ToolResult } from '../helpers/qemu.js';

const work = (() => {
  const cache = join(ROOT, 'node_modules', '.cache');
  mkdirSync(cache, { recursive: true });
  // Real path: Node reports resolved modules by it.
  return realpathSync(mkdtempSync(join(cache, 'qimg-package-')));
})();
afterAll(() => rmSync(work, { recursive: true, force: true }));

const pkgDir = join(work, 'pkg');
const app = join(work, 'app');
const installed = join(app, 'node_modules', 'qimg');

async function ok(cmd: string, args: string[], cwd: string): Promise<ToolResult> {
  const r = await run(cmd, args, { cwd });
  if (r.code !== 0) throw new Error(`${cmd} ${args.join(' ')} exited ${r.code}\n${r.stderr}${r.stdout}`);
  return r;
}

/** Runs node with extra environment variables; resolves with the exit code and output. */
function node(args: string[], cwd: string, env: NodeJS.ProcessEnv): Promise<ToolResult> {
  return new Promise((resolve) => {
    execFile(process.execPath, args, { cwd, encoding: 'utf8', env: { ...process.env, LC_ALL: 'C', ...env } }, (err, stdout, stderr) => {
      resolve({ code: err ? (typeof err.code === 'number' ? err.code : 1) : 0, stdout, stderr });
    });
  });
}

/** The `n`th (0: first) ```ts block under the README's "## Library" heading. */
function readmeLibraryExample(n = 0): string {
  const readme = readFileSync(join(ROOT, 'README.md'), 'utf8');
  const section = readme.indexOf('\n## Library\n');
  expect(section, 'README.md has a "## Library" section').toBeGreaterThan(0);
  const end = readme.indexOf('\n## ', section + 1);
  const blocks = [...readme.slice(section, end < 0 ? undefined : end).matchAll(/```ts\n([\s\S]*?)```/g)];
  expect(blocks.length, `a ${n + 1}. \`\`\`ts block under "## Library"`).toBeGreaterThan(n);
  return blocks[n]![1]!;
}

let packed: string[] = [];

beforeAll(async () => {
  mkdirSync(pkgDir);
  for (const f of ['package.json', 'README.md']) cpSync(join(ROOT, f), join(pkgDir, f));
  // npm run build: tsup (its config, every entry, the .d.ts), then the CLI's code cache.
  await ok(process.execPath, [join(ROOT, 'node_modules/tsup/dist/cli-default.js'), '--out-dir', join(pkgDir, 'dist')], ROOT);
  await ok(process.execPath, [join(ROOT, 'scripts/code-cache.mjs'), join(pkgDir, 'dist')], ROOT);
  const pack = await ok('npm', ['pack', '--json', '--offline', '--ignore-scripts', '--pack-destination', work], pkgDir);
  const [info] = JSON.parse(pack.stdout) as { filename: string; files: { path: string }[] }[];
  packed = info!.files.map((f) => f.path).sort();
  mkdirSync(installed, { recursive: true });
  await ok('tar', ['-xzf', join(work, info!.filename), '-C', installed, '--strip-components=1'], work);
  writeFileSync(join(app, 'package.json'), JSON.stringify({ name: 'qimg-package-test', private: true, type: 'module' }));
}, 180_000);

describe('the packed package', () => {
  it('holds every file package.json points at, and no sources or tests', () => {
    const pkg = JSON.parse(readFileSync(join(installed, 'package.json'), 'utf8')) as {
      main: string; module: string; types: string; bin: Record<string, string>;
      exports: { '.': { import: { types: string; default: string }; require: { types: string; default: string } } };
    };
    const e = pkg.exports['.'];
    const named = [pkg.main, pkg.module, pkg.types, ...Object.values(pkg.bin), e.import.types, e.import.default, e.require.types, e.require.default]
      .map((p) => p.replace(/^\.\//, ''));
    // The zstd workers' script sits next to the modules that start them.
    for (const p of [...named, 'dist/zstd-worker.js', 'dist/cli-main.cjs', 'dist/cli-main.cache']) expect(packed, p).toContain(p);
    expect(packed.filter((p) => !p.startsWith('dist/') && !['package.json', 'README.md'].includes(p))).toEqual([]);
  });

  it('ESM: import { createImage, openImage } from "qimg" resolves to dist/index.js and writes a qcow2 QEMU reads', async () => {
    writeFileSync(join(app, 'esm.mjs'), `
import { createImage, openImage } from 'qimg';
console.log(import.meta.resolve('qimg'));
await createImage('esm.qcow2', { format: 'qcow2', size: 4 << 20 });
const { image } = await openImage('esm.qcow2', { readOnly: false });
await image.write(65536 + 100, new Uint8Array(5000).fill(0x3c));
await image.close();
`);
    const r = await ok(process.execPath, ['esm.mjs'], app);
    expect(r.stdout.trim()).toBe(pathToFileURL(join(installed, 'dist/index.js')).href);
    const check = await qemuImgResult(['check', 'esm.qcow2'], { cwd: app });
    expect(check.code, check.stdout).toBe(0);
    const bytes = await referenceRaw(join(app, 'esm.qcow2'));
    const expected = Buffer.alloc(4 << 20);
    expected.fill(0x3c, 65536 + 100, 65536 + 5100);
    expect(bytes.equals(expected)).toBe(true);
  });

  it('CommonJS: require("qimg") resolves to dist/index.cjs; its zstd workers compress what QEMU decompresses', async () => {
    writeFileSync(join(app, 'cjs.cjs'), `
const { createImage, openImage } = require('qimg');
console.log(require.resolve('qimg'));
(async () => {
  await createImage('cjs.qcow2', { format: 'qcow2', size: 4 << 20, compressionType: 'zstd' });
  const { image } = await openImage('cjs.qcow2', { readOnly: false });
  const data = new Uint8Array(1 << 20);
  for (let i = 0; i < data.length; i++) data[i] = (i * 7) % 251;
  await image.writeCompressed(1 << 20, data);
  await image.close();
})().catch((e) => { console.error(e); process.exit(1); });
`);
    // One worker whatever the zstd engine; NODE_DEBUG=worker: Node prints the script of each Worker
    // started, which must be the package's own, next to index.cjs.
    const r = await node(['cjs.cjs'], app, { QIMG_ZSTD_THREADS: '1', NODE_DEBUG: 'worker' });
    expect(r.code, r.stderr).toBe(0);
    expect(r.stdout.trim()).toBe(join(installed, 'dist/index.cjs'));
    expect(r.stderr).toContain(`[0] create new worker ${join(installed, 'dist/zstd-worker.js')}`);
    const check = await qemuImgResult(['check', 'cjs.qcow2'], { cwd: app });
    expect(check.code, check.stdout).toBe(0);
    const map = await qemuMap(join(app, 'cjs.qcow2'));
    // qemu-img 7.2 maps compressed clusters as data without a host offset.
    expect(map.filter((e) => e.data && e.offset === undefined).reduce((n, e) => n + e.length, 0)).toBe(1 << 20);
    const bytes = await referenceRaw(join(app, 'cjs.qcow2'));
    const expected = Buffer.alloc(4 << 20);
    for (let i = 0; i < 1 << 20; i++) expected[(1 << 20) + i] = (i * 7) % 251;
    expect(bytes.equals(expected)).toBe(true);
  });

  it("the README's library examples type-check against the shipped .d.ts (ESM), and a CommonJS consumer against .d.cts", async () => {
    writeFileSync(join(app, 'example.mts'), readmeLibraryExample());
    writeFileSync(join(app, 'example-2.mts'), readmeLibraryExample(1));
    // Declaration files are not checked themselves (skipLibCheck: checking @types/node costs
    // seconds), so a type the .d.ts failed to resolve would become 'any' and let anything pass.
    // Each @ts-expect-error below marks a type error that exists only while the declarations are
    // real: were they 'any', the directive would be unused, which tsc reports.
    writeFileSync(join(app, 'consumer.cts'), `
import qimg = require('qimg');
export async function make(file: string): Promise<number> {
  const r = await qimg.createImage(file, { format: 'qcow2', size: 1 << 20 });
  return r.virtualSize;
}
export async function wrong(file: string): Promise<void> {
  // @ts-expect-error an option createImage does not have
  await qimg.createImage(file, { format: 'qcow2', size: 1 << 20, clusterSizes: 512 });
}
`);
    writeFileSync(join(app, 'real-types.mts'), `
import { createImage, openImage, memoryGate, MemoryStorage, type BlockStatus } from 'qimg';
import type * as cjs from './consumer.cjs';
const { image } = await openImage('x.qcow2', { gate: memoryGate(new Map([['b', new MemoryStorage()]])) });
// @ts-expect-error read resolves to bytes
export const a: string = await image.read(0, 1);
// @ts-expect-error a size is a number
export const b: string = image.virtualSize;
// @ts-expect-error an option createImage does not have
await createImage('y.qcow2', { format: 'qcow2', size: 1, clusterSizes: 512 });
// @ts-expect-error block status offsets are numbers
export const c: string = ({} as BlockStatus).offset;
// @ts-expect-error make resolves to a number
export const d: string = await ({} as typeof cjs).make('z');
`);
    writeFileSync(join(app, 'tsconfig.json'), JSON.stringify({
      compilerOptions: { target: 'ES2022', module: 'NodeNext', moduleResolution: 'NodeNext', strict: true, noEmit: true, types: ['node'], skipLibCheck: true },
      files: ['example.mts', 'example-2.mts', 'consumer.cts', 'real-types.mts'],
    }));
    const tsc = await run(process.execPath, [join(ROOT, 'node_modules/typescript/bin/tsc'), '-p', 'tsconfig.json'], { cwd: app });
    expect(tsc.code, tsc.stdout + tsc.stderr).toBe(0);
  });

  it("the README's library example runs as written; its output and files are what QEMU sees", async () => {
    const dir = join(app, 'readme');
    mkdirSync(dir);
    writeFileSync(join(dir, 'example.mjs'), readmeLibraryExample());
    // The example's input: disk.qcow2 over a backing file, with data, zeros and unallocated ranges.
    await qemuImg(['create', '-q', '-f', 'qcow2', 'base.qcow2', '2M'], { cwd: dir });
    await qemuIo('base.qcow2', ['write -P 0x11 0 192k', 'write -P 0x22 1M 64k'], { cwd: dir });
    await qemuImg(['create', '-q', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', 'disk.qcow2'], { cwd: dir });
    await qemuIo('disk.qcow2', ['write -P 0x33 64k 64k', 'write -z 1M 64k'], { cwd: dir });
    // console.log as JSON lines, so that what the example prints can be compared.
    writeFileSync(join(dir, 'capture.mjs'), `console.log = (v) => process.stdout.write(JSON.stringify(v) + '\\n');\n`);
    const r = await run(process.execPath, ['--import', './capture.mjs', 'example.mjs'], { cwd: dir });
    expect(r.code, r.stderr).toBe(0);
    const lines = r.stdout.trim().split('\n').map((l) => JSON.parse(l) as Record<string, unknown>);
    const info = lines.pop()!;
    // The block status runs it printed are QEMU's map of disk.qcow2 (runs merged the same way).
    const merge = (runs: { start: number; length: number; data: boolean; zero: boolean; depth: number; present: boolean }[]) => {
      const out: typeof runs = [];
      for (const x of runs) {
        const last = out[out.length - 1];
        if (last && last.start + last.length === x.start && last.data === x.data && last.zero === x.zero && last.depth === x.depth && last.present === x.present) last.length += x.length;
        else out.push({ ...x });
      }
      return out;
    };
    const theirs = merge((await qemuMap(join(dir, 'disk.qcow2'))).map((e: MapEntry) => ({ start: e.start, length: e.length, data: e.data, zero: e.zero, depth: e.depth, present: e.present })));
    const ours = merge(lines.map((l) => ({ start: l.offset as number, length: l.length as number, data: l.data as boolean, zero: l.zero as boolean, depth: l.depth as number, present: l.present as boolean })));
    expect(ours).toEqual(theirs);
    expect(theirs.some((e) => e.depth === 1 && e.data)).toBe(true);
    const qinfo = JSON.parse((await qemuImg(['info', '--output=json', 'disk.qcow2'], { cwd: dir })).stdout) as Record<string, unknown>;
    expect({ format: info.format, virtualSize: info.virtualSize, clusterSize: info.clusterSize, backing: info.backingFilename }).toEqual({
      format: qinfo.format, virtualSize: qinfo['virtual-size'], clusterSize: qinfo['cluster-size'], backing: qinfo['backing-filename'],
    });

    // new.qcow2: QEMU finds it clean, sized and laid out as asked, and reading what the example
    // wrote (the same writes done by qemu-io on a qemu-img image give the same bytes).
    const check = await qemuImgResult(['check', 'new.qcow2'], { cwd: dir });
    expect(check.code, check.stdout).toBe(0);
    const ninfo = JSON.parse((await qemuImg(['info', '--output=json', 'new.qcow2'], { cwd: dir })).stdout) as Record<string, unknown>;
    expect({ size: ninfo['virtual-size'], cluster: ninfo['cluster-size'] }).toEqual({ size: 1 << 30, cluster: 65536 });
    await qemuImg(['create', '-q', '-f', 'qcow2', 'ref.qcow2', '1G'], { cwd: dir });
    await qemuIo('ref.qcow2', ['write -P 0x5a 4096 8192', 'write -z -u 1M 1M'], { cwd: dir });
    const cmp = await qemuImgResult(['compare', 'new.qcow2', 'ref.qcow2'], { cwd: dir });
    expect(cmp.stdout + cmp.stderr).toBe('Images are identical.\n');
    expect(await qemuMap(join(dir, 'new.qcow2'))).toEqual(await qemuMap(join(dir, 'ref.qcow2')));
  });

  it("the README's second library example (compare, commit, rebase) runs as written; QEMU judges the files", async () => {
    const dir = join(app, 'readme-2');
    mkdirSync(dir);
    writeFileSync(join(dir, 'example.mjs'), readmeLibraryExample(1));
    const q = (args: string[]): Promise<ToolResult> => qemuImg(args, { cwd: dir });
    // a.qcow2 and its raw copy b.raw; top.qcow2 over base.qcow2; overlay.qcow2 over old.qcow2, to move onto new-base.qcow2.
    await Promise.all(['a', 'base', 'old', 'new-base'].map((f) => q(['create', '-q', '-f', 'qcow2', `${f}.qcow2`, '2M'])));
    await Promise.all([
      qemuIo('a.qcow2', ['write -P 0x44 64k 128k'], { cwd: dir }),
      qemuIo('base.qcow2', ['write -P 0x11 0 1M'], { cwd: dir }),
      qemuIo('old.qcow2', ['write -P 0x55 0 2M'], { cwd: dir }),
      qemuIo('new-base.qcow2', ['write -P 0x66 512k 1M'], { cwd: dir }),
    ]);
    await q(['convert', '-O', 'raw', 'a.qcow2', 'b.raw']);
    await q(['create', '-q', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', 'top.qcow2']);
    await q(['create', '-q', '-f', 'qcow2', '-b', 'old.qcow2', '-F', 'qcow2', 'overlay.qcow2']);
    await Promise.all([
      qemuIo('top.qcow2', ['write -P 0x22 512k 1M', 'write -z 0 64k'], { cwd: dir }),
      qemuIo('overlay.qcow2', ['write -P 0x77 0 64k'], { cwd: dir }),
    ]);
    // What the guest sees before: the top chain (to land in base.qcow2) and the overlay's chain (to stay as it is).
    await Promise.all([q(['convert', '-O', 'raw', 'top.qcow2', 'top-view.raw']), q(['convert', '-O', 'raw', 'overlay.qcow2', 'overlay-view.raw'])]);
    const r = await run(process.execPath, ['example.mjs'], { cwd: dir });
    expect({ code: r.code, stderr: r.stderr }).toEqual({ code: 0, stderr: '' });
    expect(r.stdout).toBe("{ kind: 'identical' }\n");
    for (const f of ['base.qcow2', 'top.qcow2', 'overlay.qcow2']) expect((await qemuImgResult(['check', f], { cwd: dir })).code, f).toBe(0);
    const same = async (x: string, fx: string, y: string): Promise<string> => {
      const c = await qemuImgResult(['compare', '-f', fx, '-F', 'raw', x, y], { cwd: dir });
      return c.stdout + c.stderr;
    };
    // Committed: base.qcow2 alone reads as the top chain did, and top.qcow2 (emptied) still does.
    expect(await same('base.qcow2', 'qcow2', 'top-view.raw')).toBe('Images are identical.\n');
    expect(await same('top.qcow2', 'qcow2', 'top-view.raw')).toBe('Images are identical.\n');
    // Rebased: the overlay names new-base.qcow2 and its guest still sees what it saw.
    const info = JSON.parse((await q(['info', '--output=json', 'overlay.qcow2'])).stdout) as Record<string, unknown>;
    expect({ backing: info['backing-filename'], format: info['backing-filename-format'] }).toEqual({ backing: 'new-base.qcow2', format: 'qcow2' });
    expect(await same('overlay.qcow2', 'qcow2', 'overlay-view.raw')).toBe('Images are identical.\n');
  });

  it("the README's command line from the package: create and info print what qemu-img prints", async () => {
    const ours = join(app, 'cli-ours');
    const theirs = join(app, 'cli-theirs');
    mkdirSync(ours);
    mkdirSync(theirs);
    const cli = join(installed, 'dist/cli.cjs');
    const [c1, c2] = await Promise.all([
      run(process.execPath, [cli, 'create', '-f', 'qcow2', 'sample.qcow2', '1G'], { cwd: ours }),
      run('qemu-img', ['create', '-f', 'qcow2', 'sample.qcow2', '1G'], { cwd: theirs }),
    ]);
    expect({ code: c1.code, stdout: c1.stdout, stderr: c1.stderr }).toEqual({ code: 0, stdout: c2.stdout, stderr: '' });
    const [i1, i2] = await Promise.all([
      run(process.execPath, [cli, 'info', 'sample.qcow2'], { cwd: ours }),
      run('qemu-img', ['info', 'sample.qcow2'], { cwd: theirs }),
    ]);
    expect({ code: i1.code, stdout: i1.stdout, stderr: i1.stderr }).toEqual({ code: 0, stdout: i2.stdout, stderr: '' });
    expect(readFileSync(join(ours, 'sample.qcow2')).equals(readFileSync(join(theirs, 'sample.qcow2')))).toBe(true);
  });
});
