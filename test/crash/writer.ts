// Child process of the crash test (bundled with esbuild, run with node): opens a qcow2 image
// writable and applies crashOps(seed) forever until it is killed (with compressed writes where the
// image's header allows them: see CrashDisk). It logs to a side file, with synchronous writes
// (they survive SIGKILL):
//   R            the image is open
//   S <k>        op k is about to start
//   F <n>        a flush returned: ops 0..n-1 are durable
//   E <json>     an op threw (then exit 1)
// Usage: node writer.js <image> <log> <seed> <virtualSize> <clusterSize> [qimg|qemu-io]
// The engine `qemu-io` drives a qemu-io child over stdin instead of qimg (a check of the crash
// test itself against QEMU; the test kills the whole process group).

import { spawn } from 'node:child_process';
import { mkdirSync, openSync, writeFileSync, writeSync } from 'node:fs';
import { openWritable, runOp, type WritableImage } from '../helpers/model.js';
import { crashOps, readCrashDisk } from './ops.js';

const [image, log, seed, virtualSize, clusterSize, engine = 'qimg'] = process.argv.slice(2);
const fd = openSync(log!, 'a');
const say = (line: string): void => {
  writeSync(fd, `${line}\n`);
};

/** A WritableImage that sends qemu-io commands; flush waits until qemu-io has done everything before it. */
async function qemuIoImage(file: string): Promise<WritableImage> {
  const dataDir = `${log}.data`;
  mkdirSync(dataDir, { recursive: true });
  const q = spawn('qemu-io', ['-f', 'qcow2', file], { stdio: ['pipe', 'pipe', 'pipe'] });
  let out = '';
  let answers = 0;
  let waiting: { n: number; resolve: () => void; reject: (e: Error) => void } | undefined;
  const onOutput = (d: Buffer): void => {
    out += d.toString();
    const lines = out.split('\n');
    out = lines.pop()!;
    for (const l of lines) {
      if (/failed|error/i.test(l)) waiting?.reject(new Error(`qemu-io: ${l}`));
      if (/^(qemu-io> )*\d+(\.\d+)? (bytes|KiB|MiB|GiB)$/.test(l)) answers++;
    }
    if (waiting && answers >= waiting.n) waiting.resolve();
  };
  q.stdout.on('data', onOutput);
  q.stderr.on('data', onOutput);
  let asked = 0;
  const send = (cmd: string): void => {
    q.stdin.write(`${cmd}\n`);
  };
  // qemu-io reads one command per wake-up of its event loop: lines that arrived together wait in
  // its input buffer until more input comes. While waiting for an answer, empty lines (no-ops)
  // keep it reading.
  const barrier = async (): Promise<void> => {
    send('length');
    const n = ++asked;
    const poke = setInterval(() => q.stdin.write('\n'), 10);
    try {
      await new Promise<void>((resolve, reject) => {
        waiting = { n, resolve, reject };
        if (answers >= n) resolve();
      });
    } finally {
      clearInterval(poke);
    }
  };
  let k = 0;
  const data = (d: Uint8Array): string => {
    const f = `${dataDir}/${k++ % 64}.bin`;
    writeFileSync(f, d);
    return f;
  };
  await barrier();
  return {
    virtualSize: Number(virtualSize),
    read: () => Promise.reject(new Error('not used')),
    // Data files are reused round-robin: wait for qemu-io every 32 commands so none is rewritten early.
    write: async (off, d) => {
      send(`write -s ${data(d)} ${off} ${d.length}`);
      if (k % 32 === 0) await barrier();
    },
    writeZeroes: async (off, len, o) => send(`write -z${o?.mayUnmap ? ' -u' : ''} ${off} ${len}`),
    discard: async (off, len) => send(`discard ${off} ${len}`),
    writeCompressed: async (off, d) => {
      send(`write -c -s ${data(d)} ${off} ${d.length}`);
      if (k % 32 === 0) await barrier();
    },
    flush: async () => {
      send('flush');
      await barrier();
    },
    close: async () => {
      q.stdin.end();
    },
  };
}

try {
  const disk = readCrashDisk(image!);
  if (disk.virtualSize !== Number(virtualSize) || disk.clusterSize !== Number(clusterSize)) {
    throw new Error(`the image is ${disk.virtualSize} bytes in ${disk.clusterSize}-byte clusters, expected ${virtualSize} in ${clusterSize}`);
  }
  const img = engine === 'qemu-io' ? await qemuIoImage(image!) : await openWritable(image!, { format: 'qcow2' });
  if (img.virtualSize !== Number(virtualSize)) throw new Error(`virtual size ${img.virtualSize}, expected ${virtualSize}`);
  say('R');
  let k = 0;
  for (const op of crashOps(Number(seed), disk)) {
    say(`S ${k}`);
    await runOp(img, op);
    k++;
    if (op.k === 'flush') say(`F ${k}`);
  }
} catch (e) {
  say(`E ${JSON.stringify(e instanceof Error ? (e.stack ?? e.message) : String(e))}`);
  process.exit(1);
}
