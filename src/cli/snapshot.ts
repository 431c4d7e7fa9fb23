// qimg snapshot: qemu-img 7.2's img_snapshot (list, create, apply, delete internal snapshots).

import { getopt, type OptionSpec } from './getopt.js';
import { CliError, PROGRAM, errorText, openError, probedRawWarning, usageError, type CliContext } from './common.js';
import { snapshotHeader, snapshotRow } from './info.js';
import { openImage } from '../open.js';
import { QimgError } from '../errors.js';
import type { Image } from '../image.js';
import type { SnapshotInfo } from '../info.js';

const OPTIONS: OptionSpec[] = [
  { key: 'help', short: 'h', long: 'help', hasArg: false },
  { key: 'object', long: 'object', hasArg: true },
  { key: 'image-opts', long: 'image-opts', hasArg: false },
  { key: 'force-share', short: 'U', long: 'force-share', hasArg: false },
  { key: 'l', short: 'l', hasArg: false },
  { key: 'a', short: 'a', hasArg: true },
  { key: 'c', short: 'c', hasArg: true },
  { key: 'd', short: 'd', hasArg: true },
  { key: 'q', short: 'q', hasArg: false },
];

type Action = 'list' | 'apply' | 'create' | 'delete';

/** strerror texts of the errno values snapshot failures carry (glibc's wording). */
const STRERROR: Record<number, string> = {
  2: 'No such file or directory',
  5: 'Input/output error',
  16: 'Device or resource busy',
  22: 'Invalid argument',
  27: 'File too large',
  28: 'No space left on device',
  34: 'Numerical result out of range',
  95: 'Operation not supported',
};

/** The errno QEMU would report for a failure (I/O error when the error carries none). */
function errnoOf(e: unknown): number {
  if (e instanceof QimgError && typeof e.data.errno === 'number') return e.data.errno;
  return 5;
}

function strerror(errno: number): string {
  return STRERROR[errno] ?? `Unknown error ${errno}`;
}


/** bdrv_snapshot_list as qemu-img sees it: a format or image that cannot hold snapshots lists none. */
function listOrNone(image: Image): SnapshotInfo[] | null {
  try {
    return image.snapshots();
  } catch {
    return null;
  }
}

export async function cmdSnapshot(args: string[], ctx: CliContext, showHelp: () => number): Promise<number> {
  const { options, operands } = getopt(args, OPTIONS, false, 'snapshot');
  let action: Action | undefined;
  let name = '';
  let forceShare = false;
  for (const o of options) {
    switch (o.key) {
      case 'help':
        return showHelp();
      case 'l':
      case 'a':
      case 'c':
      case 'd':
        if (action) throw usageError("Cannot mix '-l', '-a', '-c', '-d'");
        action = ({ l: 'list', a: 'apply', c: 'create', d: 'delete' } as const)[o.key];
        name = o.value ?? '';
        break;
      case 'q':
        // qemu-img's -q changes nothing here: snapshot prints no progress or success lines.
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
  // Without an action qemu-img still opens the image read-write (and then does nothing).
  const readOnly = action === 'list';
  const prefix = `Could not open '${filename}': `;
  let opened;
  try {
    opened = await openImage(filename, { readOnly, ...(forceShare ? { forceShare: true } : {}) });
  } catch (e) {
    throw openError(prefix, e);
  }
  const { image, probed } = opened;
  try {
    const probedRaw = probed && image.format === 'raw';
    if (probedRaw && !readOnly) ctx.stderr.write(probedRawWarning(filename));
    let status = 0;
    switch (action) {
      case 'list': {
        const list = listOrNone(image);
        if (list && list.length > 0) {
          let out = `Snapshot list:\n${snapshotHeader()}\n`;
          for (const s of list) out += `${snapshotRow(s)}\n`;
          ctx.stdout.write(out);
        }
        break;
      }
      case 'create':
        try {
          await image.createSnapshot(name);
        } catch (e) {
          const errno = errnoOf(e);
          ctx.stderr.write(`${PROGRAM}: Could not create snapshot '${name}': -${errno} (${strerror(errno)})\n`);
          status = 1;
        }
        break;
      case 'apply':
        if (image.format === 'raw') {
          // QEMU falls back to the protocol layer, which reopens the image (the warning again), and has none.
          if (probedRaw) ctx.stderr.write(probedRawWarning(filename));
          ctx.stderr.write(`${PROGRAM}: Could not apply snapshot '${name}': Block driver does not support snapshots\n`);
          status = 1;
          break;
        }
        try {
          await image.applySnapshot(name);
        } catch (e) {
          const errno = errnoOf(e);
          // The bitmap refusal comes from the generic layer with its own words; the rest as "Failed to load snapshot".
          const why = errno === 16 ? 'Device has active dirty bitmaps' : `Failed to load snapshot: ${strerror(errno)}`;
          ctx.stderr.write(`${PROGRAM}: Could not apply snapshot '${name}': ${why}\n`);
          status = 1;
        }
        break;
      case 'delete': {
        // bdrv_snapshot_find: by name only; the snapshot found is then deleted by its id and name.
        const found = listOrNone(image)?.find((s) => s.name === name);
        if (!found) {
          ctx.stderr.write(`${PROGRAM}: Could not delete snapshot '${name}': snapshot not found\n`);
          status = 1;
          break;
        }
        try {
          await image.deleteSnapshot({ id: found.id, name: found.name });
        } catch (e) {
          ctx.stderr.write(`${PROGRAM}: Could not delete snapshot '${name}': ${errorText(e)}\n`);
          status = 1;
        }
        break;
      }
      default:
        break;
    }
    await image.close();
    return status;
  } finally {
    await image.close().catch(() => undefined);
  }
}
