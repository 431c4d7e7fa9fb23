// Child process of the crash test (bundled with esbuild, run with node): opens a qcow2 image
// writable and applies crashOps(seed) forever until it is killed. It logs to a side file, with
// synchronous writes (they survive SIGKILL):
//   R            the image is open
//   S <k>        op k is about to start
//   F <n>        a flush returned: ops 0..n-1 are durable
//   E <json>     an op threw (then exit 1)
// Usage: node writer.js <image> <log> <seed> <virtualSize> <clusterSize>

import { openSync, writeSync } from 'node:fs';
import { openWritable, runOp } from '../helpers/model.js';
import { crashOps } from './ops.js';

const [image, log, seed, virtualSize, clusterSize] = process.argv.slice(2);
const fd = openSync(log!, 'a');
const say = (line: string): void => {
  writeSync(fd, `${line}\n`);
};

try {
  const img = await openWritable(image!, { format: 'qcow2' });
  if (img.virtualSize !== Number(virtualSize)) throw new Error(`virtual size ${img.virtualSize}, expected ${virtualSize}`);
  say('R');
  let k = 0;
  for (const op of crashOps(Number(seed), { virtualSize: Number(virtualSize), clusterSize: Number(clusterSize) })) {
    say(`S ${k}`);
    await runOp(img, op);
    k++;
    if (op.k === 'flush') say(`F ${k}`);
  }
} catch (e) {
  say(`E ${JSON.stringify(e instanceof Error ? (e.stack ?? e.message) : String(e))}`);
  process.exit(1);
}
