// End to end against a real `watchllm serve` (tests/test_sdk_node.py starts one and passes
// WATCHLLM_TEST_URL and WATCHLLM_TEST_KEY): events sent from Node are read back through the
// analytics API with their run tree, the SDK's types and rules match the server's
// /openapi.json, and the server refuses what the SDK's check refuses.
import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import { readFile, rm, writeFile } from "node:fs/promises";
import { promisify } from "node:util";
import { test } from "node:test";
import { setTimeout as sleep } from "node:timers/promises";

import { WatchLLM } from "watchllm";

import { drops, memoryLogger } from "./helpers.mjs";
import { REFUSED, VALID } from "./refused.mjs";
import { renderContract } from "../scripts/gen-contract.mjs";

const URL_ = process.env.WATCHLLM_TEST_URL;
const KEY = process.env.WATCHLLM_TEST_KEY;
const skip = URL_ && KEY ? false : "needs a running server: WATCHLLM_TEST_URL and WATCHLLM_TEST_KEY";

async function get(path) {
  const response = await fetch(`${URL_}${path}`, { headers: { Authorization: `Bearer ${KEY}` } });
  return { status: response.status, body: await response.json() };
}

/** The run once the store holds `events` of its events (the writer flushes in the background). */
async function readRun(runId, events) {
  const deadline = Date.now() + 30_000;
  for (;;) {
    const answer = await get(`/v1/analytics/runs/${runId}`);
    if (answer.status === 200 && answer.body.run.event_count >= events) return answer.body;
    if (Date.now() > deadline) assert.fail(`run ${runId}: ${JSON.stringify(answer)}`);
    await sleep(100);
  }
}

test("src/contract.ts is what the server's /openapi.json generates", { skip }, async () => {
  const response = await fetch(`${URL_}/openapi.json`);
  assert.equal(response.status, 200);
  const live = renderContract(await response.json());
  const committed = await readFile(new URL("../src/contract.ts", import.meta.url), "utf8");
  assert.equal(
    committed,
    live,
    "the server's event contract changed: run `npm run gen:contract -- <server>/openapi.json`" +
      " in contrib/sdk-node and commit src/contract.ts",
  );
});

test("a run with nested steps, a tool call, a prompt call and an error, read back as a tree", { skip }, async () => {
  const logger = memoryLogger();
  const wl = new WatchLLM({ apiKey: KEY, baseUrl: URL_, flushOnExit: false, logger, strict: true });
  const lookup = wl.observe(async function lookup(city) {
    wl.logToolCall({ tool_name: "weather_api", tool_input: { city }, tool_output: { c: 21 }, latency_ms: 12.5 });
    return 21;
  });
  const fail = wl.observe(async function fail() {
    throw new Error("no umbrella");
  });
  let runId;
  await wl.run({ name: "trip", userId: "node-user", tags: ["node"] }, async (run) => {
    runId = run.runId;
    await lookup("Paris");
    wl.logPromptCall({ model: "gpt-4o", provider: "openai", prompt: "weather?", response: "21C", tokens_input: 10, tokens_output: 3, latency_ms: 250 });
    await fail().catch(() => {});
  });
  assert.equal(await wl.flush(10_000), true);
  await wl.shutdown(1000);
  const stats = wl.stats();
  assert.equal(stats.sent, 6, JSON.stringify(stats));
  assert.equal(stats.droppedTotal, 0, JSON.stringify(stats));
  assert.deepEqual(logger.lines, []);

  const detail = await readRun(runId, 6);
  assert.equal(detail.run.event_count, 6);
  assert.equal(detail.run.error_count >= 1, true);
  assert.equal(detail.run.tokens_input, 10);
  // One root (the run's step 0) holding the three steps in time order; the tool call under
  // lookup, the error under fail.
  assert.equal(detail.tree.length, 1);
  const [root] = detail.tree;
  assert.equal(root.event.event_type, "agent_step");
  assert.equal(root.event.user_id, "node-user");
  const kids = root.children.map((c) => c.event);
  // Time order, to the millisecond stored: calls in the same millisecond may come either way.
  assert.deepEqual(kids.map((e) => e.event_type).sort(), ["agent_step", "agent_step", "prompt_call"]);
  const node = (test) => root.children.find((c) => test(c.event));
  const lookupNode = node((e) => e.event_type === "agent_step" && e.status === "success");
  const promptNode = node((e) => e.event_type === "prompt_call");
  const failNode = node((e) => e.event_type === "agent_step" && e.status === "error");
  assert.deepEqual(lookupNode.children.map((c) => [c.event.event_type, c.event.tool_name]), [["tool_call", "weather_api"]]);
  assert.equal(promptNode.event.model, "gpt-4o");
  assert.equal(promptNode.event.response_preview, "21C");
  assert.equal(failNode.event.status, "error");
  assert.deepEqual(failNode.children.map((c) => [c.event.event_type, c.event.error_message]), [["error", "no umbrella"]]);

  // The whole event: the fields the SDK filled in.
  const one = await get(`/v1/analytics/event/${lookupNode.children[0].id}`);
  assert.equal(one.status, 200);
  assert.match(one.body.event.client_sdk_version, /^watchllm-node\/\d/);
  assert.equal(one.body.event.parent_event_id, lookupNode.id);
});

test("a batch sent twice (a retry after a lost answer) is stored once", { skip }, async () => {
  const wl = new WatchLLM({ apiKey: KEY, baseUrl: URL_, flushOnExit: false, logger: memoryLogger() });
  const runId = `node-retry-${Date.now()}`;
  const ids = [];
  for (let i = 0; i < 3; i += 1) ids.push(wl.logToolCall({ run_id: runId, tool_name: `t${i}` }));
  await wl.flush(10_000);
  // The same events again, as a retry would send them: same ids, the server keeps one each.
  const again = await fetch(`${URL_}/v1/events/batch`, {
    method: "POST",
    headers: { Authorization: `Bearer ${KEY}`, "Content-Type": "application/json" },
    body: JSON.stringify({ events: ids.map((id, i) => ({ event_id: id, event_type: "tool_call", run_id: runId, tool_name: `t${i}` })) }),
  });
  assert.equal(again.status, 202);
  await wl.shutdown(1000);
  const detail = await readRun(runId, 3);
  await sleep(300); // a second copy, if stored, would be flushed by now
  const after = await readRun(runId, 3);
  assert.equal(after.run.event_count, 3);
  assert.equal(detail.tree.length, 3);
});

test("the server's 422 is reported once with its message and nothing is retried", { skip }, async () => {
  const logger = memoryLogger();
  const wl = new WatchLLM({ apiKey: KEY, baseUrl: URL_, flushOnExit: false, logger });
  // A timestamp's range is not in the JSON Schema: the SDK's check lets it by, the server does not.
  wl.logPromptCall({ model: "m", timestamp: "1969-12-31T23:59:59Z" });
  await wl.flush(10_000);
  await wl.shutdown(1000);
  assert.deepEqual(wl.stats().dropped, drops({ rejected: 1 }));
  assert.equal(wl.stats().batches, 1);
  assert.equal(logger.lines.length, 1);
  assert.match(logger.lines[0], /timestamp/);
});

/** The events `log` makes, as the SDK would send them, taken before its check by a mask. */
function built(log) {
  const events = [];
  const mask = (event) => {
    events.push(event);
    return null; // left out by the mask: not sent, not counted
  };
  const wl = new WatchLLM({ apiKey: KEY, baseUrl: URL_, flushOnExit: false, mask, logger: memoryLogger() });
  log(wl);
  void wl.shutdown(0);
  return events;
}

async function post(events) {
  const response = await fetch(`${URL_}/v1/events/batch`, {
    method: "POST",
    headers: { Authorization: `Bearer ${KEY}`, "Content-Type": "application/json" },
    body: JSON.stringify({ events }),
  });
  return { status: response.status, body: await response.json() };
}

test("strict mode refuses what the server refuses, at the same field, and sends what it takes", { skip }, async () => {
  const strict = new WatchLLM({ apiKey: KEY, baseUrl: URL_, flushOnExit: false, strict: true, logger: memoryLogger() });
  for (const [what, log, field] of REFUSED) {
    assert.throws(() => log(strict), { name: "WatchLLMValidationError", field }, what);
    const [event] = built(log); // the same event, sent past the SDK's check
    const answer = await post([event]);
    assert.equal(answer.status, 422, `${what}: ${JSON.stringify(answer.body)}`);
    const fields = answer.body.rejected[0].errors.map((e) => e.field);
    assert.ok(fields.includes(field), `${what}: the server names ${fields}, the SDK ${field}`);
  }
  VALID(strict);
  assert.equal(await strict.flush(10_000), true);
  await strict.shutdown(1000);
  assert.equal(strict.stats().sent, 8, JSON.stringify(strict.stats()));
  assert.equal(strict.stats().droppedTotal, 0);
});
