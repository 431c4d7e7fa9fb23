// Crafting broken qcow2 files from valid qemu-made ones: header field patches by name.

import { closeSync, openSync, readSync, writeSync } from 'node:fs';

/** Header field offsets and widths (QCOW2-FACTS §1.1/1.2). */
export const HEADER = {
  magic: [0, 4],
  version: [4, 4],
  backing_file_offset: [8, 8],
  backing_file_size: [16, 4],
  cluster_bits: [20, 4],
  size: [24, 8],
  crypt_method: [32, 4],
  l1_size: [36, 4],
  l1_table_offset: [40, 8],
  refcount_table_offset: [48, 8],
  refcount_table_clusters: [56, 4],
  nb_snapshots: [60, 4],
  snapshots_offset: [64, 8],
  incompatible_features: [72, 8],
  compatible_features: [80, 8],
  autoclear_features: [88, 8],
  refcount_order: [96, 4],
  header_length: [100, 4],
} as const;

export type HeaderField = keyof typeof HEADER;

export function readAt(file: string, offset: number, length: number): Buffer {
  const fd = openSync(file, 'r');
  try {
    const b = Buffer.alloc(length);
    readSync(fd, b, 0, length, offset);
    return b;
  } finally {
    closeSync(fd);
  }
}

export function writeAt(file: string, offset: number, bytes: Uint8Array): void {
  const fd = openSync(file, 'r+');
  try {
    writeSync(fd, bytes, 0, bytes.length, offset);
  } finally {
    closeSync(fd);
  }
}

export function getField(file: string, field: HeaderField): bigint {
  const [off, len] = HEADER[field];
  const b = readAt(file, off, len);
  return len === 8 ? b.readBigUInt64BE(0) : BigInt(b.readUInt32BE(0));
}

export function setField(file: string, field: HeaderField, value: bigint | number): void {
  const [off, len] = HEADER[field];
  const b = Buffer.alloc(len);
  if (len === 8) b.writeBigUInt64BE(BigInt(value));
  else b.writeUInt32BE(Number(value));
  writeAt(file, off, b);
}

export function u64(v: bigint | number): Buffer {
  const b = Buffer.alloc(8);
  b.writeBigUInt64BE(BigInt(v));
  return b;
}

/** Header extensions of a v3 image: type, data offset, length. */
export function headerExtensions(file: string): { type: number; offset: number; length: number }[] {
  const headerLength = Number(getField(file, 'header_length'));
  const cluster = readAt(file, 0, 1 << Number(getField(file, 'cluster_bits')));
  const out: { type: number; offset: number; length: number }[] = [];
  let p = headerLength;
  while (p + 8 <= cluster.length) {
    const type = cluster.readUInt32BE(p);
    const length = cluster.readUInt32BE(p + 4);
    if (type === 0) break;
    out.push({ type, offset: p + 8, length });
    p += 8 + Math.ceil(length / 8) * 8;
  }
  return out;
}

export const EXT_FEATURE_TABLE = 0x6803f857;
