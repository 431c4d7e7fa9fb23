// The qimg executable (dist/cli.cjs): runs the CLI bundle beside it (cli-main.cjs) through V8's
// code cache (cli-main.cache), so that a command does not compile the bundle's functions from
// source first. Node 20 has no compile cache of its own (Node 22's module.enableCompileCache);
// here that compilation was ~13 ms of a 70 ms `qimg convert` of a small image.
//
// The cache is made when the package is built (scripts/code-cache.mjs runs a few commands with
// QIMG_CODE_CACHE_WRITE set; each run adds the functions it compiled). V8 accepts a cache only from
// its own version and flags, and checks the source's length, not its text: so the build also ends
// the bundle with a random build id and starts the cache with the same id, and a cache whose id
// differs is never handed to V8. Without a usable cache (another Node, a rebuilt bundle), the
// bundle is compiled as usual.

import { readFileSync, writeFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import path from 'node:path';
import vm from 'node:vm';

/** The line the build appends to the bundle; the cache file starts with the same text. */
export const BUILD_ID_MARK = '\n//# qimg-build-id=';
/** Hex digits of a build id. */
export const BUILD_ID_LENGTH = 32;

/** The build id at the end of the bundle's source, or null. */
export function buildIdOf(source: string): string | null {
  const at = source.lastIndexOf(BUILD_ID_MARK);
  if (at < 0) return null;
  const id = source.slice(at + BUILD_ID_MARK.length).trim();
  return /^[0-9a-f]+$/.test(id) && id.length === BUILD_ID_LENGTH ? id : null;
}

/** The cache file's header: the build id it was made for. */
export function cacheHeader(id: string): Buffer {
  return Buffer.from(`${BUILD_ID_MARK}${id}\n`, 'latin1');
}

/** Runs `bundle` (a CommonJS file) as a module, with the code cache at `cacheFile` when it fits. */
export function launch(bundle: string, cacheFile: string): void {
  const source = readFileSync(bundle, 'utf8');
  const id = buildIdOf(source);
  // import() inside a vm.Script needs a loader (experimental in Node 20, and it warns on stderr):
  // a bundle using it is loaded the plain way.
  if (!id || source.includes('import(')) {
    createRequire(bundle)(bundle);
    return;
  }
  const header = cacheHeader(id);
  let cachedData: Buffer | undefined;
  try {
    const file = readFileSync(cacheFile);
    if (file.length > header.length && file.subarray(0, header.length).equals(header)) cachedData = file.subarray(header.length);
  } catch {
    // No cache: compile from source.
  }
  // As Node wraps a CommonJS module (one line, so line numbers stay the bundle's).
  const wrapped = `(function (exports, require, module, __filename, __dirname) { ${source}\n})`;
  const script = new vm.Script(wrapped, { filename: bundle, cachedData });
  if (process.env.QIMG_CODE_CACHE_WRITE) {
    // Made at exit: it then holds every function this run compiled (and those the cache gave).
    process.once('exit', () => {
      try {
        writeFileSync(cacheFile, Buffer.concat([header, script.createCachedData()]));
      } catch (e) {
        process.stderr.write(`qimg: could not write the code cache ${cacheFile}: ${e instanceof Error ? e.message : String(e)}\n`);
      }
    });
  }
  if (process.env.QIMG_CODE_CACHE_DEBUG) {
    process.stderr.write(`qimg: code cache ${cachedData ? (script.cachedDataRejected ? 'rejected' : 'used') : 'absent'}\n`);
  }
  const fn = script.runInThisContext() as (...args: unknown[]) => void;
  const mod = { exports: {} };
  fn.call(mod.exports, mod.exports, createRequire(bundle), mod, bundle, path.dirname(bundle));
}
