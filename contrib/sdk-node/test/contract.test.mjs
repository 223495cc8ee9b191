// The SDK's check of the event contract (src/check.ts, from the rules src/contract.ts has from
// the server's JSON Schema): strict mode throws a TypeError or RangeError naming the field's
// path for what the server would refuse, and otherwise the event is counted as `invalid`
// and never sent. e2e.test.mjs sends the same events to a real server, which refuses them.
import assert from "node:assert/strict";
import { test } from "node:test";

import * as sdk from "watchllm";
import { WatchLLM, WatchLLMValidationError } from "watchllm";

import { client, drops, ingestServer } from "./helpers.mjs";
import { REFUSED, VALID } from "./refused.mjs";

for (const [what, log, field, Kind] of REFUSED) {
  test(`strict mode throws for ${what}, naming ${field}`, () => {
    const wl = new WatchLLM({ apiKey: "k", baseUrl: "http://127.0.0.1:9", strict: true, flushOnExit: false });
    assert.throws(
      () => log(wl),
      (error) => {
        assert.ok(error instanceof Kind, `${error} is not a ${Kind.name}`);
        assert.ok(error instanceof WatchLLMValidationError, "one class catches both kinds");
        assert.equal(error.name, "WatchLLMValidationError");
        assert.equal(error.field, field);
        assert.match(error.message, new RegExp(`^[a-z_]+ event: ${field.replace(/[[\].]/g, "\\$&")}: `));
        return true;
      },
    );
    assert.equal(wl.stats().queued, 0);
    void wl.shutdown(0);
  });
}

test("the check draws the server's line: valid forms are sent (strict or not), each mistake is counted as invalid and not sent", async () => {
  const server = await ingestServer();
  const strict = client(server.url, { strict: true }).wl;
  VALID(strict);
  assert.equal(await strict.flush(5000), true);
  assert.equal(server.events().length, 8);
  assert.equal(strict.stats().droppedTotal, 0);
  const { wl, logger } = client(server.url);
  for (const [, log] of REFUSED) log(wl);
  VALID(wl);
  await wl.flush(5000);
  assert.equal(server.events().length, 16, "only the valid ones");
  assert.deepEqual(wl.stats().dropped, drops({ invalid: REFUSED.length }));
  assert.deepEqual(logger.lines, [
    "watchllm: an event was dropped: prompt_call event: tokens_input: must be at least 0, not -1" +
      " (set strict to throw)",
  ]);
  await Promise.all([wl.shutdown(500), strict.shutdown(500)]);
  await server.close();
});

test("an env option the contract does not know is refused at each call", () => {
  const wl = new WatchLLM({ apiKey: "k", baseUrl: "http://127.0.0.1:9", strict: true, env: "prod", flushOnExit: false });
  assert.throws(() => wl.logToolCall({ tool_name: "t" }), { name: "WatchLLMValidationError", field: "env" });
  void wl.shutdown(0);
});

test("stats().dropped lists every drop reason, 0 before the first drop, as the Python SDK does", async () => {
  const reasons = Object.keys(drops());
  assert.deepEqual(sdk.DROP_REASONS, reasons);
  const { wl } = client("http://127.0.0.1:9");
  assert.deepEqual(wl.stats().dropped, drops());
  assert.equal(wl.stats().dropped.invalid, 0);
  const off = new WatchLLM({ enabled: false });
  assert.deepEqual(off.stats().dropped, drops());
  await wl.shutdown(0);
});

test("a 404 (a baseUrl that ends in the route) says baseUrl should be the server's root", async () => {
  const server = await ingestServer([
    { status: 404, body: { error: "not_found", message: "no route POST /v1/events/batch/v1/events/batch" } },
  ]);
  const { wl, logger } = client(`${server.url}/v1/events/batch`);
  wl.logToolCall({ tool_name: "t" });
  await wl.flush(5000);
  assert.equal(server.requests.length, 1, "not retried");
  assert.deepEqual(wl.stats().dropped, drops({ rejected: 1 }));
  assert.equal(logger.lines.length, 1);
  assert.match(logger.lines[0], /HTTP 404/);
  assert.match(logger.lines[0], /baseUrl should be the server's root, such as http:\/\/127\.0\.0\.1:8787/);
  assert.match(logger.lines[0], /no route POST \/v1\/events\/batch\/v1\/events\/batch/);
  await wl.shutdown(500);
  await server.close();
});

test("WatchLLMRangeError is exported for its own instanceof", () => {
  const error = new sdk.WatchLLMRangeError("m", "f");
  assert.ok(error instanceof RangeError && error instanceof WatchLLMValidationError);
  assert.ok(!(new RangeError("m") instanceof WatchLLMValidationError));
  assert.ok(!(new TypeError("m") instanceof WatchLLMValidationError));
});
