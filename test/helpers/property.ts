// One way to run a fast-check property in this suite: a seed that is always printed (so any run can
// be replayed with QIMG_PROP_SEED), a number of cases, and optionally a wall-clock budget that may
// end the run early but never before a minimum number of cases has run (a slow machine takes
// longer; it does not test less). The budget is checked only before a case starts: the case in
// flight always finishes, and a failure in it is reported (with its shrinking cut short by the
// budget), never dropped.
//
// Environment: QIMG_PROP_SEED=<n> replays a run; QIMG_PROP_SCALE=<x> multiplies every run count,
// minimum and budget (a long soak: QIMG_PROP_SCALE=20).

import fc from 'fast-check';

export interface PropertyRun {
  /** Printed with the seed and the number of cases run. */
  name: string;
  /** Cases to run when the budget allows. */
  runs: number;
  /** Cases that run whatever the budget. Default: runs. */
  minRuns?: number;
  /** Wall-clock budget in ms after which no new case starts (once minRuns have run). Default: none. */
  budgetMs?: number;
  /** A fixed seed; only where the test says why. Default: QIMG_PROP_SEED or a random one. */
  seed?: number;
}

export interface PropertyResult {
  seed: number;
  runs: number;
  ms: number;
}

const scale = Number(process.env.QIMG_PROP_SCALE ?? 1) > 0 ? Number(process.env.QIMG_PROP_SCALE ?? 1) : 1;

/** The seed a property run uses: QIMG_PROP_SEED when set, otherwise a fresh random one. */
export function propertySeed(fixed?: number): number {
  const env = process.env.QIMG_PROP_SEED;
  if (env !== undefined && env !== '') return Number(env) | 0;
  if (fixed !== undefined) return fixed;
  return (Math.random() * 2 ** 31) | 0;
}

/**
 * Runs `predicate` on values of `arbitrary`; throws fast-check's report (counterexample, seed, path,
 * the error) on a failure.
 */
export async function checkProperty<T>(
  opts: PropertyRun,
  arbitrary: fc.Arbitrary<T>,
  predicate: (value: T) => Promise<void>,
): Promise<PropertyResult> {
  const seed = propertySeed(opts.seed);
  const runs = Math.max(1, Math.round(opts.runs * scale));
  const minRuns = Math.min(runs, Math.max(1, Math.round((opts.minRuns ?? opts.runs) * scale)));
  const budgetMs = opts.budgetMs === undefined ? undefined : opts.budgetMs * scale;
  // Printed first too: a case that hangs ends in the test's timeout, and the seed must be known then.
  process.stdout.write(`property "${opts.name}": seed ${seed} (replay: QIMG_PROP_SEED=${seed})\n`);
  const t0 = Date.now();
  let started = 0;
  let failing = false;
  const property = fc.asyncProperty(arbitrary, async (value) => {
    // Past the budget, with the minimum done and no failure being shrunk: end the run here. While
    // shrinking a failure, the budget cuts the shrinking short (the failure found so far stands).
    if (budgetMs !== undefined && Date.now() - t0 > budgetMs && (failing || started >= minRuns)) {
      throw new fc.PreconditionFailure(true);
    }
    if (!failing) started++;
    try {
      await predicate(value);
    } catch (e) {
      failing = true;
      throw e;
    }
  });
  const details = await fc.check(property, { numRuns: runs, seed, endOnFailure: false });
  const ms = Date.now() - t0;
  const cases = details.failed ? started : details.numRuns;
  const line = `property "${opts.name}": seed ${seed}, ${cases} case(s) of ${runs} in ${(ms / 1000).toFixed(1)} s (replay: QIMG_PROP_SEED=${seed})`;
  process.stdout.write(`${line}\n`);
  if (details.failed) {
    const err = details.errorInstance;
    const cause = err instanceof Error ? (err.stack ?? err.message) : String(err);
    throw new Error(`${line}\n${fc.defaultReportMessage(details) ?? 'failed'}\n\n${cause}`);
  }
  // The budget is only looked at once minRuns cases have run; this holds unless fast-check changes.
  if (details.numRuns < minRuns) throw new Error(`${line}: ran ${details.numRuns} case(s), fewer than the minimum ${minRuns}`);
  return { seed, runs: details.numRuns, ms };
}
