// Error classes: one per kind, each with a stable code and a message that can be shown to a user as is.

export type QimgErrorCode =
  | 'FORMAT' // the image's metadata is invalid or corrupt
  | 'UNSUPPORTED' // a valid feature qimg does not handle
  | 'IO' // the storage failed
  | 'USAGE' // the caller asked for something impossible
  | 'NOT_FOUND'; // a named file or snapshot does not exist

export class QimgError extends Error {
  readonly code: QimgErrorCode;
  readonly data: Record<string, unknown>;
  constructor(code: QimgErrorCode, message: string, data: Record<string, unknown> = {}, options?: { cause?: unknown }) {
    super(message, options);
    this.name = 'QimgError';
    this.code = code;
    this.data = data;
  }
  toJSON(): { name: string; code: QimgErrorCode; message: string; data: Record<string, unknown> } {
    return { name: this.name, code: this.code, message: this.message, data: this.data };
  }
}

/** Metadata that breaks the format's rules (names the table, index and offset where known). */
export class FormatError extends QimgError {
  constructor(message: string, data: Record<string, unknown> = {}) {
    super('FORMAT', message, data);
    this.name = 'FormatError';
  }
}

/** A well-formed image using something qimg does not implement (encryption, unknown feature bits). */
export class UnsupportedError extends QimgError {
  constructor(message: string, data: Record<string, unknown> = {}) {
    super('UNSUPPORTED', message, data);
    this.name = 'UnsupportedError';
  }
}

export class IoError extends QimgError {
  constructor(message: string, data: Record<string, unknown> = {}, options?: { cause?: unknown }) {
    super('IO', message, data, options);
    this.name = 'IoError';
  }
}

export class UsageError extends QimgError {
  constructor(message: string, data: Record<string, unknown> = {}) {
    super('USAGE', message, data);
    this.name = 'UsageError';
  }
}

export class NotFoundError extends QimgError {
  constructor(message: string, data: Record<string, unknown> = {}) {
    super('NOT_FOUND', message, data);
    this.name = 'NotFoundError';
  }
}
