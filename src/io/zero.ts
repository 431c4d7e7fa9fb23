// Zero detection and bounded zero writing, shared by the backends and the src/sparse fallbacks.

/** A shared all-zero block; never written to. Views of it are handed only to writes and compares. */
const ZERO_BLOCK_SIZE = 1 << 20;
let zeroBlock: Uint8Array | undefined;

/** A read-only-by-convention zero buffer of at least `length` bytes (capped at 1 MiB). */
export function zeroBuffer(length: number): Uint8Array {
  zeroBlock ??= new Uint8Array(ZERO_BLOCK_SIZE);
  return zeroBlock.subarray(0, Math.min(length, ZERO_BLOCK_SIZE));
}

/**
 * True when every byte of buf is zero. Compares with memcmp (Buffer.compare) against the shared
 * zero block, so large buffers cost no per-byte JavaScript loop.
 */
export function isZero(buf: Uint8Array): boolean {
  const len = buf.length;
  if (len === 0) return true;
  // Cheap rejects first: most data blocks have a nonzero byte at one end.
  if (buf[0] !== 0 || buf[len - 1] !== 0) return false;
  if (len <= 64) {
    for (let i = 1; i < len - 1; i++) if (buf[i] !== 0) return false;
    return true;
  }
  const zeros = zeroBuffer(ZERO_BLOCK_SIZE);
  for (let pos = 0; pos < len; pos += ZERO_BLOCK_SIZE) {
    const n = Math.min(ZERO_BLOCK_SIZE, len - pos);
    const view = Buffer.from(buf.buffer, buf.byteOffset + pos, n);
    if (Buffer.compare(view, n === ZERO_BLOCK_SIZE ? zeros : zeros.subarray(0, n)) !== 0) return false;
  }
  return true;
}

/**
 * Makes [offset, offset+length) read as zeros by writing zero bytes through `write`, in bounded
 * chunks from the shared zero block. When `read` is given, chunks that already read as zeros are
 * skipped, so holes in a sparse file are not filled in (a write of zeros would allocate them).
 */
export async function writeZeroBytes(
  write: (buf: Uint8Array, offset: number) => Promise<void>,
  offset: number,
  length: number,
  read?: (buf: Uint8Array, offset: number) => Promise<number>,
): Promise<void> {
  const end = offset + length;
  const scratch = read ? new Uint8Array(Math.min(ZERO_BLOCK_SIZE, length)) : undefined;
  for (let pos = offset; pos < end; ) {
    const n = Math.min(ZERO_BLOCK_SIZE, end - pos);
    if (read && scratch) {
      const chunk = scratch.subarray(0, n);
      let got = 0;
      while (got < n) {
        const r = await read(chunk.subarray(got), pos + got);
        if (r <= 0) break;
        got += r;
      }
      // Past end of storage the bytes must still be written (the range extends the storage).
      if (got === n && isZero(chunk)) {
        pos += n;
        continue;
      }
    }
    await write(zeroBuffer(n), pos);
    pos += n;
  }
}
