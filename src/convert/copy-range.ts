// qemu-img convert -C (copy offloading): data requests are copied without passing through a
// buffer and without sparse detection, as QEMU's copy_range does (on Linux files, copy_file_range).
// The source side is walked mapping by mapping, as QEMU's format drivers forward copy_range: data
// is copied from its host file, zeros are written as zeros, unallocated ranges come from the
// backing file (zeros without one), and a compressed cluster cannot be offloaded: the copy stops
// there and reports failure (QEMU's -ENOTSUP), after which the caller copies this request and all
// later ones the ordinary way (qemu-img turns copy offloading off at the first failure).
//
// The kernel copy is used when both ends are files and the native helpers are loaded; otherwise
// (koffi missing, QIMG_NO_NATIVE=1, a target that is not a plain file) the bytes are read and
// written as they are, which yields the same target.

import type { Image } from '../image.js';
import type { Storage } from '../io/storage.js';
import { readFullZeroFill } from '../io/storage.js';
import { FileStorage } from '../io/file.js';
import { loadNative } from '../io/native.js';

/** Where a copied range goes: a raw file (kernel copy possible) or any writer of guest bytes. */
export interface CopyRangeTarget {
  /** The target file for the kernel copy (raw targets), else null. */
  file: Storage | null;
  write(offset: number, data: Uint8Array): Promise<void>;
  /** Zeros without unmapping (QEMU's copy_range writes zeroes with no flags). */
  writeZeroes(offset: number, length: number): Promise<void>;
}

/** Largest single read/write when the copy is emulated. */
const CHUNK = 1024 * 1024;

/**
 * Copies guest bytes [offset, offset+length) of `image` to `dst` of the target. Returns false when
 * the range cannot be offloaded (a compressed cluster, bytes past the end of a source file, a
 * refused kernel copy); what was copied before the failure stays copied, as in QEMU.
 */
export async function copyRange(image: Image, offset: number, length: number, target: CopyRangeTarget, dst: number): Promise<boolean> {
  if (offset + length > image.virtualSize) {
    // QEMU copies up to the source's end, then the kernel copies nothing more: a failure.
    const inside = Math.max(0, image.virtualSize - offset);
    if (inside > 0 && !(await copyRange(image, offset, inside, target, dst))) return false;
    return false;
  }
  let pos = 0;
  while (pos < length) {
    const m = await image.driver.getMapping(offset + pos, length - pos);
    const n = Math.min(m.length, length - pos);
    switch (m.kind) {
      case 'data':
        if (!(await copyHost(m.storage, m.hostOffset, n, target, dst + pos))) return false;
        break;
      case 'zero':
        await target.writeZeroes(dst + pos, n);
        break;
      case 'unallocated': {
        const backing = image.backing;
        const inBacking = backing ? Math.max(0, Math.min(n, backing.virtualSize - (offset + pos))) : 0;
        if (inBacking > 0 && !(await copyRange(backing!, offset + pos, inBacking, target, dst + pos))) return false;
        if (inBacking < n) await target.writeZeroes(dst + pos + inBacking, n - inBacking);
        break;
      }
      case 'compressed':
        return false;
    }
    pos += n;
  }
  return true;
}

/** Host bytes to the target: copy_file_range when both are files and native helpers load, else read + write. */
async function copyHost(src: Storage, host: number, length: number, target: CopyRangeTarget, dst: number): Promise<boolean> {
  const native = loadNative();
  const out = target.file;
  if (native && src instanceof FileStorage && out instanceof FileStorage && src.nativeEnabled && out.nativeEnabled) {
    let done = 0;
    while (done < length) {
      // On the thread pool: a kernel copy of a whole request would otherwise hold the event loop.
      const r = await new Promise<number>((resolve) =>
        native.copyFileRangeAsync(src.fd, host + done, out.fd, dst + done, length - done, resolve),
      );
      // Nothing copied (past the source's end) or an error (EXDEV, ENOSYS, ...): QEMU gives up offloading.
      if (r <= 0) return false;
      done += r;
    }
    return true;
  }
  const size = await src.size();
  const buf = new Uint8Array(Math.min(length, CHUNK));
  for (let done = 0; done < length; ) {
    const n = Math.min(buf.length, length - done);
    // The kernel copy stops at the source's end; so does this one.
    if (host + done + n > size) {
      const part = Math.max(0, size - (host + done));
      if (part > 0) {
        await readFullZeroFill(src, buf.subarray(0, part), host + done);
        await target.write(dst + done, buf.subarray(0, part));
      }
      return false;
    }
    const chunk = buf.subarray(0, n);
    await readFullZeroFill(src, chunk, host + done);
    await target.write(dst + done, chunk);
    done += n;
  }
  return true;
}
