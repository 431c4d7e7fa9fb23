// qimg check: qemu-img 7.2's img_check — human and JSON reports, -r leaks|all with the second
// "double checking" pass, and its exit codes (0 clean, 1 check failed, 2 corruptions, 3 leaks,
// 63 format without checks).

import type { Storage } from '../io/storage.js';
import { FileStorage } from '../io/file.js';
import { fileGate } from '../io/gate.js';
import { openImage, probeFormat } from '../open.js';
import { checkQcow2, markClean, type CheckResult, type RepairMode } from '../qcow2/check.js';
import { parseHeader } from '../qcow2/header.js';
import { readFullZeroFill } from '../io/storage.js';
import { INCOMPAT_DATA_FILE } from '../qcow2/layout.js';
import { getopt, type OptionSpec } from './getopt.js';
import { CliError, PROGRAM, checkFormat, errorText, openError, usageError, type CliContext } from './common.js';
import { dataFilePerms, forceShared, imageFilePerms, userPerms, type LockPerms } from '../io/lock.js';
import type { Image } from '../image.js';
import { QDict, toJsonPretty } from './qobject.js';
import { formatFixed } from './cformat.js';
import { parseOutputFormat } from './info.js';

const OPTIONS: OptionSpec[] = [
  { key: 'help', short: 'h', long: 'help', hasArg: false },
  { key: 'format', short: 'f', long: 'format', hasArg: true },
  { key: 'repair', short: 'r', long: 'repair', hasArg: true },
  { key: 'output', long: 'output', hasArg: true },
  { key: 'object', long: 'object', hasArg: true },
  { key: 'image-opts', long: 'image-opts', hasArg: false },
  { key: 'force-share', short: 'U', long: 'force-share', hasArg: false },
  { key: 'T', short: 'T', hasArg: true },
  { key: 'quiet', short: 'q', hasArg: false },
];

/** qemu-img's ImageCheck as printed (the *_fixed counts come from the repairing pass). */
interface ImageCheck extends CheckResult {
  filename: string;
  format: string;
}

export async function cmdCheck(args: string[], ctx: CliContext, showHelp: () => number): Promise<number> {
  const { options, operands } = getopt(args, OPTIONS, false, 'check');
  let fmt: string | undefined;
  let output: string | undefined;
  let repair: RepairMode | undefined;
  let quiet = false;
  let forceShare = false;
  for (const o of options) {
    switch (o.key) {
      case 'help':
        return showHelp();
      case 'format':
        fmt = o.value;
        break;
      case 'repair':
        if (o.value === 'leaks' || o.value === 'all') repair = o.value;
        else throw usageError(`Unknown option value for -r (expecting 'leaks' or 'all'): ${o.value}`);
        break;
      case 'output':
        output = o.value;
        break;
      case 'quiet':
        quiet = true;
        break;
      case 'force-share':
        forceShare = true;
        break;
      case 'object':
        throw new CliError('--object is not supported by qimg');
      case 'image-opts':
        throw new CliError('--image-opts is not supported by qimg');
    }
  }
  if (operands.length !== 1) throw usageError('Expecting one image file name');
  const filename = operands[0]!;
  const outputFormat = parseOutputFormat(output);

  const prefix = `Could not open '${filename}': `;
  const format = fmt === undefined ? undefined : checkFormat(fmt, prefix);
  // bdrv_open refuses this pair before it opens anything.
  if (forceShare && repair !== undefined) {
    throw new CliError(`${prefix}force-share=on can only be used with read-only images`);
  }
  let storage: Storage;
  try {
    storage = await FileStorage.open(filename, { readOnly: repair === undefined });
  } catch (e) {
    throw new CliError(prefix + errorText(e));
  }
  let opened = false;
  let named: NamedFiles | undefined;
  try {
    const fmtName = format ?? (await probeFormat(storage));
    // The image locks of an image opened as qemu-img check opens it (writable with -r).
    const writable = repair !== undefined;
    const node = userPerms({ writable });
    const share = (perms: LockPerms): LockPerms => (forceShare ? forceShared(perms) : perms);
    try {
      storage.lock?.(share(imageFilePerms(fmtName, node, { writable })));
    } catch (e) {
      throw openError(prefix, e);
    }
    if (fmtName !== 'qcow2') {
      throw new CliError('This image format does not support checks', { exitCode: 63 });
    }
    named = await openNamedFiles(storage, prefix, { writable, dataPerms: share(dataFilePerms(node)), forceShare });
    opened = true;
    const out = (text: string): void => {
      if (!quiet) ctx.stdout.write(text);
    };
    const onMessage = (text: string, kind: 'stderr' | 'error'): void => {
      ctx.stderr.write(kind === 'error' ? `${PROGRAM}: ${text}\n` : `${text}\n`);
    };
    let run: CheckResult;
    try {
      run = await checkQcow2(storage, { ...(repair ? { repair } : {}), onMessage });
    } catch (e) {
      throw new CliError(prefix + errorText(e));
    }
    if (!run.failure && (run.corruptionsFixed || run.leaksFixed)) {
      if (outputFormat === 'human') {
        out('The following inconsistencies were found and repaired:\n\n' +
          `    ${run.leaksFixed} leaked clusters\n` +
          `    ${run.corruptionsFixed} corruptions\n\n` +
          'Double checking the fixed image now...\n');
      }
      const fixed = { leaksFixed: run.leaksFixed, corruptionsFixed: run.corruptionsFixed };
      run = { ...(await checkQcow2(storage, { onMessage })), ...fixed };
    }
    const check: ImageCheck = { ...run, filename, format: 'qcow2' };
    if (!run.failure) {
      out(outputFormat === 'human' ? humanImageCheck(check) : `${toJsonPretty(imageCheckToQDict(check))}\n`);
    }
    if (run.failure) throw new CliError(`Check failed: ${run.failure.message}`);
    if (run.checkErrors) throw new CliError('Check failed');
    return run.corruptions ? 2 : run.leaks ? 3 : 0;
  } finally {
    // Closing an image opened writable marks it clean (QEMU's qcow2_inactivate), even after a failed check.
    if (opened && repair !== undefined) await markClean(storage).catch(() => undefined);
    await named?.data?.close().catch(() => undefined);
    await named?.backing?.close().catch(() => undefined);
    await storage.close().catch(() => undefined);
  }
}

/** The files an image names, held open (and locked) while it is checked, as qemu-img does. */
interface NamedFiles {
  data?: Storage;
  backing?: Image;
}

/** The name the brief asked for; same function. */
export const checkCommand = cmdCheck;

/**
 * qemu-img check opens the backing chain and the data file too: their errors (a refused lock
 * among them) are open errors, and their locks are held until the check ends.
 */
async function openNamedFiles(
  storage: Storage, prefix: string, lock: { writable: boolean; dataPerms: LockPerms; forceShare: boolean },
): Promise<NamedFiles> {
  const named: NamedFiles = {};
  let header;
  try {
    const head = new Uint8Array(2 * 1024 * 1024);
    await readFullZeroFill(storage, head, 0);
    const bits = new DataView(head.buffer).getUint32(20);
    header = parseHeader(bits >= 9 && bits <= 21 ? head.subarray(0, 2 ** bits) : head);
  } catch {
    return named; // checkQcow2 reports header errors with QEMU's check-mode rules
  }
  try {
    if ((header.incompatibleFeatures & INCOMPAT_DATA_FILE) !== 0n) {
      if (header.dataFile === undefined) throw new CliError(`${prefix}'data-file' is required for this image`);
      try {
        // Opened as the image is (writable with -r), so that its locks are the ones QEMU holds.
        named.data = await fileGate.open(header.dataFile, { readOnly: !lock.writable, purpose: 'data-file' });
        named.data.lock?.(lock.dataPerms);
      } catch (e) {
        throw openError(prefix, e);
      }
    }
    if (header.backingFile !== undefined && header.backingFile !== '') {
      try {
        const bs = await fileGate.open(header.backingFile, { readOnly: true, relativeTo: storage, purpose: 'backing' });
        const declared = header.backingFormat;
        // The backing chain is locked as any image's backing files (an image asks them for reads only).
        named.backing = (
          await openImage(bs, {
            ...(declared === 'qcow2' || declared === 'raw' ? { format: declared } : {}),
            forceShare: lock.forceShare,
          })
        ).image;
      } catch (e) {
        throw openError(`${prefix}Could not open backing file: `, e);
      }
    }
    return named;
  } catch (e) {
    await named.data?.close().catch(() => undefined);
    await named.backing?.close().catch(() => undefined);
    throw e;
  }
}

/** dump_human_image_check. */
export function humanImageCheck(check: ImageCheck): string {
  let out = '';
  if (!(check.corruptions || check.leaks || check.checkErrors)) {
    out += 'No errors were found on the image.\n';
  } else {
    if (check.corruptions) {
      out += `\n${check.corruptions} errors were found on the image.\nData may be corrupted, or further writes to the image may corrupt it.\n`;
    }
    if (check.leaks) {
      out += `\n${check.leaks} leaked clusters were found on the image.\nThis means waste of disk space, but no harm to data.\n`;
    }
    if (check.checkErrors) {
      out += `\n${check.checkErrors} internal errors have occurred during the check.\n`;
    }
  }
  if (check.totalClusters !== 0 && check.allocatedClusters !== 0) {
    const pct = (a: number, b: number): string => formatFixed((a * 100.0) / b, 2);
    out += `${check.allocatedClusters}/${check.totalClusters} = ${pct(check.allocatedClusters, check.totalClusters)}% allocated, ` +
      `${pct(check.fragmentedClusters, check.allocatedClusters)}% fragmented, ${pct(check.compressedClusters, check.allocatedClusters)}% compressed clusters\n`;
  }
  if (check.imageEndOffset) out += `Image end offset: ${check.imageEndOffset}\n`;
  return out;
}

/** The ImageCheck QAPI struct as a QDict (optional members present when non-zero). */
export function imageCheckToQDict(check: ImageCheck): QDict {
  const d = new QDict();
  const opt = (key: string, v: number): void => {
    if (v) d.put(key, v);
  };
  d.put('filename', check.filename);
  d.put('format', check.format);
  d.put('check-errors', check.checkErrors);
  opt('image-end-offset', check.imageEndOffset);
  opt('corruptions', check.corruptions);
  opt('leaks', check.leaks);
  opt('corruptions-fixed', check.corruptionsFixed);
  opt('leaks-fixed', check.leaksFixed);
  opt('total-clusters', check.totalClusters);
  opt('allocated-clusters', check.allocatedClusters);
  opt('fragmented-clusters', check.fragmentedClusters);
  opt('compressed-clusters', check.compressedClusters);
  return d;
}
