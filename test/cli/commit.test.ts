// qimg commit against qemu-img commit 7.2: the same inputs made once and copied (test/cli/twin.ts), one
// committed by each tool; the same stdout, stderr and exit status, then QEMU judges qimg's files
// (clean check, qemu-img compare equal to qemu-img's own result for every file of the chain, alone
// and as a chain, same size and backing name). What qemu-img 7.2 does (block/mirror.c's active
// commit): everything the layers above the base allocate is written into the base (zero clusters
// as zero writes), and so are zeros where a layer between them ends before the overlay does; a
// base smaller than the overlay is grown to its size first; the overlay is then emptied (reads
// through to its backing file), unless -d or -b (which leave it, and any layer in between, as is).

import { describe, it } from 'vitest';
import { tmpDir } from '../helpers/qemu.js';
import { type FileSpec, type Step, expectSameImages, makeTwin, runTwin } from './twin.js';

const root = tmpDir('qimg-commit-');

type Files = FileSpec[];

/** base (1 MiB) <- mid (2 MiB) <- top (3 MiB): mid ends before top, base before both. */
function chain(opts: { base?: string; mid?: string; top?: string; rawBase?: boolean } = {}): Step[] {
  const o = (s: string | undefined): string[] => (s ? ['-o', s] : []);
  return [
    opts.rawBase ? { img: ['create', '-q', '-f', 'raw', 'base.img', '1M'] } : { img: ['create', '-q', '-f', 'qcow2', ...o(opts.base), 'base.img', '1M'] },
    { io: ['base.img', opts.rawBase ? 'raw' : 'qcow2', 'write -P 1 0 256k', 'write -P 5 768k 256k'] },
    { img: ['create', '-q', '-f', 'qcow2', ...o(opts.mid), '-b', 'base.img', '-F', opts.rawBase ? 'raw' : 'qcow2', 'mid.qcow2', '2M'] },
    { io: ['mid.qcow2', 'qcow2', 'write -P 2 128k 128k', 'write -P 7 1536k 64k', 'write -z 800k 100k'] },
    { img: ['create', '-q', '-f', 'qcow2', ...o(opts.top), '-b', 'mid.qcow2', '-F', 'qcow2', 'top.qcow2', '3M'] },
    { io: ['top.qcow2', 'qcow2', 'write -P 3 192k 128k', 'write -z 0 64k', 'write -P 9 2500k 3k', 'write -P 4 1000k 1k', 'write -z 1100k 512'] },
  ];
}

const ALL = (raw = false): Files => [['top.qcow2', 'qcow2'], ['mid.qcow2', 'qcow2'], ['base.img', raw ? 'raw' : 'qcow2']];

interface Case {
  name: string;
  steps: Step[];
  args: string[];
  files: Files;
  progress?: boolean;
}

const CASES: Case[] = [
  { name: 'into the backing file: the overlay emptied', steps: chain(), args: ['commit', 'top.qcow2'], files: ALL() },
  { name: '-b base through mid: base grown, mid and top unchanged', steps: chain(), args: ['commit', '-b', 'base.img', 'top.qcow2'], files: ALL() },
  { name: '-b naming the immediate backing file', steps: chain(), args: ['commit', '-b', 'mid.qcow2', 'top.qcow2'], files: ALL() },
  { name: '-d keeps the overlay', steps: chain(), args: ['commit', '-d', 'top.qcow2'], files: ALL() },
  { name: '-q and -r', steps: chain(), args: ['commit', '-q', '-r', '1G', '-t', 'none', 'top.qcow2'], files: ALL() },
  { name: '-p', steps: chain(), args: ['commit', '-p', 'mid.qcow2'], files: ALL(), progress: true },
  { name: 'mid into base (mid larger than base)', steps: chain(), args: ['commit', '-f', 'qcow2', 'mid.qcow2'], files: ALL() },
  { name: 'raw base grown', steps: chain({ rawBase: true }), args: ['commit', '-b', 'base.img', 'top.qcow2'], files: ALL(true) },
  {
    // Growing a v2 base over a backing file that reaches past its end needs zero clusters v2 lacks:
    // the job fails, and qemu-img reports it as a failed block job with the errno only.
    name: 'a v2 base that must grow over its own longer backing file: the job fails',
    steps: [
      { img: ['create', '-q', '-f', 'qcow2', 'under.qcow2', '2M'] },
      { io: ['under.qcow2', 'qcow2', 'write -P 6 1536k 64k'] },
      { img: ['create', '-q', '-f', 'qcow2', '-o', 'compat=0.10', '-b', 'under.qcow2', '-F', 'qcow2', 'base.qcow2', '1M'] },
      { img: ['create', '-q', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', 'top.qcow2', '2M'] },
      { io: ['top.qcow2', 'qcow2', 'write -P 3 0 64k'] },
    ],
    args: ['commit', 'top.qcow2'], files: [['top.qcow2', 'qcow2'], ['base.qcow2', 'qcow2'], ['under.qcow2', 'qcow2']],
  },
  { name: 'raw base, mid emptied', steps: chain({ rawBase: true }), args: ['commit', 'mid.qcow2'], files: ALL(true) },
  {
    name: '512 B clusters over 2 MiB clusters, refcount_bits 1 and 64',
    steps: chain({ base: 'cluster_size=2M,refcount_bits=1', mid: 'cluster_size=512,refcount_bits=64', top: 'cluster_size=512' }),
    args: ['commit', '-b', 'base.img', 'top.qcow2'], files: ALL(),
  },
  {
    name: '512 B cluster overlay emptied into a 2 MiB cluster file',
    steps: chain({ mid: 'cluster_size=2M,refcount_bits=64', top: 'cluster_size=512,refcount_bits=1' }),
    args: ['commit', 'top.qcow2'], files: ALL(),
  },
  { name: 'compat 0.10 everywhere', steps: chain({ base: 'compat=0.10', mid: 'compat=0.10', top: 'compat=0.10' }), args: ['commit', 'top.qcow2'], files: ALL() },
  {
    name: 'extended L2 (subcluster writes) into a plain file',
    steps: chain({ top: 'extended_l2=on,cluster_size=64k', mid: 'extended_l2=on' }),
    args: ['commit', 'top.qcow2'], files: ALL(),
  },
  {
    name: 'compressed clusters in the overlay',
    steps: [...chain(), { io: ['top.qcow2', 'qcow2', 'write -c -P 6 2M 128k', 'write -c -P 8 0 64k'] }],
    args: ['commit', 'top.qcow2'], files: ALL(),
  },
  {
    name: 'an overlay with an internal snapshot (it keeps the snapshot)',
    steps: [...chain(), { img: ['snapshot', '-c', 's1', 'top.qcow2'] }, { io: ['top.qcow2', 'qcow2', 'write -P 10 64k 64k'] }],
    args: ['commit', 'top.qcow2'], files: ALL(),
  },
  {
    name: 'an overlay whose L2 tables a snapshot shares',
    steps: [...chain(), { img: ['snapshot', '-c', 's1', 'top.qcow2'] }],
    args: ['commit', 'top.qcow2'], files: ALL(),
  },
  {
    name: 'persistent bitmaps in the overlay and the base',
    steps: [...chain(), { img: ['bitmap', '--add', 'top.qcow2', 'b0'] }, { img: ['bitmap', '--add', 'mid.qcow2', 'b1'] }, { io: ['top.qcow2', 'qcow2', 'write -P 11 1M 64k'] }],
    args: ['commit', 'top.qcow2'], files: ALL(),
  },
  {
    // base (4 MiB, data everywhere) <- mid <- m2 (2 MiB) <- top (4 MiB): past m2's end the top reads
    // zeros, which -b mid must write into mid (else mid would show the base's data there).
    name: '-b through a layer shorter than the overlay: zeros past its end',
    steps: [
      { img: ['create', '-q', '-f', 'qcow2', 'base.img', '4M'] },
      { io: ['base.img', 'qcow2', 'write -P 1 0 4M'] },
      { img: ['create', '-q', '-f', 'qcow2', '-b', 'base.img', '-F', 'qcow2', 'mid.qcow2', '4M'] },
      { img: ['create', '-q', '-f', 'qcow2', '-b', 'mid.qcow2', '-F', 'qcow2', 'm2.qcow2', '2M'] },
      { io: ['m2.qcow2', 'qcow2', 'write -P 2 1M 64k'] },
      { img: ['create', '-q', '-f', 'qcow2', '-b', 'm2.qcow2', '-F', 'qcow2', 'top.qcow2', '4M'] },
      { io: ['top.qcow2', 'qcow2', 'write -P 3 3M 64k'] },
    ],
    args: ['commit', '-b', 'mid.qcow2', 'top.qcow2'],
    files: [['top.qcow2', 'qcow2'], ['m2.qcow2', 'qcow2'], ['mid.qcow2', 'qcow2'], ['base.img', 'qcow2']],
  },
  // Refusals.
  { name: 'no backing file', steps: chain(), args: ['commit', 'base.img'], files: ALL() },
  { name: 'a raw image (probed: the raw warning first)', steps: chain({ rawBase: true }), args: ['commit', 'base.img'], files: ALL(true) },
  { name: '-b not in the chain', steps: chain(), args: ['commit', '-b', 'nope.qcow2', 'top.qcow2'], files: ALL() },
  { name: '-b naming the image itself', steps: chain(), args: ['commit', '-b', 'top.qcow2', 'top.qcow2'], files: ALL() },
  { name: '-p with an error', steps: chain(), args: ['commit', '-p', 'base.img'], files: ALL() },
  { name: 'invalid cache mode', steps: chain(), args: ['commit', '-t', 'bogus', 'top.qcow2'], files: ALL() },
  { name: 'invalid rate', steps: chain(), args: ['commit', '-r', '12x', 'top.qcow2'], files: ALL() },
  {
    name: 'the backing file is gone',
    steps: [{ img: ['create', '-q', '-f', 'qcow2', '-u', '-b', 'gone.qcow2', '-F', 'qcow2', 'top.qcow2', '1M'] }],
    args: ['commit', 'top.qcow2'], files: [['top.qcow2', 'qcow2', { chain: false }]],
  },
  { name: 'no file name', steps: [], args: ['commit'], files: [] },
  { name: 'two file names', steps: [], args: ['commit', 'a', 'b'], files: [] },
  { name: 'missing file', steps: [], args: ['commit', 'missing.qcow2'], files: [] },
  { name: 'unknown option', steps: [], args: ['commit', '-x', 'a'], files: [] },
];

describe.concurrent('qimg commit against qemu-img commit', () => {
  for (const [i, c] of CASES.entries()) {
    it(c.name, async () => {
      const twin = await makeTwin(root, `c${i}`, c.steps);
      await runTwin(twin, c.args, { progress: c.progress ?? false });
      await expectSameImages(twin, c.files);
    });
  }
});
