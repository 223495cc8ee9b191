// Delivery against a real local HTTP server that misbehaves on cue: batching, gzip, retries
// with Retry-After, answers that must not be retried, dropped connections, bounds.
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { once } from "node:events";
import { test } from "node:test";
import { fileURLToPath } from "node:url";

import { WatchLLM, parseRetryAfter } from "watchllm";

import { client, drops, ingestServer, memoryLogger } from "./helpers.mjs";

const call = (i) => ({ model: "gpt-4o", tokens_input: i, tokens_output: 1 });

function assertNoDuplicates(ids) {
  assert.equal(new Set(ids).size, ids.length, `ids stored twice: ${ids}`);
}

test("batches by count, gzip, and every event once with its own id", async () => {
  const server = await ingestServer();
  const { wl } = client(server.url, { maxBatchEvents: 10, flushAt: 10, flushIntervalMs: 60_000 });
  const ids = [];
  for (let i = 0; i < 25; i += 1) ids.push(wl.logPromptCall(call(i)));
  assert.equal(await wl.flush(5000), true);
  await wl.shutdown(1000);
  // Two full batches left at once (no 60 s interval waited); the rest on flush().
  assert.deepEqual(server.requests.map((r) => r.events.length), [10, 10, 5]);
  assert.ok(server.requests.every((r) => r.gzipped));
  assert.equal(server.requests[0].headers.authorization, "Bearer wllm_test");
  assert.deepEqual(server.stored, ids);
  assert.ok(ids.every((id) => /^[0-9a-f]{32}$/.test(id)));
  const event = server.events()[0];
  assert.equal(event.event_type, "prompt_call");
  assert.match(event.timestamp, /^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$/);
  assert.match(event.client.sdk_version, /^watchllm-node\//);
  assert.equal(wl.stats().sent, 25);
  await server.close();
});

test("batches by bytes and by interval; gzip can be turned off", async () => {
  const server = await ingestServer();
  const { wl } = client(server.url, { maxBatchBytes: 3000, gzip: false, flushIntervalMs: 50 });
  for (let i = 0; i < 6; i += 1) wl.logPromptCall({ ...call(i), response: "x".repeat(1000) });
  await wl.flush(5000);
  assert.ok(server.requests.length >= 2, "a 1 KB event per 3 KB batch: more than one request");
  assert.ok(server.requests.every((r) => !r.gzipped && r.events.length <= 3));
  // One small event with nothing else: the interval sends it.
  const before = server.requests.length;
  wl.logToolCall({ tool_name: "search" });
  await new Promise((resolve) => setTimeout(resolve, 300));
  assert.equal(server.requests.length, before + 1);
  await wl.shutdown(1000);
  await server.close();
});

test("429 and 503 are retried after their Retry-After; nothing duplicated", async () => {
  const server = await ingestServer([
    { status: 429, headers: { "retry-after": "1" } },
    { status: 503, headers: { "retry-after": "0" } },
  ]);
  const { wl } = client(server.url);
  const ids = [wl.logPromptCall(call(1)), wl.logPromptCall(call(2))];
  assert.equal(await wl.flush(10_000), true);
  const [first, second, third] = server.requests;
  assert.equal(server.requests.length, 3);
  // Retry-After: 1 is honoured (not the 5-20 ms backoff).
  assert.ok(second.at - first.at >= 950, `waited ${second.at - first.at} ms`);
  assert.ok(third.at - second.at < 900);
  assert.deepEqual(server.stored, ids);
  assert.deepEqual(third.events.map((e) => e.event_id), ids, "the same ids each try");
  assert.equal(wl.stats().retries, 2);
  await wl.shutdown(1000);
  await server.close();
});

test("502, 504 and dropped connections are retried with backoff; a batch kept before the drop is not stored twice", async () => {
  const server = await ingestServer([
    { drop: true },
    { status: 502 },
    { drop: "after" }, // the server has the batch but the answer is lost
    { status: 504 },
  ]);
  const { wl } = client(server.url);
  const ids = [wl.logAgentStep({ step_number: 1 }), wl.logError({ error_type: "E", error_message: "m" })];
  assert.equal(await wl.flush(10_000), true);
  assert.equal(server.requests.length, 5);
  // The client sent the same ids again; the server (like WatchLLM's) keeps one per id.
  assert.deepEqual([...new Set(server.stored)], ids);
  for (const r of server.requests) assert.deepEqual(r.events.map((e) => e.event_id), ids);
  assert.equal(wl.stats().retries, 4);
  assert.deepEqual(wl.stats().dropped, drops());
  await wl.shutdown(1000);
  await server.close();
});

test("500 and 422 are not retried: dropped, counted, and reported once with the server's message", async () => {
  const server = await ingestServer([
    { status: 500, body: { error: "internal", message: "boom" } },
    {
      status: 422,
      body: {
        error: "validation_failed",
        message: "no event was valid",
        rejected: [{ index: 0, errors: [{ field: "tool_name", message: "Field required" }] }],
      },
    },
    { status: 500, body: { error: "internal", message: "boom again" } },
  ]);
  const { wl, logger } = client(server.url, { maxBatchEvents: 1, flushAt: 1 });
  wl.logPromptCall(call(1));
  await wl.flush(5000);
  wl.logPromptCall(call(2));
  await wl.flush(5000);
  wl.logPromptCall(call(3));
  await wl.flush(5000);
  assert.equal(server.requests.length, 3, "one request each: no retry");
  assert.deepEqual(wl.stats().dropped, drops({ server_error: 2, rejected: 1 }));
  assert.equal(wl.stats().retries, 0);
  const server500 = logger.lines.filter((l) => l.includes("HTTP 500"));
  assert.equal(server500.length, 1, "reported once");
  assert.match(server500[0], /boom/);
  const rejected = logger.lines.find((l) => l.includes("HTTP 422"));
  assert.match(rejected, /no event was valid/);
  assert.match(rejected, /#0: tool_name: Field required/);
  await wl.shutdown(1000);
  await server.close();
});

test("a 207 keeps the accepted events and counts the refused ones", async () => {
  const server = await ingestServer([{ reject: [1] }]);
  const { wl, logger } = client(server.url);
  const ids = [0, 1, 2].map((i) => wl.logPromptCall(call(i)));
  await wl.flush(5000);
  assert.deepEqual(server.stored, [ids[0], ids[2]]);
  assert.equal(server.requests.length, 1);
  assert.equal(wl.stats().sent, 2);
  assert.deepEqual(wl.stats().dropped, drops({ rejected: 1 }));
  assert.match(logger.lines.join("\n"), /#1: model: String should have at least 1 character/);
  await wl.shutdown(1000);
  await server.close();
});

test("a 413 splits the batch until it fits; nothing lost or repeated", async () => {
  const server = await ingestServer([{ status: 413, maxEvents: 3 }]);
  const { wl } = client(server.url, { maxBatchEvents: 10, flushAt: 10, flushIntervalMs: 60_000 });
  const ids = [];
  for (let i = 0; i < 10; i += 1) ids.push(wl.logPromptCall(call(i)));
  await wl.flush(5000);
  assert.deepEqual(server.stored, ids);
  assert.ok(server.requests.filter((r) => r.events.length > 3).length >= 1);
  await wl.shutdown(1000);
  await server.close();
});

test("retries stop after retryForMs and the batch is counted as dropped", async () => {
  const server = await ingestServer(Array.from({ length: 100 }, () => ({ status: 503 })));
  const { wl, logger } = client(server.url, { initialBackoffMs: 40, maxBackoffMs: 40, retryForMs: 300 });
  wl.logPromptCall(call(1));
  const t0 = Date.now();
  assert.equal(await wl.flush(5000), true);
  assert.ok(Date.now() - t0 < 1000, `gave up after ${Date.now() - t0} ms`);
  assert.ok(server.requests.length >= 3, `${server.requests.length} tries in 300 ms`);
  assert.equal(wl.stats().retries, server.requests.length - 1);
  assert.deepEqual(wl.stats().dropped, drops({ retries_exhausted: 1 }));
  assert.equal(wl.stats().droppedTotal, 1);
  assert.match(wl.stats().lastError, /retries_exhausted: HTTP 503/);
  assert.match(logger.lines.join("\n"), /after \d+ attempts \(HTTP 503\)/);
  await wl.shutdown(1000);
  await server.close();
});

test("the queue is bounded: the newest events are dropped and counted, the host call returns at once", async () => {
  const server = await ingestServer();
  const { wl, logger } = client(server.url, { maxQueue: 5, flushIntervalMs: 60_000, flushAt: 100 });
  const t0 = performance.now();
  const ids = [];
  for (let i = 0; i < 8; i += 1) ids.push(wl.logPromptCall(call(i)));
  assert.ok(performance.now() - t0 < 500, "8 calls, no I/O: far under the 500 ms bound");
  assert.equal(wl.stats().queued, 5);
  assert.deepEqual(wl.stats().dropped, drops({ queue_full: 3 }));
  await wl.flush(5000);
  assert.deepEqual(server.stored, ids.slice(0, 5));
  assert.equal(logger.lines.filter((l) => l.includes("queue is full")).length, 1);
  await wl.shutdown(1000);
  await server.close();
});

test("flush() answers false at its timeout while the server is down; shutdown() drops what is left at its deadline", async () => {
  const server = await ingestServer(Array.from({ length: 100 }, () => ({ status: 503, headers: { "retry-after": "1" } })));
  const { wl } = client(server.url, {});
  wl.logPromptCall(call(1));
  const t0 = Date.now();
  assert.equal(await wl.flush(300), false);
  assert.ok(Date.now() - t0 < 1000);
  const t1 = Date.now();
  assert.equal(await wl.shutdown(500), false);
  assert.ok(Date.now() - t1 < 1500, `shutdown took ${Date.now() - t1} ms`);
  assert.deepEqual(wl.stats().dropped, drops({ shutdown: 1 }));
  assert.equal(wl.stats().queued, 0);
  // After shutdown: dropped and counted, never thrown.
  wl.logPromptCall(call(2));
  assert.deepEqual(wl.stats().dropped, drops({ shutdown: 2 }));
  await server.close();
});

test("shutdown() ends a long Retry-After wait at its deadline and counts the batch once", async () => {
  const server = await ingestServer([{ status: 503, headers: { "retry-after": "30" } }]);
  const { wl } = client(server.url);
  wl.logPromptCall(call(1));
  await wl.flush(200); // the first try got its 503: the batch now waits 30 s
  assert.equal(server.requests.length, 1);
  const t0 = Date.now();
  assert.equal(await wl.shutdown(300), false);
  assert.ok(Date.now() - t0 < 1000, `shutdown took ${Date.now() - t0} ms`);
  await new Promise((resolve) => setTimeout(resolve, 100));
  const stats = wl.stats();
  assert.deepEqual(stats.dropped, drops({ shutdown: 1 }));
  assert.equal(stats.sent, 0);
  assert.equal(server.requests.length, 1, "no try after the deadline");
  await server.close();
});

test("a host that ends while the server is down exits within flushAtExitMs", async () => {
  const server = await ingestServer(Array.from({ length: 1000 }, () => ({ status: 503 })));
  const script = fileURLToPath(new URL("./fixtures/exit-without-flush.mjs", import.meta.url));
  const t0 = Date.now();
  const child = spawn(process.execPath, [script], {
    env: { ...process.env, WATCHLLM_API_KEY: "k", WATCHLLM_BASE_URL: server.url, EXIT_MS: "700" },
    stdio: ["ignore", "pipe", "pipe"],
  });
  let err = "";
  child.stderr.on("data", (d) => (err += d));
  const [code] = await once(child, "exit");
  const took = Date.now() - t0;
  assert.equal(code, 0);
  assert.ok(took < 5000, `the host took ${took} ms to exit (retryForMs is 300 s)`);
  assert.ok(server.requests.length >= 2, "it tried, and retried, before giving up");
  assert.match(err, /2 events not sent before the deadline/);
  await server.close();
});

test("an unreachable server never reaches the host: calls return, flush resolves", async () => {
  const server = await ingestServer();
  const url = server.url;
  await server.close(); // nothing listens there now
  const { wl } = client(url, { retryForMs: 50 });
  wl.logPromptCall(call(1));
  assert.equal(await wl.flush(5000), true);
  assert.deepEqual(wl.stats().dropped, drops({ retries_exhausted: 1 }));
  await wl.shutdown(100);
});

test("malformed events are counted and dropped with one warning, or thrown in strict mode", async () => {
  const server = await ingestServer();
  const { wl, logger } = client(server.url);
  wl.logPromptCall({ model: "m", tokens_input: Number.NaN });
  wl.logToolCall({ tool_name: "t", toolName: "typo" });
  wl.logToolCall({}); // tool_name missing
  assert.deepEqual(wl.stats().dropped, drops({ invalid: 3 }));
  assert.equal(logger.lines.filter((l) => l.includes("dropped")).length, 1);
  const strict = client(server.url, { strict: true }).wl;
  assert.throws(() => strict.logToolCall({ tool_name: "t", toolName: "typo" }), {
    name: "WatchLLMValidationError",
    field: "toolName",
  });
  assert.throws(() => strict.logError({ error_type: "E" }), { field: "error_message" });
  await Promise.all([wl.shutdown(500), strict.shutdown(500)]);
  assert.equal(server.requests.length, 0);
  await server.close();
});

test("a logger or mask that throws does not reach the host", async () => {
  const server = await ingestServer();
  const wl = new WatchLLM({
    apiKey: "k",
    baseUrl: server.url,
    flushOnExit: false,
    logger: { warn: () => { throw new Error("logger broke"); } },
    mask: () => { throw new Error("mask broke"); },
  });
  assert.doesNotThrow(() => wl.logPromptCall(call(1)));
  assert.deepEqual(wl.stats().dropped, drops({ mask_error: 1 })); // never sent unmasked
  await wl.shutdown(500);
  await server.close();
});

test("without a key the client is off: one warning, no request, no exception", async () => {
  const saved = { key: process.env.WATCHLLM_API_KEY, url: process.env.WATCHLLM_BASE_URL };
  delete process.env.WATCHLLM_API_KEY;
  delete process.env.WATCHLLM_BASE_URL;
  try {
    const logger = memoryLogger();
    const wl = new WatchLLM({ logger });
    assert.equal(wl.enabled, false);
    assert.equal(logger.lines.length, 1);
    assert.match(logger.lines[0], /WATCHLLM_API_KEY/);
    const id = wl.logPromptCall(call(1));
    assert.match(id, /^[0-9a-f]{32}$/);
    assert.equal(await wl.run("r", async () => 7), 7);
    assert.equal(await wl.flush(), true);
    assert.equal(logger.lines.length, 1);
  } finally {
    if (saved.key !== undefined) process.env.WATCHLLM_API_KEY = saved.key;
    if (saved.url !== undefined) process.env.WATCHLLM_BASE_URL = saved.url;
  }
});

test("WATCHLLM_API_KEY and WATCHLLM_BASE_URL configure the client; beforeExit sends what is queued", async () => {
  const server = await ingestServer();
  const script = fileURLToPath(new URL("./fixtures/exit-without-flush.mjs", import.meta.url));
  const child = spawn(process.execPath, [script], {
    env: { ...process.env, WATCHLLM_API_KEY: "wllm_env", WATCHLLM_BASE_URL: server.url },
    stdio: ["ignore", "pipe", "inherit"],
  });
  let out = "";
  child.stdout.on("data", (d) => (out += d));
  const [code] = await once(child, "exit");
  assert.equal(code, 0);
  const ids = JSON.parse(out);
  assert.deepEqual(server.stored, ids);
  assert.equal(server.requests[0].headers.authorization, "Bearer wllm_env");
  await server.close();
});

test("Retry-After: seconds or an HTTP date", () => {
  assert.equal(parseRetryAfter("3"), 3000);
  assert.equal(parseRetryAfter("0.5"), 500);
  const now = Date.parse("2026-01-01T00:00:00Z");
  assert.equal(parseRetryAfter("Thu, 01 Jan 2026 00:00:02 GMT", now), 2000);
  assert.equal(parseRetryAfter("soon"), undefined);
  assert.equal(parseRetryAfter(null), undefined);
});

test("a baseUrl that is not an http(s) URL with a host is refused at construction", () => {
  for (const bad of ["127.0.0.1:8787", "localhost:8787", "ftp://host/", "http://"]) {
    assert.throws(
      () => new WatchLLM({ baseUrl: bad, apiKey: "wllm_test" }),
      (error) => error instanceof TypeError && error.message.startsWith("baseUrl: must be an http://"),
      bad,
    );
  }
  assert.throws(() => new WatchLLM({ baseUrl: "127.0.0.1:8787", apiKey: "k" }), /did you mean 'http:\/\/127\.0\.0\.1:8787'/);
  const saved = process.env.WATCHLLM_BASE_URL;
  process.env.WATCHLLM_BASE_URL = "127.0.0.1:9";
  try {
    assert.throws(() => new WatchLLM({ apiKey: "k" }), /^TypeError: baseUrl \(from WATCHLLM_BASE_URL\)/);
  } finally {
    if (saved === undefined) delete process.env.WATCHLLM_BASE_URL;
    else process.env.WATCHLLM_BASE_URL = saved;
  }
  // Disabled clients send nothing: nothing to check.
  new WatchLLM({ baseUrl: "127.0.0.1:8787", apiKey: "k", enabled: false });
  const ok = new WatchLLM({ baseUrl: "https://watchllm.example.com/base/", apiKey: "k" });
  ok.shutdown(0);
});
