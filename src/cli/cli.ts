// dist/cli.cjs, the `qimg` executable: see launch.ts.
import path from 'node:path';
import { launch } from './launch.js';

launch(path.join(__dirname, 'cli-main.cjs'), path.join(__dirname, 'cli-main.cache'));
