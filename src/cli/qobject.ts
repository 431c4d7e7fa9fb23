// QEMU's QObject output as qemu-img prints it: the JSON pretty printer and the human "key: value"
// dump of format-specific information.
//
// QEMU builds a QDict (a 512-bucket hash table) from the QAPI struct, member by member, and prints
// it by walking the buckets in order; each bucket lists its newest key first. So the key order
// of qemu-img's output is the hash order, not the schema order, and is reproduced here exactly.

export type QValue = QDict | QValue[] | string | number | boolean;

/** A dictionary built in QAPI member order (the insertion order decides bucket collisions). */
export class QDict {
  private readonly entries: [string, QValue][] = [];

  put(key: string, value: QValue): this {
    const i = this.entries.findIndex(([k]) => k === key);
    if (i >= 0) this.entries[i]![1] = value;
    else this.entries.push([key, value]);
    return this;
  }

  /** Puts the value when it is not undefined (QAPI's optional members). */
  putOptional(key: string, value: QValue | undefined): this {
    return value === undefined ? this : this.put(key, value);
  }

  get(key: string): QValue | undefined {
    return this.entries.find(([k]) => k === key)?.[1];
  }

  /** The entries in the order QEMU iterates the hash table. */
  ordered(): [string, QValue][] {
    const withBucket = this.entries.map(([k, v], index) => ({ k, v, index, bucket: tdbHash(k) % QDICT_BUCKETS }));
    withBucket.sort((a, b) => a.bucket - b.bucket || b.index - a.index);
    return withBucket.map(({ k, v }) => [k, v]);
  }
}

const QDICT_BUCKETS = 512;

/** The hash QEMU's QDict uses (from the TDB database), over the key's bytes, in uint32 arithmetic. */
export function tdbHash(key: string): number {
  const bytes = Buffer.from(key, 'utf8');
  let value = Math.imul(0x238f13af, bytes.length) >>> 0;
  for (let i = 0; i < bytes.length; i++) {
    value = (value + (bytes[i]! << ((i * 5) % 24))) >>> 0;
  }
  return (Math.imul(1103515243, value) + 12345) >>> 0;
}

/**
 * A JSON string as QEMU quotes it: the usual escapes, other control characters, DEL and every
 * non-ASCII character as \uXXXX (upper-case hex, surrogate pairs beyond the BMP); text that is not
 * valid Unicode (lone surrogates, noncharacters) becomes U+FFFD.
 */
export function quoteJson(s: string): string {
  let out = '"';
  for (const ch of s) {
    let cp = ch.codePointAt(0)!;
    switch (cp) {
      case 0x22: out += '\\"'; continue;
      case 0x5c: out += '\\\\'; continue;
      case 0x08: out += '\\b'; continue;
      case 0x0c: out += '\\f'; continue;
      case 0x0a: out += '\\n'; continue;
      case 0x0d: out += '\\r'; continue;
      case 0x09: out += '\\t'; continue;
    }
    if (!isValidCodepoint(cp)) cp = 0xfffd;
    if (cp > 0xffff) {
      out += `\\u${hex4(0xd800 + ((cp - 0x10000) >> 10))}\\u${hex4(0xdc00 + ((cp - 0x10000) & 0x3ff))}`;
    } else if (cp < 0x20 || cp >= 0x7f) {
      out += `\\u${hex4(cp)}`;
    } else {
      out += ch;
    }
  }
  return out + '"';
}

function hex4(n: number): string {
  return n.toString(16).toUpperCase().padStart(4, '0');
}

function isValidCodepoint(cp: number): boolean {
  if (cp >= 0xd800 && cp <= 0xdfff) return false; // surrogates
  if (cp >= 0xfdd0 && cp <= 0xfdef) return false; // noncharacters
  if ((cp & 0xfffe) === 0xfffe) return false; // U+xFFFE, U+xFFFF
  return cp <= 0x10ffff;
}

function scalar(v: string | number | boolean): string {
  if (typeof v === 'string') return quoteJson(v);
  if (typeof v === 'boolean') return v ? 'true' : 'false';
  return String(v);
}

/** qobject_to_json_pretty: 4-space indentation, "key": value, empty containers open and close on two lines. */
export function toJsonPretty(v: QValue, level = 0): string {
  const pad = (n: number): string => ' '.repeat(n * 4);
  if (v instanceof QDict || Array.isArray(v)) {
    const items: [string | null, QValue][] = v instanceof QDict ? v.ordered() : v.map((x) => [null, x]);
    const [open, close] = v instanceof QDict ? ['{', '}'] : ['[', ']'];
    let out = open;
    items.forEach(([k, x], i) => {
      out += `${i > 0 ? ',' : ''}\n${pad(level + 1)}${k === null ? '' : `${quoteJson(k)}: `}${toJsonPretty(x, level + 1)}`;
    });
    return `${out}\n${pad(level)}${close}`;
  }
  return scalar(v);
}

/**
 * The human dump of a QObject (qemu-img info's "Format specific information"): dashes in keys
 * become spaces, list items print as "[i]:", nested containers go one level (4 spaces) deeper.
 */
export function dumpHuman(v: QValue, indentation: number): string {
  const pad = ' '.repeat(indentation * 4);
  let out = '';
  if (v instanceof QDict || Array.isArray(v)) {
    const items: [string, QValue][] =
      v instanceof QDict ? v.ordered().map(([k, x]) => [k.replace(/-/g, ' '), x]) : v.map((x, i) => [`[${i}]`, x]);
    for (const [label, x] of items) {
      const composite = x instanceof QDict || Array.isArray(x);
      out += `${pad}${label}:${composite ? '\n' : ' '}`;
      out += dumpHuman(x, indentation + 1);
      if (!composite) out += '\n';
    }
    return out;
  }
  return typeof v === 'boolean' ? (v ? 'true' : 'false') : String(v);
}
