// A getopt_long-compatible argument parser, driven by a declarative option table per subcommand.
//
// Why not commander: qemu-img parses with GNU getopt_long, and qimg must accept exactly the same
// command lines and fail on the same ones with the same messages. getopt permutes (options may
// follow the file names), clusters short options (`-Uf qcow2`), takes attached values (`-fqcow2`,
// `--output=json`), accepts unambiguous long-option prefixes (`--out json`), stops at `--`, and
// reports `missing argument for option '-f'` / `unrecognized option '--foo'` naming the argv
// element as qemu-img does. Commander differs on several of these (prefixes, its own error texts
// and exit codes, help handling), so a small parser that follows getopt is simpler and exact.

export interface OptionSpec {
  /** The key options are reported under (for example 'f' or 'output'). */
  key: string;
  /** Short option letter, if any. */
  short?: string;
  /** Long option name without dashes, if any. */
  long?: string;
  /** Whether the option takes an argument (required_argument); optional arguments are not used by qemu-img. */
  hasArg: boolean;
}

export interface ParsedOption {
  key: string;
  value?: string;
}

export interface ParsedArgs {
  options: ParsedOption[];
  operands: string[];
}

/** A command-line error; printed as qemu-img's error_exit does (message, then the --help hint). */
export class GetoptError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'GetoptError';
  }
}

/**
 * Parses argv (without the program and subcommand names). With `stopAtOperand` (getopt's '+'),
 * parsing ends at the first operand; otherwise operands may be interleaved with options.
 */
export function getopt(
  argv: readonly string[],
  specs: readonly OptionSpec[],
  stopAtOperand = false,
  commandName = '',
): ParsedArgs {
  const options: ParsedOption[] = [];
  const operands: string[] = [];
  let i = 0;
  while (i < argv.length) {
    const arg = argv[i]!;
    if (arg === '--') {
      operands.push(...argv.slice(i + 1));
      break;
    }
    if (!arg.startsWith('-') || arg === '-') {
      if (stopAtOperand) {
        operands.push(...argv.slice(i));
        break;
      }
      operands.push(arg);
      i++;
      continue;
    }
    if (arg.startsWith('--')) {
      const body = arg.slice(2);
      const eq = body.indexOf('=');
      const name = eq >= 0 ? body.slice(0, eq) : body;
      const exact = specs.find((s) => s.long === name);
      const prefixed = specs.filter((s) => s.long !== undefined && s.long.startsWith(name));
      // getopt accepts a prefix when it is unique (or all candidates are the same option).
      const spec = exact ?? (prefixed.length > 0 && prefixed.every((s) => s.key === prefixed[0]!.key) ? prefixed[0] : undefined);
      i++;
      if (!spec) throw new GetoptError(`unrecognized option '${arg}'`);
      if (spec.hasArg) {
        if (eq >= 0) {
          options.push({ key: spec.key, value: body.slice(eq + 1) });
        } else if (i < argv.length) {
          options.push({ key: spec.key, value: argv[i]! });
          i++;
        } else {
          throw new GetoptError(`missing argument for option '${arg}'`);
        }
      } else {
        if (eq >= 0) throw new GetoptError(`unrecognized option '${arg}'`);
        options.push({ key: spec.key });
      }
      continue;
    }
    // A cluster of short options.
    let j = 1;
    i++;
    while (j < arg.length) {
      const letter = arg[j]!;
      const spec = specs.find((s) => s.short === letter);
      j++;
      if (!spec) {
        // getopt has advanced past this element only when the letter was its last one; qemu-img
        // then names argv[optind - 1], which is this element, else the element before it.
        const named = j >= arg.length ? arg : i >= 2 ? argv[i - 2]! : commandName;
        throw new GetoptError(`unrecognized option '${named}'`);
      }
      if (!spec.hasArg) {
        options.push({ key: spec.key });
        continue;
      }
      if (j < arg.length) {
        options.push({ key: spec.key, value: arg.slice(j) });
      } else if (i < argv.length) {
        options.push({ key: spec.key, value: argv[i]! });
        i++;
      } else {
        throw new GetoptError(`missing argument for option '${arg}'`);
      }
      break;
    }
  }
  return { options, operands };
}
