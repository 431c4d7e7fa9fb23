// Persistent dirty bitmaps: the directory is read for `info`; bitmap data is kept intact, never interpreted.

import { FormatError } from '../errors.js';
import type { Storage } from '../io/storage.js';
import { readFullZeroFill } from '../io/storage.js';
import type { BitmapInfo } from '../info.js';
import type { BitmapsExtension } from './header.js';
import { BITMAP_FLAG_AUTO, BITMAP_FLAG_IN_USE } from './layout.js';

const decoder = new TextDecoder();

export async function readBitmapDirectory(storage: Storage, ext: BitmapsExtension): Promise<BitmapInfo[]> {
  const size = await storage.size();
  if (ext.directoryOffset + ext.directorySize > size) throw new FormatError('bitmaps_ext: bitmap directory is past the end of the file');
  const dir = new Uint8Array(ext.directorySize);
  await readFullZeroFill(storage, dir, ext.directoryOffset);
  const view = new DataView(dir.buffer);
  const out: BitmapInfo[] = [];
  let pos = 0;
  for (let i = 0; i < ext.nbBitmaps; i++) {
    if (pos + 24 > dir.length) throw new FormatError('Bitmap directory is too small for its bitmaps');
    const flags = view.getUint32(pos + 12);
    const granularityBits = view.getUint8(pos + 17);
    const nameSize = view.getUint16(pos + 18);
    const extraSize = view.getUint32(pos + 20);
    const entrySize = 24 + extraSize + nameSize;
    if (pos + entrySize > dir.length) throw new FormatError('Bitmap directory entry is out of bounds');
    const name = decoder.decode(dir.subarray(pos + 24 + extraSize, pos + entrySize));
    const names: string[] = [];
    if (flags & BITMAP_FLAG_IN_USE) names.push('in-use');
    if (flags & BITMAP_FLAG_AUTO) names.push('auto');
    out.push({ name, granularity: 2 ** granularityBits, flags: names });
    pos += (entrySize + 7) & ~7;
  }
  return out;
}
