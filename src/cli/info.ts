// qimg info: qemu-img 7.2's img_info, human and JSON, with --backing-chain.

import type { ImageInfo, Qcow2SpecificInfo, SnapshotInfo } from '../info.js';
import { resolveRelativeName } from '../io/gate.js';
import { getopt, type OptionSpec } from './getopt.js';
import { CliError, openForCli, usageError, type CliContext } from './common.js';
import { QDict, dumpHuman, toJsonPretty, type QValue } from './qobject.js';
import { padEndBytes, padStartBytes, sizeToStr, zeroPad } from './cformat.js';

const OPTIONS: OptionSpec[] = [
  { key: 'help', short: 'h', long: 'help', hasArg: false },
  { key: 'format', short: 'f', long: 'format', hasArg: true },
  { key: 'output', long: 'output', hasArg: true },
  { key: 'backing-chain', long: 'backing-chain', hasArg: false },
  { key: 'object', long: 'object', hasArg: true },
  { key: 'image-opts', long: 'image-opts', hasArg: false },
  { key: 'force-share', short: 'U', long: 'force-share', hasArg: false },
];

export type OutputFormat = 'human' | 'json';

/** Parses --output as qemu-img does (the check comes after the file-name count check). */
export function parseOutputFormat(output: string | undefined): OutputFormat {
  if (output === undefined || output === 'human') return 'human';
  if (output === 'json') return 'json';
  throw new CliError('--output must be used with human or json as argument.');
}

export async function cmdInfo(args: string[], ctx: CliContext, showHelp: () => number): Promise<number> {
  const { options, operands } = getopt(args, OPTIONS, false, 'info');
  let fmt: string | undefined;
  let output: string | undefined;
  let chain = false;
  let forceShare = false;
  for (const o of options) {
    switch (o.key) {
      case 'help':
        return showHelp();
      case 'format':
        fmt = o.value;
        break;
      case 'output':
        output = o.value;
        break;
      case 'backing-chain':
        chain = true;
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
  const outputFormat = parseOutputFormat(output);
  const list = await collectImageInfoList(operands[0]!, fmt, chain, forceShare);
  if (outputFormat === 'human') {
    ctx.stdout.write(list.map(formatHumanInfo).join('\n'));
  } else if (chain) {
    ctx.stdout.write(`${toJsonPretty(list.map(imageInfoToQDict))}\n`);
  } else {
    ctx.stdout.write(`${toJsonPretty(imageInfoToQDict(list[0]!))}\n`);
  }
  return 0;
}

/** The full backing file name as QEMU reports it: relative names resolved against the image's own name. */
function withFullBacking(info: ImageInfo): ImageInfo {
  if (info.backingFilename === undefined || info.backingFilename === '' || info.fullBackingFilename !== undefined) {
    return info;
  }
  return { ...info, fullBackingFilename: resolveRelativeName(info.backingFilename, info.filename) };
}

/** img_info's collect_image_info_list: each image opened alone (no backing), then its backing file by name. */
export async function collectImageInfoList(
  filename: string, fmt: string | undefined, chain: boolean, forceShare = false,
): Promise<ImageInfo[]> {
  const list: ImageInfo[] = [];
  const seen = new Set<string>();
  let name: string | undefined = filename;
  let format = fmt;
  while (name !== undefined) {
    if (seen.has(name)) throw new CliError(`Backing file '${name}' creates an infinite loop.`);
    seen.add(name);
    const { image } = await openForCli(name, format, { noBacking: true, metadataOnly: true, forceShare });
    let info: ImageInfo;
    try {
      info = withFullBacking(await image.info());
    } finally {
      await image.close().catch(() => undefined);
    }
    list.push(info);
    name = undefined;
    format = undefined;
    if (chain && info.backingFilename !== undefined && info.backingFilename !== '') {
      if (info.fullBackingFilename !== undefined) {
        name = info.fullBackingFilename;
      } else {
        throw new CliError(
          `Could not determine absolute backing filename, but backing filename '${info.backingFilename}' present`,
        );
      }
      if (info.backingFilenameFormat !== undefined && info.backingFilenameFormat !== '') {
        format = info.backingFilenameFormat;
      }
    }
  }
  return list;
}

// ---- JSON (the QAPI ImageInfo struct, members put in schema order) ----

function snapshotToQDict(s: SnapshotInfo): QDict {
  const d = new QDict()
    .put('id', s.id)
    .put('name', s.name)
    .put('vm-state-size', s.vmStateSize)
    .put('date-sec', s.dateSec)
    .put('date-nsec', s.dateNsec)
    .put('vm-clock-sec', Math.floor(s.vmClockNsec / 1e9))
    .put('vm-clock-nsec', s.vmClockNsec % 1e9);
  if (s.icount !== undefined && s.icount >= 0) d.put('icount', s.icount);
  return d;
}

function qcow2SpecificToQDict(q: Qcow2SpecificInfo): QDict {
  const d = new QDict().put('compat', q.compat);
  d.putOptional('data-file', q.dataFile);
  d.putOptional('data-file-raw', q.dataFileRaw);
  d.putOptional('extended-l2', q.extendedL2);
  d.putOptional('lazy-refcounts', q.lazyRefcounts);
  d.putOptional('corrupt', q.corrupt);
  d.put('refcount-bits', q.refcountBits);
  if (q.bitmaps !== undefined && q.bitmaps.length > 0) {
    d.put(
      'bitmaps',
      q.bitmaps.map((b) => new QDict().put('name', b.name).put('granularity', b.granularity).put('flags', [...b.flags])),
    );
  }
  d.put('compression-type', q.compressionType);
  return d;
}

function formatSpecificToQDict(info: ImageInfo): QDict | undefined {
  if (!info.formatSpecific) return undefined;
  return new QDict().put('type', info.formatSpecific.type).put('data', qcow2SpecificToQDict(info.formatSpecific));
}

export function imageInfoToQDict(info: ImageInfo): QDict {
  const d = new QDict().put('filename', info.filename).put('format', info.format);
  // bdrv_get_info succeeds for raw and qcow2 alike, so QEMU always has the dirty flag.
  d.put('dirty-flag', info.dirtyFlag ?? false);
  d.putOptional('actual-size', info.actualSize);
  d.put('virtual-size', info.virtualSize);
  if (info.clusterSize) d.put('cluster-size', info.clusterSize);
  if (info.encrypted) d.put('encrypted', true);
  if (info.backingFilename !== undefined && info.backingFilename !== '') {
    d.put('backing-filename', info.backingFilename);
    d.putOptional('full-backing-filename', info.fullBackingFilename);
    if (info.backingFilenameFormat) d.put('backing-filename-format', info.backingFilenameFormat);
  }
  if (info.snapshots.length > 0) d.put('snapshots', info.snapshots.map(snapshotToQDict));
  const specific = formatSpecificToQDict(info);
  if (specific) d.put('format-specific', specific);
  return d;
}

// ---- human (bdrv_image_info_dump) ----

/** QEMU copies snapshot ids and names into fixed buffers (128 and 256 bytes with the NUL). */
function truncateBytes(s: string, max: number): string {
  const b = Buffer.from(s, 'utf8');
  return b.length <= max ? s : b.subarray(0, max).toString('utf8');
}

/** The snapshot table header line (without its newline). */
export function snapshotHeader(): string {
  return `${'ID'.padEnd(10)}${'TAG'.padEnd(17)}${'VM SIZE'.padStart(8)}${'DATE'.padStart(20)}${'VM CLOCK'.padStart(13)}${'ICOUNT'.padStart(11)}`;
}

/** "%Y-%m-%d %H:%M:%S" of a Unix time in the process's local time zone (QEMU uses localtime). */
function localDate(sec: number): string {
  const t = new Date(sec * 1000);
  return (
    `${t.getFullYear()}-${zeroPad(t.getMonth() + 1, 2)}-${zeroPad(t.getDate(), 2)} ` +
    `${zeroPad(t.getHours(), 2)}:${zeroPad(t.getMinutes(), 2)}:${zeroPad(t.getSeconds(), 2)}`
  );
}

/** One snapshot table row (without its newline), as bdrv_snapshot_dump prints it. */
export function snapshotRow(s: SnapshotInfo): string {
  const secs = Math.floor(s.vmClockNsec / 1e9);
  const clock =
    `${zeroPad(Math.floor(secs / 3600), 2)}:${zeroPad(Math.floor(secs / 60) % 60, 2)}:` +
    `${zeroPad(secs % 60, 2)}.${zeroPad(Math.floor(s.vmClockNsec / 1e6) % 1000, 3)}`;
  const icount = s.icount !== undefined && s.icount >= 0 ? String(s.icount) : '';
  return (
    `${padEndBytes(truncateBytes(s.id, 127), 9)} ${padEndBytes(truncateBytes(s.name, 255), 16)} ` +
    `${padStartBytes(sizeToStr(s.vmStateSize), 8)}${padStartBytes(localDate(s.dateSec), 20)}` +
    `${padStartBytes(clock, 13)}${padStartBytes(icount, 11)}`
  );
}

export function formatHumanInfo(info: ImageInfo): string {
  let out =
    `image: ${info.filename}\n` +
    `file format: ${info.format}\n` +
    `virtual size: ${sizeToStr(info.virtualSize)} (${info.virtualSize} bytes)\n` +
    `disk size: ${info.actualSize === undefined ? 'unavailable' : sizeToStr(info.actualSize)}\n`;
  if (info.encrypted) out += 'encrypted: yes\n';
  if (info.clusterSize) out += `cluster_size: ${info.clusterSize}\n`;
  if (info.dirtyFlag) out += 'cleanly shut down: no\n';
  if (info.backingFilename !== undefined && info.backingFilename !== '') {
    out += `backing file: ${info.backingFilename}`;
    if (info.fullBackingFilename === undefined) out += ' (cannot determine actual path)';
    else if (info.fullBackingFilename !== info.backingFilename) out += ` (actual path: ${info.fullBackingFilename})`;
    out += '\n';
    if (info.backingFilenameFormat) out += `backing file format: ${info.backingFilenameFormat}\n`;
  }
  if (info.snapshots.length > 0) {
    out += `Snapshot list:\n${snapshotHeader()}\n`;
    for (const s of info.snapshots) out += `${snapshotRow(s)}\n`;
  }
  const specific = formatSpecificToQDict(info);
  if (specific) {
    out += 'Format specific information:\n';
    out += dumpHuman(specific.get('data') as QValue, 1);
  }
  return out;
}
