// Generates src/contract.ts (the v1 event contract's TypeScript types, field tables and the
// rules the SDK checks) from the server's OpenAPI document, so they cannot drift from the models.
//
//   node scripts/gen-contract.mjs http://127.0.0.1:8787/openapi.json   # from a running server
//   node scripts/gen-contract.mjs openapi.json                         # from a saved copy
//
// test/e2e.test.mjs renders the live server's document with renderContract() and fails when it
// differs from the committed file (a field or a rule added on the server, say).
import { readFile, writeFile } from "node:fs/promises";
import { fileURLToPath } from "node:url";

// The schemas the SDK sends (events and their parts) and reads (the ingest answer).
const EVENT_SCHEMAS = [
  "PromptCallEvent",
  "ToolCallEvent",
  "AgentStepEvent",
  "ErrorEvent",
  "AssertionFailedEvent",
  "HallucinationDetectedEvent",
  "CostThresholdExceededEvent",
  "PerformanceAlertEvent",
];
const PART_SCHEMAS = ["ChatMessage", "Client", "ToolCallItem"];
const ANSWER_SCHEMAS = ["Accepted", "Rejection", "FieldError", "ErrorBody"];

function refName(ref) {
  return ref.slice(ref.lastIndexOf("/") + 1);
}

/** The TypeScript type of one JSON Schema node. */
function tsType(node) {
  if (node.$ref) return refName(node.$ref);
  if (node.anyOf) return [...new Set(node.anyOf.map(tsType))].join(" | ");
  if ("const" in node) return JSON.stringify(node.const);
  if (node.enum) return node.enum.map((v) => JSON.stringify(v)).join(" | ");
  switch (node.type) {
    case "string":
      return "string";
    case "integer":
    case "number":
      return "number";
    case "boolean":
      return "boolean";
    case "null":
      return "null";
    case "array": {
      const item = tsType(node.items ?? {});
      return item.includes(" ") ? `Array<${item}>` : `${item}[]`;
    }
    case "object":
      return "Record<string, unknown>";
    default:
      return "unknown"; // free-form JSON (tool_input, expected, ...)
  }
}

/** The rules of a node worth a reader's eye (bounds, patterns), for the doc comment. */
function rules(node) {
  const found = [];
  const visit = (n) => {
    if (n.anyOf) return n.anyOf.forEach(visit);
    if (n.minLength !== undefined) found.push(`minLength ${n.minLength}`);
    if (n.maxLength !== undefined) found.push(`maxLength ${n.maxLength}`);
    if (n.pattern !== undefined) found.push(`pattern ${n.pattern}`);
    if (n.minimum !== undefined) found.push(`minimum ${n.minimum}`);
    if (n.maximum !== undefined) found.push(`maximum ${n.maximum}`);
    if (n.maxItems !== undefined) found.push(`maxItems ${n.maxItems}`);
    if (n.format !== undefined) found.push(`format ${n.format}`);
    if (n.items) visit(n.items);
  };
  visit(node);
  return found;
}

// The JSON Schema keywords the SDK's check (src/check.ts) applies, and those that only
// document. A keyword in neither stops the generator: a new kind of rule on the server must be
// taught to the check, never skipped by it.
const CHECKED = [
  "type",
  "enum",
  "const",
  "anyOf",
  "$ref",
  "properties",
  "required",
  "additionalProperties",
  "items",
  "maxItems",
  "minLength",
  "maxLength",
  "pattern",
  "minimum",
  "maximum",
  "format",
];
const DOCUMENTING = ["title", "description", "default", "examples"];
const FORMATS = ["date-time"]; // the string formats the check knows

/** A schema node reduced to the rules the SDK checks, with $refs by schema name. */
function ruleOf(node, where, refs) {
  if (typeof node === "boolean") return node;
  const rule = {};
  for (const [key, value] of Object.entries(node)) {
    if (DOCUMENTING.includes(key)) continue;
    if (!CHECKED.includes(key)) {
      throw new Error(`${where}: the keyword ${key} is unknown to the SDK's check (src/check.ts)`);
    }
    if (key === "$ref") {
      rule.$ref = refName(value);
      refs.add(rule.$ref);
    } else if (key === "anyOf") {
      rule.anyOf = value.map((n, i) => ruleOf(n, `${where}.anyOf[${i}]`, refs));
    } else if (key === "items" || key === "additionalProperties") {
      rule[key] = ruleOf(value, `${where}.${key}`, refs);
    } else if (key === "properties") {
      rule.properties = Object.fromEntries(
        Object.entries(value).map(([k, n]) => [k, ruleOf(n, `${where}.${k}`, refs)]),
      );
    } else if (key === "format" && !FORMATS.includes(value)) {
      throw new Error(`${where}: the format ${value} is unknown to the SDK's check`);
    } else {
      rule[key] = value;
    }
  }
  return rule;
}

/** `name: {...},` with one line per property, for a readable diff when the contract changes. */
function renderRule(name, rule) {
  const { properties, ...rest } = rule;
  const lines = [`  ${name}: {`];
  for (const [key, value] of Object.entries(rest)) lines.push(`    ${key}: ${JSON.stringify(value)},`);
  if (properties) {
    lines.push("    properties: {");
    for (const [key, value] of Object.entries(properties)) {
      lines.push(`      ${key}: ${JSON.stringify(value)},`);
    }
    lines.push("    },");
  }
  lines.push("  },");
  return lines;
}

function renderInterface(name, schema) {
  const required = new Set(schema.required ?? []);
  const lines = [];
  if (schema.description) lines.push(`/** ${schema.description.replace(/\s+/g, " ")} */`);
  lines.push(`export interface ${name} {`);
  for (const [field, node] of Object.entries(schema.properties ?? {})) {
    const notes = [];
    if (node.description) notes.push(node.description.replace(/\s+/g, " ").replace(/\.$/, ""));
    const r = rules(node);
    if (r.length) notes.push(r.join("; "));
    if (node.default !== undefined && node.default !== null) {
      notes.push(`default ${JSON.stringify(node.default)}`);
    }
    if (notes.length) lines.push(`  /** ${notes.join(". ").replaceAll("*/", "*\\/")} */`);
    lines.push(`  ${field}${required.has(field) ? "" : "?"}: ${tsType(node)};`);
  }
  lines.push("}");
  return lines.join("\n");
}

/** src/contract.ts for an OpenAPI document (an object). */
export function renderContract(doc) {
  const schemas = doc.components.schemas;
  const out = [
    "// Generated by scripts/gen-contract.mjs from the server's /openapi.json. Do not edit:",
    "// run `npm run gen:contract -- <url or file>` after the server's contract changes.",
    "/* eslint-disable */",
    "",
  ];
  for (const name of [...PART_SCHEMAS, ...EVENT_SCHEMAS, ...ANSWER_SCHEMAS]) {
    if (!schemas[name]) throw new Error(`the OpenAPI document has no schema ${name}`);
    out.push(renderInterface(name, schemas[name]), "");
  }
  out.push(`/** Any v1 event, discriminated by \`event_type\`. */`);
  out.push(`export type Event =\n${EVENT_SCHEMAS.map((n) => `  | ${n}`).join("\n")};`, "");
  const types = EVENT_SCHEMAS.map((n) => schemas[n].properties.event_type.const);
  out.push(`export type EventType = Event["event_type"];`, "");
  out.push(`/** The eight event types, in the contract's order. */`);
  out.push(`export const EVENT_TYPES: readonly EventType[] = ${JSON.stringify(types)};`, "");
  out.push("/** Each type's fields and required fields: the SDK checks events against them. */");
  out.push(
    "export const EVENT_FIELDS: Readonly<Record<EventType, " +
      "{ readonly fields: readonly string[]; readonly required: readonly string[] }>> = {",
  );
  for (const name of EVENT_SCHEMAS) {
    const s = schemas[name];
    const fields = JSON.stringify(Object.keys(s.properties));
    const required = JSON.stringify(s.required ?? []);
    out.push(`  ${s.properties.event_type.const}: {`);
    out.push(`    fields: ${fields},`);
    out.push(`    required: ${required},`);
    out.push("  },");
  }
  out.push("};", "");
  // The rules themselves (types, enums, ranges, lengths, patterns), checked by src/check.ts.
  const refs = new Set();
  out.push(
    "/** A JSON Schema node of the contract, reduced to the rules the SDK checks; `$ref` names",
    " * an entry of PART_RULES. */",
    "export interface Rule {",
    "  readonly type?: \"string\" | \"integer\" | \"number\" | \"boolean\" | \"null\" | \"array\" | \"object\";",
    "  readonly enum?: readonly unknown[];",
    "  readonly const?: unknown;",
    "  readonly anyOf?: readonly Rule[];",
    "  readonly $ref?: string;",
    "  readonly properties?: Readonly<Record<string, Rule>>;",
    "  readonly required?: readonly string[];",
    "  readonly additionalProperties?: boolean | Rule;",
    "  readonly items?: Rule;",
    "  readonly maxItems?: number;",
    "  readonly minLength?: number;",
    "  readonly maxLength?: number;",
    "  readonly pattern?: string;",
    "  readonly minimum?: number;",
    "  readonly maximum?: number;",
    "  readonly format?: \"date-time\";",
    "}",
    "",
    "/** Each event type's rules: what the server's models check, as its JSON Schema says. */",
    "export const EVENT_RULES: Readonly<Record<EventType, Rule>> = {",
  );
  for (const name of EVENT_SCHEMAS) {
    const s = schemas[name];
    out.push(...renderRule(s.properties.event_type.const, ruleOf(s, name, refs)));
  }
  out.push("};", "");
  out.push("/** The rules of the parts events hold (messages, tool calls, the client). */");
  out.push("export const PART_RULES: Readonly<Record<string, Rule>> = {");
  for (const name of PART_SCHEMAS) out.push(...renderRule(name, ruleOf(schemas[name], name, refs)));
  out.push("};", "");
  const missing = [...refs].filter((name) => !PART_SCHEMAS.includes(name));
  if (missing.length) throw new Error(`events refer to ${missing.join(", ")}: add to PART_SCHEMAS`);
  return out.join("\n");
}

async function load(source) {
  if (/^https?:\/\//.test(source)) {
    const response = await fetch(source);
    if (!response.ok) throw new Error(`GET ${source}: HTTP ${response.status}`);
    return response.json();
  }
  return JSON.parse(await readFile(source, "utf8"));
}

if (process.argv[1] === fileURLToPath(import.meta.url)) {
  const source = process.argv[2];
  if (!source) {
    console.error("usage: node scripts/gen-contract.mjs <openapi.json url or file>");
    process.exit(2);
  }
  const target = new URL("../src/contract.ts", import.meta.url);
  await writeFile(target, renderContract(await load(source)));
  console.log(`wrote ${fileURLToPath(target)}`);
}
