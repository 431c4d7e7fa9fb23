// qimg rebase against qemu-img rebase 7.2: the same inputs made once and copied (test/cli/twin.ts), one
// rebased by each tool; the same stdout, stderr and exit status, then QEMU judges qimg's files
// (clean check, qemu-img compare equal to qemu-img's result alone and as a chain, same backing
// name and format in the header). What qemu-img 7.2 does (img_rebase):
//  - safe mode: in 2 MiB steps, each range the image does not allocate itself is read from the
//    old and the new backing chain (zeros past either's end); differing 512-byte sectors are
//    written into the image (zero writes where the old chain ends); onto a layer of its own chain,
//    only ranges the layers in between allocate are compared; then the header names the new file;
//  - the name is written as given; a relative one is opened relative to the image's directory;
//  - -u only rewrites the header (the old backing file is not opened); -b "" stands the image alone;
//  - a backing file without -F is refused after the copy ("backing format must be specified").

import { describe, it } from 'vitest';
import { tmpDir } from '../helpers/qemu.js';
import { type FileSpec, type Step, expectSameImages, makeTwin, runTwin } from './twin.js';

const root = tmpDir('qimg-rebase-');

type Files = FileSpec[];

/**
 * base (1 MiB) <- mid (2 MiB) <- top (3 MiB), and other.img (2.5 MiB) holding some of what the
 * chain below top holds, the rest different.
 */
function chain(opts: { base?: string; mid?: string; top?: string; other?: string; rawOther?: boolean } = {}): Step[] {
  const o = (s: string | undefined): string[] => (s ? ['-o', s] : []);
  const otherFmt = opts.rawOther ? 'raw' : 'qcow2';
  return [
    { img: ['create', '-q', '-f', 'qcow2', ...o(opts.base), 'base.qcow2', '1M'] },
    { io: ['base.qcow2', 'qcow2', 'write -P 1 0 256k', 'write -P 5 768k 256k'] },
    { img: ['create', '-q', '-f', 'qcow2', ...o(opts.mid), '-b', 'base.qcow2', '-F', 'qcow2', 'mid.qcow2', '2M'] },
    { io: ['mid.qcow2', 'qcow2', 'write -P 2 128k 128k', 'write -P 7 1536k 64k', 'write -z 800k 100k'] },
    { img: ['create', '-q', '-f', 'qcow2', ...o(opts.top), '-b', 'mid.qcow2', '-F', 'qcow2', 'top.qcow2', '3M'] },
    { io: ['top.qcow2', 'qcow2', 'write -P 3 192k 128k', 'write -z 0 64k', 'write -P 9 2500k 3k', 'write -P 4 1000k 1k'] },
    { img: ['create', '-q', '-f', otherFmt, ...o(opts.other), 'other.img', '2560k'] },
    // Same as the chain at 0..128k and 768k..800k; different elsewhere (odd sectors differ too),
    // also past the end of mid (where the old chain reads zeros: zero writes into the overlay).
    { io: ['other.img', otherFmt, 'write -P 1 0 128k', 'write -P 1 128k 100k', 'write -P 5 768k 32k', 'write -P 12 1100k 1k', 'write -P 13 1300k 200k', 'write -P 14 2200k 9k'] },
  ];
}

const ALL = (other: 'qcow2' | 'raw' = 'qcow2'): Files => [['top.qcow2', 'qcow2'], ['mid.qcow2', 'qcow2'], ['base.qcow2', 'qcow2'], ['other.img', other]];

interface Case {
  name: string;
  steps: Step[];
  args: string[];
  files: Files;
  subdirs?: string[];
}

const CASES: Case[] = [
  { name: 'onto another file', steps: chain(), args: ['rebase', '-b', 'other.img', '-F', 'qcow2', 'top.qcow2'], files: ALL() },
  { name: 'onto a layer further down its chain', steps: chain(), args: ['rebase', '-b', 'base.qcow2', '-F', 'qcow2', 'top.qcow2'], files: ALL() },
  { name: 'onto nothing (-b "")', steps: chain(), args: ['rebase', '-b', '', 'top.qcow2'], files: ALL() },
  { name: 'onto a raw file, -p', steps: chain({ rawOther: true }), args: ['rebase', '-p', '-b', 'other.img', '-F', 'raw', 'top.qcow2'], files: ALL('raw') },
  { name: 'a file with no backing file onto one', steps: chain(), args: ['rebase', '-b', 'other.img', '-F', 'qcow2', 'base.qcow2'], files: ALL() },
  { name: '-u', steps: chain(), args: ['rebase', '-u', '-b', 'other.img', '-F', 'qcow2', 'top.qcow2'], files: ALL() },
  { name: '-u without -b removes the backing file', steps: chain(), args: ['rebase', '-u', 'top.qcow2'], files: ALL() },
  { name: '-u onto a missing file, -q -t -T', steps: chain(), args: ['rebase', '-q', '-t', 'none', '-T', 'writeback', '-u', '-b', 'gone.qcow2', '-F', 'qcow2', 'top.qcow2'], files: [['top.qcow2', 'qcow2', { chain: false }]] },
  {
    name: '-u when the old backing file is gone',
    steps: [
      { img: ['create', '-q', '-f', 'qcow2', '-u', '-b', 'gone.qcow2', '-F', 'qcow2', 'top.qcow2', '1M'] },
      { img: ['create', '-q', '-f', 'qcow2', 'other.img', '1M'] },
    ],
    args: ['rebase', '-u', '-b', 'other.img', '-F', 'qcow2', 'top.qcow2'], files: [['top.qcow2', 'qcow2']],
  },
  {
    name: 'a relative name is opened relative to the image and written as given',
    steps: [
      { img: ['create', '-q', '-f', 'qcow2', 'sub/base.qcow2', '1M'] },
      { io: ['sub/base.qcow2', 'qcow2', 'write -P 1 0 64k'] },
      { img: ['create', '-q', '-f', 'qcow2', 'sub/top.qcow2', '1M'] },
      { io: ['sub/top.qcow2', 'qcow2', 'write -P 2 512k 64k'] },
    ],
    subdirs: ['sub'],
    args: ['rebase', '-b', 'base.qcow2', '-F', 'qcow2', 'sub/top.qcow2'],
    files: [['sub/top.qcow2', 'qcow2'], ['sub/base.qcow2', 'qcow2']],
  },
  {
    name: '512 B and 2 MiB clusters, refcount_bits 1 and 64',
    steps: chain({ top: 'cluster_size=512,refcount_bits=1', mid: 'cluster_size=2M', other: 'cluster_size=2M,refcount_bits=64' }),
    args: ['rebase', '-b', 'other.img', '-F', 'qcow2', 'top.qcow2'], files: ALL(),
  },
  { name: '2 MiB cluster overlay', steps: chain({ top: 'cluster_size=2M,refcount_bits=64' }), args: ['rebase', '-b', 'other.img', '-F', 'qcow2', 'top.qcow2'], files: ALL() },
  { name: 'compat 0.10', steps: chain({ base: 'compat=0.10', mid: 'compat=0.10', top: 'compat=0.10' }), args: ['rebase', '-b', 'other.img', '-F', 'qcow2', 'top.qcow2'], files: ALL() },
  { name: 'extended L2 overlay', steps: chain({ top: 'extended_l2=on' }), args: ['rebase', '-b', 'other.img', '-F', 'qcow2', 'top.qcow2'], files: ALL() },
  {
    name: 'compressed clusters in the overlay',
    steps: [...chain(), { io: ['top.qcow2', 'qcow2', 'write -c -P 6 2M 128k', 'write -c -P 8 64k 64k'] }],
    args: ['rebase', '-b', 'other.img', '-F', 'qcow2', 'top.qcow2'], files: ALL(),
  },
  // Refusals.
  { name: 'no -F: the copy is done, the header refused', steps: chain(), args: ['rebase', '-b', 'other.img', 'top.qcow2'], files: ALL() },
  { name: '-u, no -F', steps: chain(), args: ['rebase', '-u', '-b', 'other.img', 'top.qcow2'], files: ALL() },
  { name: 'missing new backing file', steps: chain(), args: ['rebase', '-b', 'gone.qcow2', '-F', 'qcow2', 'top.qcow2'], files: ALL() },
  { name: 'unknown -F', steps: chain(), args: ['rebase', '-b', 'other.img', '-F', 'nosuch', 'top.qcow2'], files: ALL() },
  { name: 'name longer than 1023 bytes', steps: chain(), args: ['rebase', '-u', '-b', `${'d/'.repeat(520)}x`, '-F', 'qcow2', 'top.qcow2'], files: ALL() },
  { name: 'a raw image (probed: the raw warning first)', steps: chain({ rawOther: true }), args: ['rebase', '-b', 'base.qcow2', '-F', 'qcow2', 'other.img'], files: ALL('raw') },
  { name: 'a raw image, -u -f raw -b ""', steps: chain({ rawOther: true }), args: ['rebase', '-u', '-f', 'raw', '-b', '', 'other.img'], files: ALL('raw') },
  { name: 'onto itself', steps: chain(), args: ['rebase', '-b', 'top.qcow2', '-F', 'qcow2', 'top.qcow2'], files: ALL() },
  {
    name: 'safe mode when the old backing file is gone',
    steps: [{ img: ['create', '-q', '-f', 'qcow2', '-u', '-b', 'gone.qcow2', '-F', 'qcow2', 'top.qcow2', '1M'] }, { img: ['create', '-q', '-f', 'qcow2', 'other.img', '1M'] }],
    args: ['rebase', '-b', 'other.img', '-F', 'qcow2', 'top.qcow2'], files: [['top.qcow2', 'qcow2', { chain: false }]],
  },
  {
    // The new backing file has data in part of a cluster the image leaves unallocated: the zeros
    // the image read there must stay zeros (qemu-img writes a zero cluster; qimg once skipped the
    // partial zero write because, without a backing file yet, the cluster already read as zeros).
    name: 'a file with no backing file onto one with data in part of an unallocated cluster',
    steps: [
      { img: ['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=4k', 'top.qcow2', '16k'] },
      { img: ['create', '-q', '-f', 'raw', 'other.img', '80k'] },
      { io: ['other.img', 'raw', 'write -P 100 8192 1536'] },
    ],
    args: ['rebase', '-b', 'other.img', '-F', 'raw', 'top.qcow2'], files: [['top.qcow2', 'qcow2'], ['other.img', 'raw']],
  },
  {
    name: 'the same with extended L2 subclusters',
    steps: [
      { img: ['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=64k,extended_l2=on', 'top.qcow2', '256k'] },
      { img: ['create', '-q', '-f', 'raw', 'other.img', '320k'] },
      { io: ['other.img', 'raw', 'write -P 100 65536 1536', 'write -P 101 140k 6k'] },
    ],
    args: ['rebase', '-b', 'other.img', '-F', 'raw', 'top.qcow2'], files: [['top.qcow2', 'qcow2'], ['other.img', 'raw']],
  },
  { name: 'neither -b nor -u', steps: [], args: ['rebase', 'top.qcow2'], files: [] },
  { name: 'invalid cache mode, -p', steps: chain(), args: ['rebase', '-p', '-t', 'bad', '-b', '', 'top.qcow2'], files: ALL() },
  { name: 'invalid source cache mode', steps: chain(), args: ['rebase', '-T', 'bad', '-b', '', 'top.qcow2'], files: ALL() },
  { name: 'no file name', steps: [], args: ['rebase', '-u'], files: [] },
  { name: 'missing image', steps: [], args: ['rebase', '-u', 'gone.qcow2'], files: [] },
];

describe.concurrent('qimg rebase against qemu-img rebase', () => {
  for (const [i, c] of CASES.entries()) {
    it(c.name, async () => {
      const twin = await makeTwin(root, `r${i}`, c.steps, c.subdirs ?? []);
      await runTwin(twin, c.args);
      await expectSameImages(twin, c.files);
    });
  }

  it('a backing name that does not fit in the header cluster', async () => {
    // 512-byte clusters: the 112-byte header, the format extension, the end marker and a
    // 400-byte name do not fit.
    const twin = await makeTwin(root, 'rspace', [{ img: ['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=512', 'top.qcow2', '1M'] }]);
    await runTwin(twin, ['rebase', '-u', '-b', 'n'.repeat(400), '-F', 'qcow2', 'top.qcow2']);
    await expectSameImages(twin, [['top.qcow2', 'qcow2']]);
  });
});
