// Zstandard frame boundaries (RFC 8878 section 3.1), found without decoding.
//
// qcow2 stores a compressed cluster as zstd frame(s) followed by whatever else
// is in the last 512-byte sector, and the WebAssembly zstd build we use only
// offers one-shot ZSTD_decompress, which wants exactly whole frames. So we walk
// the frame and block headers to learn where each frame ends.

export const ZSTD_MAGIC = 0xfd2fb528;

export interface ZstdFrameInfo {
  /** Bytes the frame occupies, headers and checksum included. */
  readonly length: number;
  /** True for a skippable frame (magic 0x184D2A5?), which yields no data. */
  readonly skippable: boolean;
  /** Frame_Content_Size when the header carries it, else null. */
  readonly contentSize: number | null;
  /** Dictionary_ID, 0 when none. */
  readonly dictionaryId: number;
}

/**
 * Describes the frame starting at `src[offset]`.
 * Returns a string describing the problem when the bytes there are not a complete frame.
 */
export function readZstdFrame(src: Uint8Array, offset: number): ZstdFrameInfo | string {
  const end = src.length;
  if (offset + 4 > end) return 'truncated frame magic';
  const magic = readLE(src, offset, 4);
  if ((magic & 0xfffffff0) >>> 0 === 0x184d2a50) {
    if (offset + 8 > end) return 'truncated skippable frame header';
    const size = readLE(src, offset + 4, 4);
    if (offset + 8 + size > end) return 'truncated skippable frame';
    return { length: 8 + size, skippable: true, contentSize: 0, dictionaryId: 0 };
  }
  if (magic !== ZSTD_MAGIC) return `bad zstd magic 0x${magic.toString(16).padStart(8, '0')}`;
  let pos = offset + 4;
  if (pos >= end) return 'truncated frame header';
  const fhd = src[pos++]!;
  const fcsFlag = fhd >> 6;
  const singleSegment = (fhd >> 5) & 1;
  if (fhd & 0x08) return 'reserved bit set in zstd frame header';
  const hasChecksum = (fhd >> 2) & 1;
  const didSize = [0, 1, 2, 4][fhd & 3]!;
  const fcsSize = fcsFlag === 0 ? singleSegment : [0, 2, 4, 8][fcsFlag]!;
  const headerRest = (singleSegment ? 0 : 1) + didSize + fcsSize;
  if (pos + headerRest > end) return 'truncated frame header';
  if (!singleSegment) pos++; // Window_Descriptor
  const dictionaryId = didSize ? readLE(src, pos, didSize) : 0;
  pos += didSize;
  let contentSize: number | null = null;
  if (fcsSize === 1) contentSize = src[pos]!;
  else if (fcsSize === 2) contentSize = readLE(src, pos, 2) + 256;
  else if (fcsSize === 4) contentSize = readLE(src, pos, 4);
  else if (fcsSize === 8) contentSize = readLE(src, pos, 4) + readLE(src, pos + 4, 4) * 2 ** 32; // may be inexact above 2^53: only compared against small sizes
  pos += fcsSize;
  for (;;) {
    if (pos + 3 > end) return 'truncated block header';
    const header = src[pos]! | (src[pos + 1]! << 8) | (src[pos + 2]! << 16);
    pos += 3;
    const last = header & 1;
    const type = (header >> 1) & 3;
    const size = header >>> 3;
    if (type === 3) return 'reserved zstd block type';
    pos += type === 1 ? 1 : size; // RLE blocks store one byte repeated `size` times
    if (pos > end) return 'truncated block';
    if (last) break;
  }
  if (hasChecksum) {
    pos += 4;
    if (pos > end) return 'truncated frame checksum';
  }
  return { length: pos - offset, skippable: false, contentSize, dictionaryId };
}

function readLE(src: Uint8Array, pos: number, size: number): number {
  let v = 0;
  for (let i = size - 1; i >= 0; i--) v = v * 256 + src[pos + i]!;
  return v;
}
