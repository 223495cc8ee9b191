// The CommonJS build: `require("watchllm")` and `require("watchllm/openai")` work and log.
const assert = require("node:assert/strict");
const { test } = require("node:test");

test("require() loads the CJS build", async () => {
  const { WatchLLM, EVENT_TYPES, currentRun } = require("watchllm");
  const { wrapOpenAI } = require("watchllm/openai");
  assert.equal(typeof wrapOpenAI, "function");
  assert.equal(EVENT_TYPES.length, 8);
  assert.match(require.resolve("watchllm"), /dist[\\/]cjs[\\/]index\.js$/);
  const wl = new WatchLLM({ enabled: false });
  const runId = await wl.run("r", async (run) => currentRun().runId === run.runId);
  assert.equal(runId, true);
});
