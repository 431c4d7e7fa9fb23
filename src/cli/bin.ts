// The CLI's entry point: bundled as dist/cli-main.cjs, which launch.ts (dist/cli.cjs) runs.
import { runCli } from './main.js';

runCli();
