// The public API.

export { Image, type CreateSnapshotOptions, type BlockStatus, type FormatDriver, type ImageFormat, type ShallowMapping } from './image.js';
export { openImage, probeFormat, type OpenImageOptions, type OpenedImage } from './open.js';
export type { ImageInfo, SnapshotInfo, BitmapInfo, Qcow2SpecificInfo } from './info.js';
export * from './errors.js';
export * from './io/index.js';
export { Qcow2Driver } from './qcow2/qcow2.js';
export { RawDriver } from './raw/raw.js';
export { createImage, formattingLine, type CreateImageOptions, type CreateImageResult } from './create.js';
export { convert, type ConvertOptions } from './convert/convert.js';
export { commitImage, type CommitOptions } from './commit.js';
export { rebaseImage, type RebaseOptions } from './rebase.js';
export { compareImages, CompareError, type CompareOptions, type CompareResult } from './compare.js';
export { storageExtents } from './sparse/extents.js';
