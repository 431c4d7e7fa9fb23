// The qcow2 header and its extensions: parsed and validated with QEMU's rules and limits; unknown
// extensions and header bytes are kept byte for byte so that a rewrite can preserve them.

import { FormatError, UnsupportedError } from '../errors.js';
import { readFullZeroFill, type Storage } from '../io/storage.js';
import {
  readU64, AUTOCLEAR_BITMAPS, MAX_BITMAPS, MAX_BITMAP_DIRECTORY_BYTES, COMPRESSION_TYPE_OFFSET, EXT_BACKING_FORMAT, EXT_BITMAPS, EXT_CRYPTO, EXT_DATA_FILE, EXT_END, EXT_FEATURE_TABLE,
  INCOMPAT_COMPRESSION, INCOMPAT_MASK, MAX_BACKING_NAME, MAX_CLUSTER_BITS, MAX_L1_BYTES, MAX_REFTABLE_BYTES,
  MAX_SNAPSHOTS, MIN_CLUSTER_BITS, QCOW2_MAGIC, SNAPSHOT_HEADER_SIZE, V2_HEADER_LENGTH, V3_MIN_HEADER_LENGTH,
} from './layout.js';

export interface FeatureName {
  /** 0 incompatible, 1 compatible, 2 autoclear. */
  type: number;
  bit: number;
  name: string;
}

export interface BitmapsExtension {
  nbBitmaps: number;
  directorySize: number;
  directoryOffset: number;
}

export interface HeaderExtension {
  type: number;
  data: Uint8Array;
}

export interface Qcow2Header {
  version: 2 | 3;
  backingFileOffset: number;
  backingFileSize: number;
  clusterBits: number;
  size: number;
  cryptMethod: number;
  l1Size: number;
  l1TableOffset: number;
  refcountTableOffset: number;
  refcountTableClusters: number;
  nbSnapshots: number;
  snapshotsOffset: number;
  incompatibleFeatures: bigint;
  compatibleFeatures: bigint;
  autoclearFeatures: bigint;
  refcountOrder: number;
  headerLength: number;
  /** 0 zlib, 1 zstd. */
  compressionType: number;
  /** Header bytes past the fields qimg knows (QEMU's unknown_header_fields), kept for rewrites. */
  unknownHeaderFields: Uint8Array;
  /** Every extension in file order, known ones included, with its raw data. */
  extensions: HeaderExtension[];
  backingFormat?: string;
  dataFile?: string;
  featureNames: FeatureName[];
  bitmaps?: BitmapsExtension;
  backingFile?: string;
}

/** Bytes of the known header fields (QEMU's QCowHeader is 112 bytes; the 7 after compression_type are padding). */
const KNOWN_HEADER_BYTES = 112;
const decoder = new TextDecoder('utf-8', { fatal: false });


function big64(view: DataView, at: number): bigint {
  return view.getBigUint64(at);
}

/**
 * Parses and validates the header from the image's first cluster (`head` holds at least the first
 * min(cluster size, file size) bytes, zero-padded to the cluster size as QEMU reads past EOF as zeros).
 */
export function parseHeader(head: Uint8Array): Qcow2Header {
  if (head.length < V2_HEADER_LENGTH) throw new FormatError('Image is not in qcow2 format');
  const view = new DataView(head.buffer, head.byteOffset, head.byteLength);
  if (view.getUint32(0) !== QCOW2_MAGIC) throw new FormatError('Image is not in qcow2 format');
  const version = view.getUint32(4);
  if (version < 2 || version > 3) throw new UnsupportedError(`Unsupported qcow2 version ${version}`);
  const clusterBits = view.getUint32(20);
  if (clusterBits < MIN_CLUSTER_BITS || clusterBits > MAX_CLUSTER_BITS) {
    throw new FormatError(`Unsupported cluster size: 2^${clusterBits}`);
  }
  const clusterSize = 2 ** clusterBits;
  const h: Qcow2Header = {
    version: version as 2 | 3,
    backingFileOffset: readU64(view, 8, 'Backing file offset'),
    backingFileSize: view.getUint32(16),
    clusterBits,
    size: readU64(view, 24, 'Image size'),
    cryptMethod: view.getUint32(32),
    l1Size: view.getUint32(36),
    l1TableOffset: readU64(view, 40, 'Active L1 table offset'),
    refcountTableOffset: readU64(view, 48, 'Reference count table offset'),
    refcountTableClusters: view.getUint32(56),
    nbSnapshots: view.getUint32(60),
    snapshotsOffset: readU64(view, 64, 'Snapshot table offset'),
    incompatibleFeatures: 0n,
    compatibleFeatures: 0n,
    autoclearFeatures: 0n,
    refcountOrder: 4,
    headerLength: V2_HEADER_LENGTH,
    compressionType: 0,
    unknownHeaderFields: new Uint8Array(0),
    extensions: [],
    featureNames: [],
  };
  if (version === 3) {
    if (head.length < V3_MIN_HEADER_LENGTH) throw new FormatError('qcow2 header too short');
    h.incompatibleFeatures = big64(view, 72);
    h.compatibleFeatures = big64(view, 80);
    h.autoclearFeatures = big64(view, 88);
    h.refcountOrder = view.getUint32(96);
    h.headerLength = view.getUint32(100);
    if (h.headerLength < V3_MIN_HEADER_LENGTH) throw new FormatError('qcow2 header too short');
  }
  if (h.headerLength > clusterSize) throw new FormatError('qcow2 header exceeds cluster size');
  if (h.headerLength > KNOWN_HEADER_BYTES) {
    h.unknownHeaderFields = head.slice(KNOWN_HEADER_BYTES, h.headerLength);
  }
  if (h.backingFileOffset > clusterSize) throw new FormatError('Invalid backing file offset');
  const extEnd = h.backingFileOffset ? h.backingFileOffset : clusterSize;

  if (h.headerLength > COMPRESSION_TYPE_OFFSET) h.compressionType = view.getUint8(COMPRESSION_TYPE_OFFSET);
  // QEMU's validate_compression_type: a known type, and the incompatible bit set exactly when it is not zlib.
  if (h.compressionType > 1) {
    throw new UnsupportedError(`qcow2: unknown compression type: ${h.compressionType}`);
  }
  const compressionBit = (h.incompatibleFeatures & INCOMPAT_COMPRESSION) !== 0n;
  if (h.compressionType !== 0 && !compressionBit) {
    throw new FormatError('qcow2: Compression type incompatible feature bit must be set');
  }
  if (h.compressionType === 0 && compressionBit) {
    throw new FormatError('qcow2: Compression type incompatible feature bit must not be set');
  }

  readExtensions(h, head, view, extEnd);

  if (h.incompatibleFeatures & ~INCOMPAT_MASK) {
    throw new UnsupportedError(unsupportedFeatureMessage(h.featureNames, h.incompatibleFeatures & ~INCOMPAT_MASK), {
      features: (h.incompatibleFeatures & ~INCOMPAT_MASK).toString(16),
    });
  }
  if (h.refcountOrder > 6) {
    throw new FormatError('Reference count entry width too large; may not exceed 64 bits');
  }
  if (h.refcountTableClusters === 0) throw new FormatError('Image does not contain a reference count table');
  validateTable(h.refcountTableOffset, h.refcountTableClusters, clusterSize, MAX_REFTABLE_BYTES, clusterSize, 'Reference count table');
  validateTable(h.snapshotsOffset, h.nbSnapshots, SNAPSHOT_HEADER_SIZE, SNAPSHOT_HEADER_SIZE * MAX_SNAPSHOTS, clusterSize, 'Snapshot table');
  validateTable(h.l1TableOffset, h.l1Size, 8, MAX_L1_BYTES, clusterSize, 'Active L1 table');

  if (h.backingFileOffset !== 0) {
    const len = h.backingFileSize;
    if (len > Math.min(MAX_BACKING_NAME, clusterSize - h.backingFileOffset)) {
      throw new FormatError('Backing file name too long');
    }
    h.backingFile = cString(head.subarray(h.backingFileOffset, h.backingFileOffset + len));
  }
  return h;
}

/** QEMU's qcow2_validate_table: size under the limit, offset cluster-aligned and in range. */
export function validateTable(offset: number, entries: number, entryLen: number, maxBytes: number, clusterSize: number, name: string): void {
  if (entries > Math.floor(maxBytes / entryLen)) throw new FormatError(`${name} too large`);
  if (offset % clusterSize !== 0 || offset + entries * entryLen > Number.MAX_SAFE_INTEGER) {
    throw new FormatError(`${name} offset invalid`);
  }
}

/** QEMU stores names without NUL but reads them as C strings: a NUL ends the name. */
function cString(bytes: Uint8Array): string {
  const nul = bytes.indexOf(0);
  return decoder.decode(nul >= 0 ? bytes.subarray(0, nul) : bytes);
}

function readExtensions(h: Qcow2Header, head: Uint8Array, view: DataView, extEnd: number): void {
  let offset = h.headerLength;
  const seen = new Set<number>();
  while (offset < extEnd) {
    if (offset + 8 > head.length) break; // zero padding past EOF ends the list
    const type = view.getUint32(offset);
    const len = view.getUint32(offset + 4);
    offset += 8;
    if (offset > extEnd || len > extEnd - offset) throw new FormatError('Header extension too large');
    if (type === EXT_END) return;
    const data = head.slice(offset, offset + len);
    h.extensions.push({ type, data });
    const dv = new DataView(data.buffer, data.byteOffset, data.byteLength);
    switch (type) {
      case EXT_BACKING_FORMAT:
        if (len >= 16) throw new FormatError(`ERROR: ext_backing_format: len=${len} too large (>=16)`);
        h.backingFormat = cString(data);
        break;
      case EXT_FEATURE_TABLE:
        for (let at = 0; at + 48 <= len; at += 48) {
          h.featureNames.push({ type: data[at]!, bit: data[at + 1]!, name: cString(data.subarray(at + 2, at + 48)) });
        }
        break;
      case EXT_BITMAPS:
        if (len !== 24) throw new FormatError('bitmaps_ext: Invalid extension length');
        // Without the autoclear bit a program lacking bitmap support wrote the image: the bitmaps
        // are stale and QEMU ignores them.
        if ((h.autoclearFeatures & AUTOCLEAR_BITMAPS) === 0n || seen.has(type)) break;
        if (dv.getUint32(4) !== 0) throw new FormatError('bitmaps_ext: Reserved field is not zero');
        h.bitmaps = {
          nbBitmaps: dv.getUint32(0),
          directorySize: readU64(dv, 8, 'Bitmap directory size'),
          directoryOffset: readU64(dv, 16, 'Bitmap directory offset'),
        };
        if (h.bitmaps.nbBitmaps > MAX_BITMAPS) {
          throw new FormatError(`bitmaps_ext: Image has ${h.bitmaps.nbBitmaps} bitmaps, exceeding the QEMU supported maximum of ${MAX_BITMAPS}`);
        }
        if (h.bitmaps.nbBitmaps === 0) throw new FormatError('found bitmaps extension with zero bitmaps');
        if (h.bitmaps.directoryOffset % 2 ** h.clusterBits !== 0) throw new FormatError('bitmaps_ext: invalid bitmap directory offset');
        if (h.bitmaps.directorySize > MAX_BITMAP_DIRECTORY_BYTES) {
          throw new FormatError(`bitmaps_ext: bitmap directory size (${h.bitmaps.directorySize}) exceeds the maximum supported size (${MAX_BITMAP_DIRECTORY_BYTES})`);
        }
        break;
      case EXT_DATA_FILE:
        h.dataFile = cString(data);
        break;
      case EXT_CRYPTO:
      default:
        break;
    }
    seen.add(type);
    offset += (len + 7) & ~7;
  }
}

/** QEMU's report_unsupported_feature: names from the feature table, then the unnamed rest as a hex mask. */
function unsupportedFeatureMessage(table: FeatureName[], mask: bigint): string {
  const parts: string[] = [];
  for (const f of table) {
    if (f.type !== 0) continue;
    const bit = 1n << BigInt(f.bit);
    if (mask & bit) {
      parts.push(f.name.slice(0, 46));
      mask &= ~bit;
    }
  }
  if (mask) parts.push(`Unknown incompatible feature: ${mask.toString(16)}`);
  return `Unsupported qcow2 feature(s): ${parts.join(', ')}`;
}

/**
 * The header of the qcow2 image in `storage` (of `fileSize` bytes, when known). The header and its
 * extensions live in the first cluster: the first 64 KiB are read, and the whole cluster again if
 * the image's is larger (past EOF reads as zeros, as in QEMU).
 */
export async function readHeader(storage: Storage, fileSize = 65536): Promise<Qcow2Header> {
  const first = new Uint8Array(Math.min(65536, Math.max(fileSize, 512)));
  await readFullZeroFill(storage, first, 0);
  const header = parseHeaderOrSize(first);
  const clusterSize = 2 ** header.clusterBits;
  if (clusterSize <= first.length) return header;
  const head = new Uint8Array(clusterSize);
  await readFullZeroFill(storage, head, 0);
  return parseHeader(head);
}

/** Parses from a buffer that may be shorter than the image's cluster: only the cluster size matters then. */
function parseHeaderOrSize(first: Uint8Array): Qcow2Header {
  try {
    return parseHeader(first);
  } catch (e) {
    // A cluster larger than the buffer may hold extensions past it: retry with the full cluster.
    const view = new DataView(first.buffer, first.byteOffset, first.byteLength);
    const bits = first.length >= 24 ? view.getUint32(20) : 0;
    if (bits > 16 && bits <= 21 && 2 ** bits > first.length) {
      return { ...({} as Qcow2Header), clusterBits: bits };
    }
    throw e;
  }
}
