// The SDK's check of an event against the contract: the rules of src/contract.ts, which
// scripts/gen-contract.mjs derives from the server's JSON Schema (types, enums, ranges,
// lengths, patterns), so the SDK refuses what the server's models refuse and cannot drift
// from them. What the schema does not state (a timestamp's range, metadata's size as JSON)
// stays the server's to check.
//
// Each rule is compiled once into a function: the check runs in every log call, on the
// caller's thread, and costs a fraction of a microsecond for a typical event this way.
import { EVENT_RULES, PART_RULES, type EventType, type Rule } from "./contract.js";

/** What is wrong with an event: the field at fault (a path such as `tool_calls[0].latency_ms`),
 * what is wrong with it, and whether that is a wrong type or shape (`type`: a TypeError) or a
 * value out of its range, length or set of values (`range`: a RangeError). */
export interface Problem {
  field: string;
  what: string;
  kind: "type" | "range";
}

/** `prompt_call event: tokens_input: must be at least 0, not -1`, as the Python SDK says it. */
export function describe(type: string, problem: Problem): string {
  return `${type} event: ${problem.field}: ${problem.what}`;
}

/** The first problem of `event` as an event of `type`, or undefined when the contract takes it. */
export function checkEvent(type: EventType, event: Record<string, unknown>): Problem | undefined {
  let check = events.get(type);
  if (check === undefined) {
    const rule = Object.hasOwn(EVENT_RULES, type) ? EVENT_RULES[type] : undefined;
    if (rule === undefined) {
      return { field: "event_type", what: `unknown event type ${shown(type)}`, kind: "range" };
    }
    check = compile(rule);
    events.set(type, check);
  }
  return check(event, "");
}

type Check = (value: unknown, path: string) => Problem | undefined;

const events = new Map<string, Check>();
const parts = new Map<string, Check>();

// The server's timestamp grammar (docs/EVENTS.md, watchllm_ext/schema.py): RFC 3339 with
// seconds and a zone, t/z in either case, a space for the T, up to 9 fraction digits.
const DATE_TIME =
  /^[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt ][0-9]{2}:[0-9]{2}:[0-9]{2}(?:\.[0-9]{1,9})?(?:[Zz]|[+-][0-9]{2}:[0-9]{2})$/;

const IS: Record<NonNullable<Rule["type"]>, (value: unknown) => boolean> = {
  string: (v) => typeof v === "string",
  integer: (v) => typeof v === "number" && Number.isInteger(v),
  number: (v) => typeof v === "number",
  boolean: (v) => typeof v === "boolean",
  null: (v) => v === null,
  array: (v) => Array.isArray(v),
  object: (v) => v !== null && typeof v === "object" && !Array.isArray(v),
};

const A_TYPE: Record<NonNullable<Rule["type"]>, string> = {
  string: "a string",
  integer: "a whole number",
  number: "a number",
  boolean: "true or false",
  null: "null",
  array: "a list",
  object: "an object",
};

function part(name: string): Rule {
  return Object.hasOwn(PART_RULES, name) ? PART_RULES[name] : {};
}

function resolve(rule: Rule): Rule {
  return rule.$ref === undefined ? rule : part(rule.$ref);
}

/** The function that checks values against `rule`. */
function compile(rule: Rule): Check {
  if (rule.$ref !== undefined) {
    const name = rule.$ref;
    // Compiled at its first use, once: a part may (one day) hold itself.
    return (value, path) => {
      let check = parts.get(name);
      if (check === undefined) {
        check = compile(part(name));
        parts.set(name, check);
      }
      return check(value, path);
    };
  }
  if (rule.anyOf) return compileAnyOf(rule);
  const steps: Check[] = [];
  if (rule.const !== undefined) {
    const want = rule.const;
    steps.push((v, path) => (v === want ? undefined : range(path, `must be ${shown(want)}, not ${shown(v)}`)));
  }
  if (rule.enum) {
    const allowed = rule.enum;
    steps.push((v, path) => (allowed.includes(v) ? undefined : range(path, `must be ${expected(rule)}; not ${shown(v)}`)));
  }
  if (rule.minimum !== undefined || rule.maximum !== undefined) steps.push(numberCheck(rule));
  if (rule.minLength !== undefined || rule.maxLength !== undefined) steps.push(lengthCheck(rule));
  if (rule.pattern !== undefined) {
    const re = new RegExp(rule.pattern);
    const pattern = rule.pattern;
    steps.push((v, path) =>
      typeof v !== "string" || re.test(v) ? undefined : range(path, `must match ${pattern}, not ${shown(v)}`),
    );
  }
  if (rule.format === "date-time") {
    steps.push((v, path) =>
      typeof v !== "string" || DATE_TIME.test(v)
        ? undefined
        : range(path, `must be an RFC 3339 date-time with a zone, like 2026-01-01T12:00:00Z, not ${shown(v)}`),
    );
  }
  if (rule.maxItems !== undefined || rule.items !== undefined) steps.push(arrayCheck(rule));
  if (rule.properties !== undefined || (rule.additionalProperties !== undefined && rule.additionalProperties !== true)) {
    steps.push(objectCheck(rule));
  }
  const is = rule.type === undefined ? undefined : IS[rule.type];
  return (raw, path) => {
    const value = jsonValue(raw);
    if (is !== undefined && !is(value)) return typeProblem(rule, value, path);
    if (typeof value === "number" && !Number.isFinite(value)) {
      return range(path, `must be a finite number, not ${value}`); // JSON would send null
    }
    for (const step of steps) {
      const problem = step(value, path);
      if (problem) return problem;
    }
    return undefined;
  };
}

function compileAnyOf(rule: Rule): Check {
  const branches = (rule.anyOf ?? []).map((branch) => {
    const type = resolve(branch).type;
    return { is: type === undefined ? undefined : IS[type], check: compile(branch) };
  });
  return (raw, path) => {
    const value = jsonValue(raw);
    // The branch of the value's type says what is wrong (-1 for a count: its minimum); with
    // none of its type, the type is what is wrong.
    let first: Problem | undefined;
    for (const branch of branches) {
      if (branch.is !== undefined && !branch.is(value)) continue;
      const problem = branch.check(value, path);
      if (problem === undefined) return undefined;
      first ??= problem;
    }
    return first ?? typeProblem(rule, value, path);
  };
}

function numberCheck(rule: Rule): Check {
  const { minimum, maximum } = rule;
  return (v, path) => {
    if (typeof v !== "number") return undefined;
    if (minimum !== undefined && v < minimum) return range(path, `must be at least ${minimum}, not ${v}`);
    if (maximum !== undefined && v > maximum) return range(path, `must be at most ${maximum}, not ${v}`);
    return undefined;
  };
}

function lengthCheck(rule: Rule): Check {
  const { minLength, maxLength } = rule;
  return (v, path) => {
    if (typeof v !== "string") return undefined;
    // The server counts characters (code points); UTF-16 units are at least as many and at
    // most twice as many: count them only near a limit.
    let n = v.length;
    if ((maxLength !== undefined && n > maxLength) || (minLength !== undefined && n < 2 * minLength)) {
      n = characters(v);
    }
    if (minLength !== undefined && n < minLength) {
      return range(path, minLength === 1 ? "must not be empty" : `must have at least ${minLength} characters, not ${n}`);
    }
    if (maxLength !== undefined && n > maxLength) {
      return range(path, `must have at most ${maxLength} characters, not ${n}`);
    }
    return undefined;
  };
}

function arrayCheck(rule: Rule): Check {
  const { maxItems } = rule;
  const items = rule.items === undefined ? undefined : compile(rule.items);
  return (v, path) => {
    if (!Array.isArray(v)) return undefined;
    if (maxItems !== undefined && v.length > maxItems) {
      return range(path, `must have at most ${maxItems} items, not ${v.length}`);
    }
    if (items !== undefined) {
      for (let i = 0; i < v.length; i += 1) {
        // JSON sends a hole or undefined in a list as null.
        const problem = items(v[i] === undefined ? null : v[i], `${path}[${i}]`);
        if (problem) return problem;
      }
    }
    return undefined;
  };
}

function objectCheck(rule: Rule): Check {
  const properties = new Map(Object.entries(rule.properties ?? {}).map(([key, r]) => [key, compile(r)]));
  const extra = rule.additionalProperties;
  const other = typeof extra === "object" ? compile(extra) : undefined;
  const required = rule.required ?? [];
  return (v, path) => {
    if (v === null || typeof v !== "object" || Array.isArray(v)) return undefined;
    const object = v as Record<string, unknown>;
    for (const key of Object.keys(object)) {
      const item = object[key];
      if (item === undefined) continue; // JSON leaves it out
      const at = path ? `${path}.${key}` : key;
      const check = properties.get(key) ?? other;
      if (check === undefined) {
        if (extra === false) return { field: at, what: "no such field", kind: "type" };
        continue;
      }
      const problem = check(item, at);
      if (problem) return problem;
    }
    for (const key of required) {
      if (object[key] === undefined || object[key] === null) {
        return { field: path ? `${path}.${key}` : key, what: "missing (required)", kind: "type" };
      }
    }
    return undefined;
  };
}

/** A Date (or anything with toJSON) as JSON.stringify sends it. */
function jsonValue(value: unknown): unknown {
  if (value !== null && typeof value === "object" && typeof (value as { toJSON?: unknown }).toJSON === "function") {
    return (value as { toJSON: () => unknown }).toJSON();
  }
  return value;
}

/** What a rule takes, in words: `a whole number or null`. */
function expected(rule: Rule): string {
  const r = resolve(rule);
  if (r.anyOf) return [...new Set(r.anyOf.map(expected))].join(" or ");
  if (r.const !== undefined) return shown(r.const);
  if (r.enum) return `one of ${r.enum.map(shown).join(", ")}`;
  return r.type ? A_TYPE[r.type] : "any JSON value";
}

function shown(value: unknown): string {
  if (typeof value === "bigint") return `${value}n`;
  if (typeof value === "function" || typeof value === "symbol" || value === undefined) return typeof value;
  let text: string;
  try {
    text = JSON.stringify(value) ?? String(value);
  } catch {
    text = String(value);
  }
  return text.length > 60 ? `${text.slice(0, 57)}...` : text;
}

/** Characters as the server counts them (code points), not UTF-16 units. */
function characters(text: string): number {
  let n = 0;
  for (const _ of text) n += 1;
  return n;
}

function typeProblem(rule: Rule, value: unknown, path: string): Problem {
  return { field: path, what: `must be ${expected(rule)}, not ${shown(value)}`, kind: "type" };
}

function range(path: string, what: string): Problem {
  return { field: path, what, kind: "range" };
}
