// MemoryStorage specifics: a huge sparse address space costs only the chunks written.

import { describe, expect, it } from 'vitest';
import { MemoryStorage } from '../../src/io/memory.js';
import { storageExtents } from '../../src/sparse/extents.js';

const TiB = 2 ** 40;

/**
 * Counts how often the storage looks a chunk index up (has/get) in its chunk map: the work a
 * range operation does. The map is the storage's private field; it is swapped for a counting copy.
 */
function countLookups(s: MemoryStorage): { lookups: number } {
  const counter = { lookups: 0 };
  class CountingMap<K, V> extends Map<K, V> {
    override has(key: K): boolean {
      counter.lookups++;
      return super.has(key);
    }
    override get(key: K): V | undefined {
      counter.lookups++;
      return super.get(key);
    }
  }
  const holder = s as unknown as { chunks: Map<number, Uint8Array> };
  if (!(holder.chunks instanceof Map)) throw new Error('MemoryStorage keeps its chunks elsewhere now: update countLookups');
  holder.chunks = new CountingMap(holder.chunks);
  return counter;
}

describe('MemoryStorage over a 16 TiB address space', () => {
  it('writes, reads, reports extents and allocated size looking up only the chunks that exist', async () => {
    // 2^28 chunk indices: a walk over every index would look up 268 million of them.
    const s = new MemoryStorage(undefined, { name: 'big', chunkSize: 65536 });
    await s.truncate(16 * TiB);
    await s.write(new Uint8Array([1, 2, 3]), 16 * TiB - 3);
    await s.write(new Uint8Array([4]), 5 * TiB + 70000);
    const counter = countLookups(s);
    const ext = await storageExtents(s, 0, 16 * TiB);
    expect(ext).toEqual([
      { offset: 0, length: 5 * TiB + 65536, hole: true },
      { offset: 5 * TiB + 65536, length: 65536, hole: false },
      { offset: 5 * TiB + 131072, length: 11 * TiB - 131072 - 65536, hole: true },
      { offset: 16 * TiB - 65536, length: 65536, hole: false },
    ]);
    // The two chunks present, found through the sorted index: no lookup per absent index.
    expect(counter.lookups).toBeLessThanOrEqual(2);
    expect(await s.allocatedSize()).toBe(2 * 65536);
    const buf = new Uint8Array(8);
    expect(await s.read(buf, 16 * TiB - 5)).toBe(5);
    expect([...buf.subarray(0, 5)]).toEqual([0, 0, 1, 2, 3]);
    counter.lookups = 0;
    await s.discard(0, 16 * TiB);
    expect(counter.lookups).toBeLessThanOrEqual(2);
    expect(await s.allocatedSize()).toBe(0);
    expect(await s.size()).toBe(16 * TiB);
    expect(await storageExtents(s, 0, 16 * TiB)).toEqual([{ offset: 0, length: 16 * TiB, hole: true }]);
  });

  it('drops chunks that an initial buffer leaves all zero', async () => {
    const init = new Uint8Array(300_000);
    init[200_000] = 7;
    const s = new MemoryStorage(init, 'init');
    expect(s.name).toBe('init');
    expect(await s.allocatedSize()).toBe(65536);
    expect(s.toUint8Array()).toHaveLength(300_000);
    expect(s.toUint8Array()[200_000]).toBe(7);
  });
});
