// Serialising a qcow2 header (cluster 0) the way QEMU 7.2's qcow2_update_header lays it out:
// the fixed fields, unknown header fields kept as they were, then the extensions in QEMU's order
// (backing format, data file, crypto, feature table, bitmaps, unknown ones in file order), the end
// marker, and the backing file name right after it. Creation and the writer share this, so an image
// qimg rewrites keeps everything QEMU would keep.

import { QimgError } from '../errors.js';
import type { FeatureName, Qcow2Header } from './header.js';
import {
  AUTOCLEAR_DATA_FILE_RAW, EXT_BACKING_FORMAT, EXT_BITMAPS, EXT_CRYPTO, EXT_DATA_FILE, EXT_END, EXT_FEATURE_TABLE, MAX_BACKING_NAME,
  QCOW2_MAGIC, V2_HEADER_LENGTH,
} from './layout.js';

/** QEMU's QCowHeader is 112 bytes; v3 headers it writes have header_length 112 plus unknown fields. */
export const QEMU_V3_HEADER_LENGTH = 112;

/**
 * The feature name table QEMU 7.2 writes (block/qcow2.c, qcow2_update_header), in its order.
 * Type: 0 incompatible, 1 compatible, 2 autoclear.
 */
export const QEMU_FEATURE_NAMES: readonly FeatureName[] = [
  { type: 0, bit: 0, name: 'dirty bit' },
  { type: 0, bit: 1, name: 'corrupt bit' },
  { type: 0, bit: 2, name: 'external data file' },
  { type: 0, bit: 3, name: 'compression type' },
  { type: 0, bit: 4, name: 'extended L2 entries' },
  { type: 1, bit: 0, name: 'lazy refcounts' },
  { type: 2, bit: 0, name: 'bitmaps' },
  { type: 2, bit: 1, name: 'raw external data' },
];

const FEATURE_ENTRY_BYTES = 48;
const FEATURE_NAME_BYTES = 46;
const encoder = new TextEncoder();

/** The extension types QEMU regenerates from its state; any other type is kept as an unknown extension. */
const KNOWN_EXTENSIONS = new Set([EXT_BACKING_FORMAT, EXT_DATA_FILE, EXT_CRYPTO, EXT_FEATURE_TABLE, EXT_BITMAPS, EXT_END]);

/** The fields of a header that serialisation needs (a parsed Qcow2Header has them all). */
export type HeaderToWrite = Pick<
  Qcow2Header,
  | 'version' | 'clusterBits' | 'size' | 'cryptMethod' | 'l1Size' | 'l1TableOffset' | 'refcountTableOffset'
  | 'refcountTableClusters' | 'nbSnapshots' | 'snapshotsOffset' | 'incompatibleFeatures' | 'compatibleFeatures'
  | 'autoclearFeatures' | 'refcountOrder' | 'compressionType' | 'unknownHeaderFields' | 'extensions'
  | 'backingFormat' | 'dataFile' | 'bitmaps' | 'backingFile'
>;

/** QEMU's feature table payload (8 entries × 48 bytes). */
export function featureTableBytes(features: readonly FeatureName[] = QEMU_FEATURE_NAMES): Uint8Array {
  const out = new Uint8Array(features.length * FEATURE_ENTRY_BYTES);
  features.forEach((f, i) => {
    const at = i * FEATURE_ENTRY_BYTES;
    out[at] = f.type;
    out[at + 1] = f.bit;
    out.set(encoder.encode(f.name).subarray(0, FEATURE_NAME_BYTES), at + 2);
  });
  return out;
}

function headerSpaceError(): QimgError {
  // qcow2_update_header fails with -ENOSPC when cluster 0 cannot hold everything.
  return new QimgError('USAGE', 'Could not update qcow2 header: No space left on device', { errno: 'ENOSPC' });
}

/**
 * The bytes of cluster 0 exactly as qcow2_update_header writes them (a whole cluster, zero padded).
 * `header.extensions` supplies the crypto extension and unknown extensions (kept in file order);
 * the backing format, data file, feature table and bitmaps extensions are generated from the fields.
 * With `featureTable` false the table is left out (QEMU writes it only for v3 with clusters > 4 KiB,
 * the default chosen here).
 */
export function serializeHeader(header: HeaderToWrite, options: { featureTable?: boolean } = {}): Uint8Array {
  const clusterSize = 2 ** header.clusterBits;
  const buf = new Uint8Array(clusterSize);
  const view = new DataView(buf.buffer);
  const unknownFields = header.version === 3 ? header.unknownHeaderFields : new Uint8Array(0);
  const headerLength = QEMU_V3_HEADER_LENGTH + unknownFields.length;

  view.setUint32(0, QCOW2_MAGIC);
  view.setUint32(4, header.version);
  view.setUint32(20, header.clusterBits);
  setU64(view, 24, header.size);
  view.setUint32(32, header.cryptMethod);
  view.setUint32(36, header.l1Size);
  setU64(view, 40, header.l1TableOffset);
  setU64(view, 48, header.refcountTableOffset);
  view.setUint32(56, header.refcountTableClusters);
  view.setUint32(60, header.nbSnapshots);
  setU64(view, 64, header.snapshotsOffset);
  let pos = V2_HEADER_LENGTH;
  if (header.version === 3) {
    view.setBigUint64(72, header.incompatibleFeatures);
    view.setBigUint64(80, header.compatibleFeatures);
    view.setBigUint64(88, header.autoclearFeatures);
    view.setUint32(96, header.refcountOrder);
    view.setUint32(100, headerLength);
    buf[104] = header.compressionType;
    pos = QEMU_V3_HEADER_LENGTH;
    if (pos + unknownFields.length > clusterSize) throw headerSpaceError();
    buf.set(unknownFields, pos);
    pos += unknownFields.length;
  }

  const add = (type: number, data: Uint8Array): void => {
    const len = 8 + ((data.length + 7) & ~7);
    if (pos + len > clusterSize) throw headerSpaceError();
    view.setUint32(pos, type);
    view.setUint32(pos + 4, data.length);
    buf.set(data, pos + 8);
    pos += len;
  };

  if (header.backingFormat !== undefined) add(EXT_BACKING_FORMAT, encoder.encode(header.backingFormat));
  const hasDataFileBit = (header.incompatibleFeatures & 4n) !== 0n;
  if (hasDataFileBit && header.dataFile !== undefined) add(EXT_DATA_FILE, encoder.encode(header.dataFile));
  const crypto = header.extensions.find((e) => e.type === EXT_CRYPTO);
  if (crypto) add(EXT_CRYPTO, crypto.data);
  if (options.featureTable ?? (header.version === 3 && clusterSize > 4096)) add(EXT_FEATURE_TABLE, featureTableBytes());
  if (header.bitmaps && header.bitmaps.nbBitmaps > 0) {
    const data = new Uint8Array(24);
    const dv = new DataView(data.buffer);
    dv.setUint32(0, header.bitmaps.nbBitmaps);
    setU64(dv, 8, header.bitmaps.directorySize);
    setU64(dv, 16, header.bitmaps.directoryOffset);
    add(EXT_BITMAPS, data);
  }
  for (const ext of header.extensions) {
    if (!KNOWN_EXTENSIONS.has(ext.type)) add(ext.type, ext.data);
  }
  add(EXT_END, new Uint8Array(0));

  if (header.backingFile !== undefined) {
    const name = encoder.encode(header.backingFile);
    if (name.length > MAX_BACKING_NAME) {
      throw new QimgError('USAGE', 'Could not update qcow2 header: Invalid argument', { errno: 'EINVAL' });
    }
    if (pos + name.length > clusterSize) throw headerSpaceError();
    buf.set(name, pos);
    setU64(view, 8, pos);
    view.setUint32(16, name.length);
  }
  return buf;
}

function setU64(view: DataView, at: number, value: number): void {
  view.setUint32(at, Math.floor(value / 4294967296));
  view.setUint32(at + 4, value >>> 0);
}

/**
 * Cluster 0 naming a new backing file (or none: `name` undefined) and backing format, as QEMU's
 * qcow2_change_backing_file rewrites it through qcow2_update_header: the name follows the
 * extensions, the format lives in its extension. The caller writes the returned cluster in one
 * write, so a crash leaves either the old header or the new one. `header` is updated only when
 * the new header fits; errors carry QEMU's errno (EINVAL: name longer than 1023 bytes, or a
 * backing file for an image whose raw data file must stay self-contained; ENOSPC: no room in
 * cluster 0).
 */
export function backingFileHeader(header: HeaderToWrite, name: string | undefined, format: string | undefined): Uint8Array {
  const invalid = (): QimgError => new QimgError('USAGE', 'Invalid argument', { errno: 'EINVAL' });
  if (name !== undefined && (header.autoclearFeatures & AUTOCLEAR_DATA_FILE_RAW) !== 0n) throw invalid();
  if (name !== undefined && encoder.encode(name).length > MAX_BACKING_NAME) throw invalid();
  const next: HeaderToWrite = { ...header, size: Math.floor(header.size / 512) * 512 };
  if (name === undefined) delete next.backingFile;
  else next.backingFile = name;
  if (format === undefined) delete next.backingFormat;
  else next.backingFormat = format;
  let bytes: Uint8Array;
  try {
    bytes = serializeHeader(next);
  } catch (e) {
    if (e instanceof QimgError && e.data.errno === 'ENOSPC') {
      throw new QimgError('USAGE', 'No space left on device', { errno: 'ENOSPC' });
    }
    throw e;
  }
  if (name === undefined) delete header.backingFile;
  else header.backingFile = name;
  if (format === undefined) delete header.backingFormat;
  else header.backingFormat = format;
  return bytes;
}
