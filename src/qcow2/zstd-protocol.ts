// Messages between zstd-pool.ts and zstd-worker.ts.

export type ZstdRequest =
  /** length: the exact decompressed size (the cluster size). */
  | { id: number; op: 'decompress'; src: ArrayBuffer; length: number }
  /** length: maxLength; data null in the reply when the frame would be longer. */
  | { id: number; op: 'compress'; src: ArrayBuffer; length: number; level: number };

export type ZstdResponse =
  | { id: number; ok: true; data: ArrayBuffer | null }
  | { id: number; ok: false; name: string; message: string; data: Record<string, unknown> };
