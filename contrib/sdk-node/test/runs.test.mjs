// run() and observe(): nesting through AsyncLocalStorage, timing, errors recorded once and
// thrown again, sampling, masking and content capture. Events go to a real local server.
import assert from "node:assert/strict";
import { test } from "node:test";
import { setTimeout as sleep } from "node:timers/promises";

import { currentRun } from "watchllm";

import { client, drops, ingestServer } from "./helpers.mjs";

async function sent(server, wl) {
  assert.equal(await wl.flush(5000), true);
  return server.events();
}

test("a run nests observed calls and their events; steps are numbered and timed", async () => {
  const server = await ingestServer();
  const { wl } = client(server.url);
  const retrieve = wl.observe(async function retrieve(query) {
    await sleep(30);
    wl.logToolCall({ tool_name: "search", tool_input: { query } });
    return ["doc1", "doc2"];
  });
  const answer = wl.observe((docs) => {
    wl.logPromptCall({ model: "gpt-4o", prompt: docs.join(","), response: "ok" });
    return "ok";
  }, { name: "answer" });
  let runId;
  const result = await wl.run({ name: "qa", userId: "u1", tags: ["t1"], metadata: { k: 1 } }, async (run) => {
    runId = run.runId;
    const docs = await retrieve("q");
    return answer(docs); // sync inside async: still nested
  });
  assert.equal(result, "ok");
  const events = await sent(server, wl);
  assert.equal(events.length, 5);
  assert.ok(events.every((e) => e.run_id === runId));
  assert.ok(events.every((e) => e.user_id === "u1" && e.tags.includes("t1") && e.metadata.k === 1));
  const byName = (n) => events.find((e) => e.step_name === n);
  const root = byName("qa");
  assert.equal(root.step_number, 0);
  assert.equal(root.parent_event_id, undefined);
  const r = byName("retrieve");
  const a = byName("answer");
  assert.deepEqual([r.step_number, a.step_number], [1, 2]);
  assert.equal(r.parent_event_id, root.event_id);
  assert.equal(a.parent_event_id, root.event_id);
  assert.ok(r.latency_ms >= 25, `retrieve took ${r.latency_ms} ms`);
  assert.ok(root.latency_ms >= r.latency_ms);
  assert.equal(r.action, '["q"]');
  assert.equal(r.observation, '["doc1","doc2"]');
  const tool = events.find((e) => e.event_type === "tool_call");
  assert.equal(tool.parent_event_id, r.event_id);
  const call = events.find((e) => e.event_type === "prompt_call");
  assert.equal(call.parent_event_id, a.event_id);
  // The root's timestamp is its start: before its children's.
  assert.ok(root.timestamp <= r.timestamp);
  await wl.shutdown(1000);
  await server.close();
});

test("sync functions stay sync; observe outside a run starts one; concurrent runs do not mix", async () => {
  const server = await ingestServer();
  const { wl } = client(server.url);
  const add = wl.observe(function add(x, y) {
    return x + y;
  });
  assert.equal(add(2, 3), 5); // a number, not a promise
  const runIds = await Promise.all(
    ["a", "b", "c"].map((name) =>
      wl.run(name, async (run) => {
        await sleep(10);
        wl.logToolCall({ tool_name: name });
        await sleep(10);
        assert.equal(currentRun().runId, run.runId);
        return run.runId;
      }),
    ),
  );
  assert.equal(new Set(runIds).size, 3);
  const events = await sent(server, wl);
  const lone = events.find((e) => e.step_name === "add");
  assert.equal(lone.step_number, 1);
  assert.ok(!runIds.includes(lone.run_id));
  for (const name of ["a", "b", "c"]) {
    const root = events.find((e) => e.step_name === name);
    const tool = events.find((e) => e.tool_name === name);
    assert.equal(tool.run_id, root.run_id);
    assert.equal(tool.parent_event_id, root.event_id);
  }
  assert.equal(currentRun(), undefined);
  await wl.shutdown(1000);
  await server.close();
});

test("an error is logged once under the innermost step and thrown unchanged; steps say error", async () => {
  const server = await ingestServer();
  const { wl } = client(server.url);
  const boom = new TypeError("bad input");
  const inner = wl.observe(async function inner() {
    await sleep(1);
    throw boom;
  });
  const outer = wl.observe(async function outer() {
    return inner();
  });
  await assert.rejects(wl.run("failing", () => outer()), (e) => e === boom);
  const syncFail = wl.observe(function syncFail() {
    throw new RangeError("sync");
  });
  assert.throws(() => syncFail(), RangeError);
  const events = await sent(server, wl);
  const errors = events.filter((e) => e.event_type === "error");
  assert.equal(errors.length, 2, "one per error, not one per frame");
  const [typeError] = errors.filter((e) => e.error_type === "TypeError");
  assert.equal(typeError.error_message, "bad input");
  assert.match(typeError.stack_trace, /bad input/);
  const innerStep = events.find((e) => e.step_name === "inner");
  assert.equal(typeError.parent_event_id, innerStep.event_id);
  for (const name of ["inner", "outer", "failing", "syncFail"]) {
    assert.equal(events.find((e) => e.step_name === name).status, "error", name);
  }
  await wl.shutdown(1000);
  await server.close();
});

test("observe as a tool_call records input and output; capture can be turned off", async () => {
  const server = await ingestServer();
  const { wl } = client(server.url);
  const search = wl.observe(async (q) => ({ hits: [q] }), { name: "search", asType: "tool_call" });
  const secret = wl.observe((x) => x, { name: "secret", captureInput: false, captureOutput: false });
  await search("cats");
  secret("pw");
  const events = await sent(server, wl);
  const tool = events.find((e) => e.tool_name === "search");
  assert.equal(tool.event_type, "tool_call");
  assert.deepEqual(tool.tool_input, ["cats"]);
  assert.deepEqual(tool.tool_output, { hits: ["cats"] });
  const step = events.find((e) => e.step_name === "secret");
  assert.equal(step.action, undefined);
  assert.equal(step.observation, undefined);
  await wl.shutdown(1000);
  await server.close();
});

test("captureContent: false leaves prompts, responses and tool data out; mask redacts or drops", async () => {
  const server = await ingestServer();
  const { wl } = client(server.url, {
    captureContent: false,
    mask: (event) => (event.tool_name === "drop-me" ? null : { ...event, user_id: "redacted" }),
  });
  wl.logPromptCall({ model: "m", prompt: "secret", response: "secret", tool_calls: [{ tool_name: "t", tool_input: 1 }] });
  wl.logToolCall({ tool_name: "drop-me" });
  const events = await sent(server, wl);
  assert.equal(events.length, 1);
  const [e] = events;
  assert.equal(e.prompt, undefined);
  assert.equal(e.response, undefined);
  assert.deepEqual(e.tool_calls, [{ tool_name: "t" }]);
  assert.equal(e.model, "m");
  assert.equal(e.user_id, "redacted");
  assert.deepEqual(wl.stats().dropped, drops(), "a mask's choice is not a loss");
  await wl.shutdown(1000);
  await server.close();
});

test("sampleRate keeps whole runs, decided like the Python SDK (CRC-32 of the run id)", async () => {
  const server = await ingestServer();
  const { wl } = client(server.url, { sampleRate: 0.5 });
  const kept = [];
  for (let i = 0; i < 200; i += 1) {
    const runId = `run-${i}`;
    wl.run({ name: "r", runId }, () => {
      wl.logToolCall({ tool_name: "a" });
      wl.logToolCall({ tool_name: "b" });
    });
    kept.push(runId);
  }
  const events = await sent(server, wl);
  const counts = new Map();
  for (const e of events) counts.set(e.run_id, (counts.get(e.run_id) ?? 0) + 1);
  assert.ok([...counts.values()].every((n) => n === 3), "a run is kept whole or not at all");
  assert.ok(counts.size > 60 && counts.size < 140, `${counts.size} of 200 runs kept`);
  assert.equal(wl.stats().sampledOut, (200 - counts.size) * 3);
  // zlib.crc32(b"run-0") / 2**32 = 0.3649... (Python): kept at 0.5, left out at 0.3.
  assert.ok(counts.has("run-0"));
  await wl.shutdown(1000);
  await server.close();
});
