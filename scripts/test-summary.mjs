// Prints vitest's JSON report as one plain closing line ("tests: N passed, N failed, N skipped in
// M min S s"), after naming every skipped or todo test (their titles say why they cannot run), and
// exits non-zero when anything failed.
import { readFileSync } from 'node:fs';
import { relative } from 'node:path';

const file = process.argv[2] ?? '.tmp/vitest.json';
let report;
try {
  report = JSON.parse(readFileSync(file, 'utf8'));
} catch (e) {
  console.log(`tests: 0 passed, 1 failed`);
  console.error(`no vitest report at ${file}: ${e.message}`);
  process.exit(1);
}
const files = report.testResults ?? [];
const passed = report.numPassedTests ?? 0;
// A test file that fails to load counts as a failure even though none of its tests ran.
const brokenFiles = files.filter(
  (f) => f.status === 'failed' && !(f.assertionResults ?? []).some((a) => a.status === 'failed'),
).length;
const failed = (report.numFailedTests ?? 0) + brokenFiles;
const skipped = (report.numPendingTests ?? 0) + (report.numTodoTests ?? 0);
for (const f of files) {
  for (const a of f.assertionResults ?? []) {
    if (a.status !== 'passed' && a.status !== 'failed') {
      console.log(`${a.status}: ${relative(process.cwd(), f.name)} > ${a.fullName}`);
    }
  }
}
const end = Math.max(report.startTime ?? 0, ...files.map((f) => f.endTime ?? 0));
const secs = Math.round((end - (report.startTime ?? end)) / 1000);
console.log(`tests: ${passed} passed, ${failed} failed, ${skipped} skipped in ${Math.floor(secs / 60)} min ${secs % 60} s`);
process.exit(report.success && failed === 0 && passed > 0 ? 0 : 1);
