// The printf-exact formatting the CLI relies on: size_to_str, %g/%f rounding, QDict order,
// QEMU's JSON quoting, the snapshot table, the getopt parser.

import { describe, expect, it, onTestFinished } from 'vitest';
import fc from 'fast-check';
import { checkProperty } from '../helpers/property.js';
import { altHex, formatFixed, formatG, sizeToStr } from '../../src/cli/cformat.js';
import { QDict, dumpHuman, quoteJson, tdbHash, toJsonPretty } from '../../src/cli/qobject.js';
import { snapshotHeader, snapshotRow } from '../../src/cli/info.js';
import { getopt, GetoptError, type OptionSpec } from '../../src/cli/getopt.js';
import { cvtnum, CliError } from '../../src/cli/common.js';
import { Progress } from '../../src/cli/progress.js';

describe('size_to_str', () => {
  it.each([
    [0, '0 B'],
    [1, '1 B'],
    [999, '999 B'],
    [1000, '0.977 KiB'],
    [1024, '1 KiB'],
    [200704, '196 KiB'],
    [1179648, '1.12 MiB'], // 1.125 exactly: glibc rounds the tie to even
    [1572864, '1.5 MiB'],
    [1023 * 1024, '0.999 MiB'],
    [Math.round(999.6 * 1024), '1e+03 KiB'],
    [64 * 2 ** 20, '64 MiB'],
    [16 * 2 ** 40, '16 TiB'],
    [2 ** 53, '8 PiB'],
  ])('%d -> %s', (n, s) => expect(sizeToStr(n)).toBe(s));
});

describe('C number formatting', () => {
  it('%.3g', () => {
    expect(formatG(0.0001234, 3)).toBe('0.000123');
    expect(formatG(0.00001234, 3)).toBe('1.23e-05');
    expect(formatG(123456, 3)).toBe('1.23e+05');
    expect(formatG(2.5, 1)).toBe('2'); // tie to even
    expect(formatG(3.5, 1)).toBe('4');
  });
  it('%.2f', () => {
    expect(formatFixed(12.125, 2)).toBe('12.12');
    expect(formatFixed(12.375, 2)).toBe('12.38');
    expect(formatFixed(0, 2)).toBe('0.00');
    expect(formatFixed(100, 2)).toBe('100.00');
  });
  it('%.2f agrees with toFixed away from exact ties', async () => {
    await checkProperty({ name: '%.2f vs toFixed', runs: 100 }, fc.double({ min: 0, max: 1000, noNaN: true }), async (x) => {
      const exactTie = Number.isInteger(x * 1000) && (x * 1000) % 10 === 5;
      if (!exactTie) expect(formatFixed(x, 2)).toBe(x.toFixed(2));
    });
  });
  it('%#x', () => {
    expect(altHex(0)).toBe('0');
    expect(altHex(65536)).toBe('0x10000');
  });
});

describe('QDict order and printing', () => {
  it('tdb hash', () => {
    // Bucket order of qemu-img info's top-level keys, as QEMU prints them.
    const keys = ['filename', 'format', 'dirty-flag', 'actual-size', 'virtual-size', 'cluster-size', 'format-specific'];
    const d = new QDict();
    for (const k of keys) d.put(k, 0);
    expect(d.ordered().map(([k]) => k)).toEqual([
      'virtual-size', 'filename', 'cluster-size', 'format', 'actual-size', 'format-specific', 'dirty-flag',
    ]);
    expect(tdbHash('')).toBe(12345);
  });
  it('JSON pretty printing with empty containers', () => {
    // QEMU's pretty JSON opens and closes an empty list or dict on two lines (e.g. the "flags"
    // of a disabled bitmap in `qemu-img info --output=json`).
    const d = new QDict().put('a', []).put('b', new QDict()).put('c', [1, 'x']);
    expect(toJsonPretty(d)).toBe('{\n    "a": [\n    ],\n    "b": {\n    },\n    "c": [\n        1,\n        "x"\n    ]\n}');
  });
  it('quotes as QEMU does', () => {
    expect(quoteJson('a"b\\c\n\t\u0001\u007f')).toBe('"a\\"b\\\\c\\n\\t\\u0001\\u007F"');
    expect(quoteJson('ü€😀')).toBe('"\\u00FC\\u20AC\\uD83D\\uDE00"');
    expect(quoteJson('\uFFFF\uD800')).toBe('"\\uFFFD\\uFFFD"');
  });
  it('human dump', () => {
    // As `qemu-img info` prints "Format specific information" (keys with spaces, list items as [i]).
    const d = new QDict().put('refcount-bits', 16).put('bitmaps', [new QDict().put('name', 'b').put('flags', ['auto'])]);
    expect(dumpHuman(d, 1)).toBe(
      '    bitmaps:\n        [0]:\n            flags:\n                [0]: auto\n            name: b\n    refcount bits: 16\n',
    );
  });
});

describe('snapshot table', () => {
  it('pads in bytes, prints vm state, clock and icount', () => {
    const tz = process.env.TZ;
    process.env.TZ = 'UTC';
    onTestFinished(() => {
      if (tz === undefined) delete process.env.TZ;
      else process.env.TZ = tz;
    });
    expect(snapshotHeader()).toBe('ID        TAG               VM SIZE                DATE     VM CLOCK     ICOUNT');
    const row = snapshotRow({
      id: '12', name: 'ä', vmStateSize: 1536 * 1024, dateSec: 1700000000, dateNsec: 5,
      vmClockNsec: (100 * 3600 + 61) * 1e9 + 789e6, icount: 123456,
    });
    // 'ä' is two bytes: C pads it to 16 bytes, so it looks one column short.
    expect(row).toBe('12        ä                1.5 MiB 2023-11-14 22:13:20100:01:01.789     123456');
  });
});

describe('getopt', () => {
  const specs: OptionSpec[] = [
    { key: 'f', short: 'f', long: 'format', hasArg: true },
    { key: 'U', short: 'U', long: 'force-share', hasArg: false },
    { key: 'output', long: 'output', hasArg: true },
    { key: 'object', long: 'object', hasArg: true },
  ];
  it('clusters, attached values, permutation, prefixes, --', () => {
    expect(getopt(['a', '-Ufqcow2', 'b', '--out=json', '--', '-c'], specs)).toEqual({
      options: [{ key: 'U' }, { key: 'f', value: 'qcow2' }, { key: 'output', value: 'json' }],
      operands: ['a', 'b', '-c'],
    });
  });
  it('ambiguous prefix is unrecognized', () => {
    expect(() => getopt(['--o=x'], specs)).toThrow(new GetoptError("unrecognized option '--o=x'"));
  });
  it('missing argument names the element', () => {
    expect(() => getopt(['x', '-Uf'], specs)).toThrow(new GetoptError("missing argument for option '-Uf'"));
  });
});

describe('cvtnum', () => {
  it.each([
    ['0', 0], ['512', 512], ['1k', 1024], ['1.5M', 1572864], ['0x10', 16], ['2G', 2 ** 31], ['1b', 1],
  ])('%s', (s, n) => expect(cvtnum('x', s)).toBe(n));
  it.each(['', '-1', '1x', '1.5', '1e3', 'k'])('rejects %j', (s) => expect(() => cvtnum('x', s)).toThrow(CliError));
  it('range', () => expect(() => cvtnum('x', '8E')).toThrow('Must be between 0 and 9223372036854775807.'));
});

describe('progress', () => {
  it('prints at 0, after each full percent, and at 100', () => {
    let out = '';
    const p = new Progress({ write: (t) => (out += t) });
    p.print(0, 100);
    p.print(0.5, 0);
    p.print(1.5, 0);
    p.print(2.0, 0);
    p.print(100, 0);
    p.print(100, 0);
    p.end();
    expect(out).toBe('    (0.00/100%)\r    (1.50/100%)\r    (100.00/100%)\r    (100.00/100%)\r\n');
  });
});
