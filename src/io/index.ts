// The storage layer's public pieces.

export type { Storage, StorageExtent, StorageGate, OpenStorageOptions } from './storage.js';
export { readFullZeroFill } from './storage.js';
export { MemoryStorage, type MemoryStorageOptions } from './memory.js';
export { FileStorage, strerror, type FileStorageOptions } from './file.js';
export { loadNative, nativeAllowed, type NativeFileOps } from './native.js';
export {
  fileGate,
  createFileGate,
  denyGate,
  memoryGate,
  resolveRelativeName,
  unclosableView,
  type FileGateOptions,
} from './gate.js';
export { isZero } from './zero.js';
export {
  LockError,
  imageLockingAvailable,
  onLockingUnavailable,
  PERM_ALL,
  PERM_CONSISTENT_READ,
  PERM_RESIZE,
  PERM_WRITE,
  PERM_WRITE_UNCHANGED,
  type HeldLocks,
  type LockPerms,
} from './lock.js';
