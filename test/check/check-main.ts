// Test entry: `node check-main.js <check args>` runs qimg check as main.ts will once the command
// is registered (stdout/stderr written through, qemu-img's error conventions, the exit status).
import { cmdCheck } from '../../src/cli/check.js';
import { reportError, type CliContext } from '../../src/cli/common.js';

const ctx: CliContext = {
  stdout: { write: (t) => void process.stdout.write(t) },
  stderr: { write: (t) => void process.stderr.write(t) },
};

async function run(): Promise<number> {
  try {
    return await cmdCheck(process.argv.slice(2), ctx, () => 0);
  } catch (e) {
    return reportError(ctx, e);
  }
}

void run().then((code) => {
  process.stdout.write('', () => process.stderr.write('', () => process.exit(code)));
});
