// Preloaded (`node --import`) into a qimg CLI child by tests that must know, without timing
// anything, that the rate limiter has started to wait: each setTimeout the program asks for is
// reported as a line "setTimeout <ms>" on file descriptor 3 when the parent opened one. The timers
// themselves are the real ones; the program runs as it would without the probe.

import { writeSync } from 'node:fs';

const realSetTimeout = globalThis.setTimeout;

globalThis.setTimeout = function probedSetTimeout(callback, ms, ...args) {
  try {
    writeSync(3, `setTimeout ${Number(ms)}\n`);
  } catch {
    // No descriptor 3 (run without the test's pipe): nothing to report to.
  }
  return realSetTimeout.call(this, callback, ms, ...args);
};
