// Messages between zstd-pool.ts and zstd-worker.ts.

export type ZstdRequest =
  /** length: the exact decompressed size (the cluster size). */
  | { id: number; op: 'decompress'; src: ArrayBuffer; length: number }
  /** length: maxLength; data null in the reply when the frame would be longer. */
  | { id: number; op: 'compress'; src: ArrayBuffer; length: number; level: number };

export type ZstdResponse =
  | { id: number; ok: true; data: ArrayBuffer | null }
  | { id: number; ok: false; name: string; message: string; data: Record<string, unknown> };

/**
 * A batch for the native compressor (libzstd in the worker, see ZstdNativePool): the inputs lie
 * one after the other from byte 0 of `input` (lengths[k] bytes each); frame k is written at
 * sum(zstdRoom(lengths[j]), j < k) in `output`. Both buffers are shared and reused by the pool.
 */
export interface ZstdBatchRequest {
  op: 'compress-batch';
  lane: number;
  input: SharedArrayBuffer;
  output: SharedArrayBuffer;
  lengths: number[];
  level: number;
}

/** sizes[k]: frame k's length, or -(ZSTD error code) (70: it did not fit its room). */
export type ZstdBatchResponse =
  | { lane: number; ok: true; sizes: number[] }
  | { lane: number; ok: false; message: string };

/**
 * Output room for one input: at least ZSTD_compressBound (len + len/256 + up to 64), so a frame
 * that fits the caller's limit never fails for lack of room mid-way.
 */
export function zstdRoom(length: number): number {
  return length + (length >>> 8) + 128;
}
