// printf-style number formatting as glibc does it, for output that must equal qemu-img's byte for byte.
//
// JavaScript's toPrecision/toFixed break exact decimal ties upwards, glibc breaks them to even
// (12.125 -> "12.12" with %.2f), so the rounding here is done on the exact binary value with BigInt.

/** The exact value of a finite non-negative double as numerator / 2^shift. */
function exactRational(x: number): { num: bigint; den: bigint } {
  if (!Number.isFinite(x) || x < 0) throw new RangeError(`cannot format ${x}`);
  if (Number.isInteger(x)) return { num: BigInt(x), den: 1n };
  let shift = 0n;
  let v = x;
  // Scale by 2 until integral: at most 1074 steps for the smallest subnormal; exact in binary.
  while (!Number.isInteger(v)) {
    v *= 2;
    shift++;
  }
  return { num: BigInt(v), den: 1n << shift };
}

/** num/den rounded to an integer, ties to even. */
function roundHalfEven(num: bigint, den: bigint): bigint {
  const q = num / den;
  const r2 = (num % den) * 2n;
  if (r2 > den || (r2 === den && (q & 1n) === 1n)) return q + 1n;
  return q;
}

function pow10(n: number): bigint {
  return 10n ** BigInt(n);
}

/** Decimal exponent e with 10^e <= num/den < 10^(e+1); num > 0. */
function decimalExponent(num: bigint, den: bigint): number {
  let e = num.toString().length - den.toString().length;
  // Adjust by at most one step either way.
  for (;;) {
    const lowOk = e >= 0 ? num >= den * pow10(e) : num * pow10(-e) >= den;
    if (!lowOk) {
      e--;
      continue;
    }
    const highOk = e + 1 >= 0 ? num < den * pow10(e + 1) : num * pow10(-(e + 1)) < den;
    if (!highOk) {
      e++;
      continue;
    }
    return e;
  }
}

/** num/den * 10^k rounded half-even. */
function scaledRound(num: bigint, den: bigint, k: number): bigint {
  return k >= 0 ? roundHalfEven(num * pow10(k), den) : roundHalfEven(num, den * pow10(-k));
}

/** C's "%.{precision}g" for a non-negative double (no '#' flag: trailing zeros removed). */
export function formatG(x: number, precision = 6): string {
  const p = precision === 0 ? 1 : precision;
  if (x === 0) return '0';
  const { num, den } = exactRational(x);
  let exp = decimalExponent(num, den);
  let digits = scaledRound(num, den, p - 1 - exp);
  if (digits === pow10(p)) {
    digits = pow10(p - 1);
    exp++;
  }
  const s = digits.toString();
  if (exp < -4 || exp >= p) {
    let mant = s.length > 1 ? `${s[0]}.${s.slice(1)}` : s;
    if (mant.includes('.')) mant = mant.replace(/0+$/, '').replace(/\.$/, '');
    const sign = exp < 0 ? '-' : '+';
    const e = String(Math.abs(exp)).padStart(2, '0');
    return `${mant}e${sign}${e}`;
  }
  // Fixed notation with p - 1 - exp decimals.
  const decimals = p - 1 - exp;
  let out: string;
  if (decimals <= 0) {
    out = s + '0'.repeat(-decimals);
  } else {
    const padded = s.padStart(decimals + 1, '0');
    out = `${padded.slice(0, padded.length - decimals)}.${padded.slice(padded.length - decimals)}`;
    out = out.replace(/0+$/, '').replace(/\.$/, '');
  }
  return out;
}

/** C's "%.{decimals}f" for a non-negative double. */
export function formatFixed(x: number, decimals: number): string {
  const { num, den } = exactRational(x);
  const v = scaledRound(num, den, decimals).toString();
  if (decimals === 0) return v;
  const padded = v.padStart(decimals + 1, '0');
  return `${padded.slice(0, padded.length - decimals)}.${padded.slice(padded.length - decimals)}`;
}

const IEC_PREFIXES = ['', 'Ki', 'Mi', 'Gi', 'Ti', 'Pi', 'Ei'];

/** The exponent frexp() returns: x = m * 2^e with 0.5 <= m < 1 (0 for x = 0). */
function frexpExponent(x: number): number {
  if (x === 0) return 0;
  let e = Math.floor(Math.log2(x)) + 1;
  // Math.log2 may be off by one near powers of two; settle it with exact comparisons.
  while (2 ** (e - 1) > x) e--;
  while (2 ** e <= x) e++;
  return e;
}

/**
 * QEMU's size_to_str: the binary prefix is chosen so that the printed number stays below 1000
 * ("1000 B" prints as "0.977 KiB"), then "%0.3g" of the scaled value.
 */
export function sizeToStr(bytes: number): string {
  let e = frexpExponent(bytes / (1000 / 1024));
  // C integer division truncates toward zero: (0 - 1) / 10 is 0.
  e = Math.trunc((e - 1) / 10) * 10;
  const scaled = bytes / 2 ** e;
  return `${formatG(scaled, 3)} ${IEC_PREFIXES[e / 10]}B`;
}

/** C's "%#x": 0 prints as "0", anything else with a 0x prefix. */
export function altHex(n: number): string {
  return n === 0 ? '0' : `0x${n.toString(16)}`;
}

/** Pads to a width counted in bytes (C's printf counts bytes, not characters). */
export function padEndBytes(s: string, width: number): string {
  const len = Buffer.byteLength(s, 'utf8');
  return len >= width ? s : s + ' '.repeat(width - len);
}

export function padStartBytes(s: string, width: number): string {
  const len = Buffer.byteLength(s, 'utf8');
  return len >= width ? s : ' '.repeat(width - len) + s;
}

/** C's "%02d"-style zero padding of a non-negative integer. */
export function zeroPad(n: number, width: number): string {
  return String(n).padStart(width, '0');
}
