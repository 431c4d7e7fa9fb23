// Argument checks shared by the storage backends.

import { IoError, UsageError } from '../errors.js';

/** Offsets and lengths must be non-negative safe integers (byte addresses up to 2^53). */
export function checkRange(name: string, offset: number, length: number): void {
  if (!Number.isSafeInteger(offset) || offset < 0 || !Number.isSafeInteger(length) || length < 0 ||
      !Number.isSafeInteger(offset + length)) {
    throw new UsageError(`Invalid range on '${name}': offset ${offset}, length ${length}`, { name, offset, length });
  }
}

export function checkWritable(name: string, readOnly: boolean): void {
  if (readOnly) throw new IoError(`Could not write to '${name}': Read-only storage`, { name, errno: 'EROFS' });
}

export function checkOpen(name: string, closed: boolean): void {
  if (closed) throw new IoError(`Could not access '${name}': Storage is closed`, { name, errno: 'EBADF' });
}
