// QEMU's image locking, the rules in one place (QEMU 7.2, block/file-posix.c and the permission
// rules of block.c; facts in /work/shared/QCOW2-FACTS.md, "Image locking").
//
// Every file an image consists of is locked with Linux open-file-description (OFD) byte locks, one
// byte per permission: holding permission bit i takes a shared lock on byte 100 + i, refusing to
// share it with other users takes a shared lock on byte 200 + i. Locks are never exclusive: a
// conflict is found by testing (F_OFD_GETLK) whether an exclusive lock on the other byte would be
// refused, i.e. whether any other open file description holds it. QEMU and qimg processes thus
// see each other, and two descriptions of one file inside one process conflict the same way.

import { IoError } from '../errors.js';
import { loadNative, type OfdLockOps } from './native.js';

/** BLK_PERM_* (include/block/block-common.h): the permissions, one bit each. */
export const PERM_CONSISTENT_READ = 0x1;
export const PERM_WRITE = 0x2;
export const PERM_WRITE_UNCHANGED = 0x4;
export const PERM_RESIZE = 0x8;
export const PERM_ALL = 0xf;

/** bdrv_perm_names: the name each bit has in QEMU's messages, by bit index. */
const PERM_NAMES = ['consistent read', 'write', 'write unchanged', 'resize'] as const;
const PERM_BITS = PERM_NAMES.length;

/** The byte a holder of permission bit i locks; and the byte of one not sharing it. */
export const LOCK_PERM_BASE = 100;
export const LOCK_SHARED_BASE = 200;

/** What one user of a file holds (`perm`) and lets others hold (`shared`), as BLK_PERM_* masks. */
export interface LockPerms {
  perm: number;
  shared: number;
}

/** The lock bytes one open file description holds, as masks of permission bits. */
export interface HeldLocks {
  /** Bytes 100 + i. */
  perm: number;
  /** Bytes 200 + i (permissions not shared). */
  unshared: number;
}

export const NOTHING_HELD: HeldLocks = { perm: 0, unshared: 0 };

/**
 * How a caller opens an image, in the terms of qemu-img's open flags (blk_new_open): what the
 * top of the image is asked for, before the format passes it down to its files.
 */
export interface ImageUse {
  /** BDRV_O_RDWR: the image is written. */
  writable?: boolean;
  /** BDRV_O_RESIZE: its virtual size changes (qemu-img resize). */
  resize?: boolean;
  /** BDRV_O_NO_IO: only metadata is looked at (qemu-img info); consistent read is not needed. */
  metadataOnly?: boolean;
  /** BDRV_O_NO_SHARE: others may only read while it is open (qemu-img convert's sources). */
  shareOnlyReads?: boolean;
}

/** The permissions qemu-img's BlockBackend asks of an image's top node. */
export function userPerms(use: ImageUse): LockPerms {
  let perm = use.metadataOnly ? 0 : PERM_CONSISTENT_READ;
  if (use.writable) perm |= PERM_WRITE;
  if (use.resize) perm |= PERM_RESIZE;
  const shared = use.shareOnlyReads ? PERM_CONSISTENT_READ | PERM_WRITE_UNCHANGED : PERM_ALL;
  return { perm, shared };
}

/**
 * What a format node asks of the file that holds it, given what is asked of the node. raw passes
 * the request through. qcow2's file holds metadata (bdrv_default_perms_for_storage): it is read
 * consistently unless only metadata is looked at, written and resized when the node is writable,
 * and never shared with other writers or resizers.
 */
export function imageFilePerms(
  format: 'qcow2' | 'raw', node: LockPerms, opts: { writable: boolean; metadataOnly?: boolean },
): LockPerms {
  if (format === 'raw') return node;
  let perm = node.perm;
  if (opts.writable) perm |= PERM_WRITE | PERM_RESIZE;
  if (!opts.metadataOnly) perm |= PERM_CONSISTENT_READ;
  return { perm, shared: node.shared & ~(PERM_WRITE | PERM_RESIZE) };
}

/**
 * What a qcow2 node asks of its external data file: the node's request, never letting others
 * resize it (the format relies on its size), and a writer may also grow it.
 */
export function dataFilePerms(node: LockPerms): LockPerms {
  let perm = node.perm;
  if (perm & PERM_WRITE_UNCHANGED) perm |= PERM_WRITE;
  if (perm & PERM_WRITE) perm |= PERM_RESIZE;
  return { perm, shared: node.shared & ~PERM_RESIZE };
}

/**
 * What an image asks of its backing image (bdrv_default_perms_for_cow): only consistent read, and
 * it lets others write and resize the backing file only when it lets them write the image itself.
 */
export function backingPerms(node: LockPerms): LockPerms {
  const perm = node.perm & PERM_CONSISTENT_READ;
  const shared = (node.shared & PERM_WRITE ? PERM_WRITE | PERM_RESIZE : 0) | PERM_CONSISTENT_READ | PERM_WRITE_UNCHANGED;
  return { perm, shared };
}

/** -U (force-share): the same permissions held, everything shared. */
export function forceShared(perms: LockPerms): LockPerms {
  return { perm: perms.perm, shared: PERM_ALL };
}

/**
 * Creating (or truncating) an image file (raw_co_create): it is written and sized, and nobody else
 * may resize it meanwhile.
 */
export const CREATE_PERMS: LockPerms = { perm: PERM_WRITE | PERM_RESIZE, shared: PERM_ALL & ~PERM_RESIZE };

/** Refused lock: QEMU's message, plus its hint line (`data.hint`, ending in a newline). */
export class LockError extends IoError {
  constructor(message: string, path: string, data: Record<string, unknown> = {}) {
    super(message, { path, hint: `Is another process using the image [${path}]?\n`, ...data });
    this.name = 'LockError';
  }
}

/** The result of applyLocks: the bytes now held, or why the request was refused. */
export type LockOutcome =
  | { ok: true; held: HeldLocks }
  | { ok: false; held: HeldLocks; unsupported: boolean; error: IoError };

const EAGAIN = 11;
const EACCES = 13;
const EINVAL = 22;

/**
 * Moves the locks of one open file description from `held` to what `want` needs, as QEMU's
 * raw_handle_perm_lock does: first take every byte the new request needs (keeping the old ones),
 * then test for conflicting holders, and only then drop the bytes no longer needed. On a conflict
 * the description goes back to `held`. `errnoText` renders an errno for the rare system failure.
 */
export function applyLocks(
  ops: OfdLockOps, fd: number, path: string, held: HeldLocks, want: LockPerms, errnoText: (errno: number) => string,
): LockOutcome {
  const target: HeldLocks = { perm: want.perm & PERM_ALL, unshared: ~want.shared & PERM_ALL };
  const fail = (error: IoError, unsupported = false): LockOutcome => {
    setBytes(ops, fd, held, { perm: held.perm | target.perm, unshared: held.unshared | target.unshared });
    return { ok: false, held, unsupported, error };
  };
  // Taking bytes never conflicts (all locks are shared); QEMU skips the test when nothing is added.
  const growing = (target.perm & ~held.perm) !== 0 || (target.unshared & ~held.unshared) !== 0;
  if (growing) {
    const union = { perm: held.perm | target.perm, unshared: held.unshared | target.unshared };
    for (const [mask, base] of [[union.perm, LOCK_PERM_BASE], [union.unshared, LOCK_SHARED_BASE]] as const) {
      const already = base === LOCK_PERM_BASE ? held.perm : held.unshared;
      for (let i = 0; i < PERM_BITS; i++) {
        const bit = 1 << i;
        if (!(mask & bit) || already & bit) continue;
        const r = ops.set(fd, base + i, false);
        if (r < 0) {
          const errno = -r;
          return fail(systemError(`Failed to lock byte ${base + i}`, path, errno, errnoText), errno === EINVAL);
        }
      }
    }
    // Wanting a permission conflicts with anyone refusing to share it...
    for (let i = 0; i < PERM_BITS; i++) {
      if (!(target.perm & (1 << i))) continue;
      const r = ops.test(fd, LOCK_SHARED_BASE + i);
      if (r !== 0) return fail(refusal(`Failed to get "${PERM_NAMES[i]}" lock`, path, r, errnoText));
    }
    // ...and refusing to share one conflicts with anyone holding it.
    for (let i = 0; i < PERM_BITS; i++) {
      if (!(target.unshared & (1 << i))) continue;
      const r = ops.test(fd, LOCK_PERM_BASE + i);
      if (r !== 0) return fail(refusal(`Failed to get shared "${PERM_NAMES[i]}" lock`, path, r, errnoText));
    }
  }
  setBytes(ops, fd, target, { perm: held.perm | target.perm, unshared: held.unshared | target.unshared });
  return { ok: true, held: target };
}

/** Releases the bytes of `from` that `keep` does not hold (unlocking cannot conflict; errors are ignored as QEMU does). */
function setBytes(ops: OfdLockOps, fd: number, keep: HeldLocks, from: HeldLocks): void {
  for (let i = 0; i < PERM_BITS; i++) {
    const bit = 1 << i;
    if (from.perm & bit && !(keep.perm & bit)) ops.set(fd, LOCK_PERM_BASE + i, true);
    if (from.unshared & bit && !(keep.unshared & bit)) ops.set(fd, LOCK_SHARED_BASE + i, true);
  }
}

/** A conflict reads as the bare message; a failing system call adds its error (raw_lock_error_setg_errno). */
function refusal(message: string, path: string, r: number, errnoText: (errno: number) => string): IoError {
  if (r > 0) return new LockError(message, path);
  return systemError(message, path, -r, errnoText);
}

function systemError(message: string, path: string, errno: number, errnoText: (errno: number) => string): IoError {
  if (errno === EAGAIN || errno === EACCES) return new LockError(message, path, { errno });
  return new LockError(`${message}: ${errnoText(errno)}`, path, { errno });
}

// ---- Availability: without the native binding (or OFD locks), files are opened without locks.

let unavailableListener: (() => void) | undefined;

/**
 * Whether image locks can be taken in this process (the native binding with fcntl OFD locks).
 * Loads the binding. A kernel without OFD locks is only found out at the first lock.
 */
export function imageLockingAvailable(): boolean {
  return loadNative()?.ofdLocks !== undefined;
}

/**
 * Registers the function called each time a lock was wanted but could not be taken because image
 * locking is unavailable here (no koffi, QIMG_NO_NATIVE=1, another platform, a kernel without OFD
 * locks). The library itself never prints; the CLI prints its one-line notice from this.
 * Returns the previous listener.
 */
export function onLockingUnavailable(listener: (() => void) | undefined): (() => void) | undefined {
  const previous = unavailableListener;
  unavailableListener = listener;
  return previous;
}

/** Called by the storage that could not lock. */
export function reportLockingUnavailable(): void {
  unavailableListener?.();
}
