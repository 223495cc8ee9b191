// The openai wrapper with the real `openai` package pointed (baseURL) at a local server that
// speaks the OpenAI HTTP API: chat completions and responses, JSON and SSE streaming, errors.
import assert from "node:assert/strict";
import { once } from "node:events";
import { createServer } from "node:http";
import { test } from "node:test";
import { setTimeout as sleep } from "node:timers/promises";

import OpenAI from "openai";
import { wrapOpenAI } from "watchllm/openai";

import { client, ingestServer } from "./helpers.mjs";

const CHAT_REPLY = {
  id: "chatcmpl-1",
  object: "chat.completion",
  created: 1_700_000_000,
  model: "gpt-4o-2024-08-06",
  choices: [
    {
      index: 0,
      message: {
        role: "assistant",
        content: null,
        tool_calls: [
          { id: "call_1", type: "function", function: { name: "get_weather", arguments: '{"city":"Paris"}' } },
        ],
      },
      finish_reason: "tool_calls",
    },
  ],
  usage: { prompt_tokens: 12, completion_tokens: 7, total_tokens: 19 },
};

const RESPONSE = {
  id: "resp_1",
  object: "response",
  created_at: 1_700_000_000,
  status: "completed",
  model: "gpt-4.1-2025-04-14",
  output: [
    {
      type: "message",
      id: "msg_1",
      status: "completed",
      role: "assistant",
      content: [{ type: "output_text", text: "Hello there", annotations: [] }],
    },
  ],
  usage: { input_tokens: 5, output_tokens: 2, total_tokens: 7 },
};

function sse(res, events) {
  res.writeHead(200, { "content-type": "text/event-stream", "x-request-id": "req_stream" });
  return (async () => {
    for (const [name, data] of events) {
      res.write(`${name ? `event: ${name}\n` : ""}data: ${typeof data === "string" ? data : JSON.stringify(data)}\n\n`);
      await sleep(15); // the chunks arrive over time: time to first token < latency
    }
    res.end();
  })();
}

function chatChunk(delta, extra = {}) {
  return {
    id: "chatcmpl-2",
    object: "chat.completion.chunk",
    created: 1_700_000_000,
    model: "gpt-4o-mini",
    choices: [{ index: 0, delta, finish_reason: null }],
    ...extra,
  };
}

/** A local OpenAI: answers by path and by `stream`; model "fail" gets a 400 error. */
async function openaiServer() {
  const requests = [];
  const server = createServer(async (req, res) => {
    const chunks = [];
    for await (const chunk of req) chunks.push(chunk);
    const body = JSON.parse(Buffer.concat(chunks).toString("utf8"));
    requests.push({ path: req.url, body });
    if (body.model === "fail") {
      res.writeHead(400, { "content-type": "application/json", "x-request-id": "req_bad" });
      return res.end(JSON.stringify({ error: { message: "model fail does not exist", type: "invalid_request_error", code: "model_not_found" } }));
    }
    if (req.url === "/v1/chat/completions" && !body.stream) {
      res.writeHead(200, { "content-type": "application/json", "x-request-id": "req_chat" });
      return res.end(JSON.stringify(CHAT_REPLY));
    }
    if (req.url === "/v1/chat/completions") {
      const events = [
        [null, chatChunk({ role: "assistant", content: "" })],
        [null, chatChunk({ content: "Hel" })],
        [null, chatChunk({ content: "lo" })],
        [null, { ...chatChunk({}), choices: [{ index: 0, delta: {}, finish_reason: "stop" }] }],
      ];
      if (body.stream_options?.include_usage) {
        events.push([null, chatChunk({}, { choices: [], usage: { prompt_tokens: 9, completion_tokens: 2, total_tokens: 11 } })]);
      }
      events.push([null, "[DONE]"]);
      return sse(res, events);
    }
    if (req.url === "/v1/responses" && !body.stream) {
      res.writeHead(200, { "content-type": "application/json", "x-request-id": "req_resp" });
      return res.end(JSON.stringify(RESPONSE));
    }
    if (req.url === "/v1/responses") {
      const inProgress = { ...RESPONSE, status: "in_progress", output: [], usage: null };
      return sse(res, [
        ["response.created", { type: "response.created", sequence_number: 0, response: inProgress }],
        ["response.output_text.delta", { type: "response.output_text.delta", sequence_number: 1, item_id: "msg_1", output_index: 0, content_index: 0, delta: "Hello" }],
        ["response.output_text.delta", { type: "response.output_text.delta", sequence_number: 2, item_id: "msg_1", output_index: 0, content_index: 0, delta: " there" }],
        ["response.completed", { type: "response.completed", sequence_number: 3, response: RESPONSE }],
      ]);
    }
    res.writeHead(404).end();
  });
  server.listen(0, "127.0.0.1");
  await once(server, "listening");
  server.unref();
  return { url: `http://127.0.0.1:${server.address().port}/v1`, requests, close: () => new Promise((r) => server.close(r)) };
}

async function setup() {
  const ingest = await ingestServer();
  const llm = await openaiServer();
  const { wl } = client(ingest.url);
  const openai = wrapOpenAI(new OpenAI({ apiKey: "sk-test", baseURL: llm.url, maxRetries: 0 }), wl);
  return {
    ingest,
    llm,
    wl,
    openai,
    async events() {
      assert.equal(await wl.flush(5000), true);
      return ingest.events();
    },
    async close() {
      await wl.shutdown(1000);
      await Promise.all([ingest.close(), llm.close()]);
    },
  };
}

test("chat.completions.create: model, prompt, tool calls, tokens, latency, request id, in the run", async () => {
  const t = await setup();
  const messages = [
    { role: "system", content: "be brief" },
    { role: "user", content: [{ type: "text", text: "weather in Paris?" }] },
  ];
  let runId;
  const reply = await t.wl.run("weather", async (run) => {
    runId = run.runId;
    return t.openai.chat.completions.create({ model: "gpt-4o", messages });
  });
  assert.equal(reply.choices[0].message.tool_calls[0].function.name, "get_weather"); // untouched
  const [call] = (await t.events()).filter((e) => e.event_type === "prompt_call");
  assert.equal(call.run_id, runId);
  assert.equal(call.provider, "openai");
  assert.equal(call.model, "gpt-4o-2024-08-06");
  assert.deepEqual(call.prompt, messages);
  assert.equal(call.tokens_input, 12);
  assert.equal(call.tokens_output, 7);
  assert.deepEqual(call.tool_calls, [{ id: "call_1", tool_name: "get_weather", tool_input: { city: "Paris" } }]);
  assert.equal(call.status, "success");
  assert.ok(call.latency_ms > 0);
  assert.equal(call.response_metadata.request_id, "req_chat");
  assert.equal(call.response_metadata.finish_reason, "tool_calls");
  await t.close();
});

test("the client's own promise is returned: withResponse() still works", async () => {
  const t = await setup();
  const { data, request_id: requestId } = await t.openai.chat.completions
    .create({ model: "gpt-4o", messages: [{ role: "user", content: "hi" }] })
    .withResponse();
  assert.equal(data.id, "chatcmpl-1");
  assert.equal(requestId, "req_chat");
  assert.equal((await t.events()).length, 1);
  // Everything not wrapped is the client's own.
  assert.equal(t.openai.baseURL, t.llm.url);
  assert.equal(typeof t.openai.models.list, "function");
  await t.close();
});

test("chat streaming: chunks reach the caller as they come; text, tokens, time to first token at the end", async () => {
  const t = await setup();
  const stream = await t.openai.chat.completions.create({
    model: "gpt-4o-mini",
    messages: [{ role: "user", content: "hi" }],
    stream: true,
    stream_options: { include_usage: true },
  });
  let text = "";
  let chunks = 0;
  for await (const chunk of stream) {
    chunks += 1;
    text += chunk.choices[0]?.delta?.content ?? "";
    if (chunks === 2) assert.equal(t.ingest.events().length, 0, "nothing logged before the end");
  }
  assert.equal(text, "Hello");
  const [call] = await t.events();
  assert.equal(call.response, "Hello");
  assert.equal(call.model, "gpt-4o-mini");
  assert.equal(call.tokens_input, 9);
  assert.equal(call.tokens_output, 2);
  assert.equal(call.response_metadata.stream, true);
  assert.equal(call.response_metadata.finish_reason, "stop");
  assert.equal(call.response_metadata.request_id, "req_stream");
  const ttft = call.response_metadata.time_to_first_token_ms;
  assert.ok(ttft > 0 && ttft < call.latency_ms, `ttft ${ttft}, latency ${call.latency_ms}`);
  assert.ok(call.latency_ms >= 50, "the stream's whole time");
  await t.close();
});

test("a stream the caller stops early is recorded with what was read", async () => {
  const t = await setup();
  const stream = await t.openai.chat.completions.create({ model: "m", messages: [], stream: true });
  for await (const chunk of stream) {
    if (chunk.choices[0]?.delta?.content === "Hel") break;
  }
  const [call] = await t.events();
  assert.equal(call.response, "Hel");
  assert.equal(call.status, "success");
  await t.close();
});

test("responses.create: instructions and input, output text, tokens; streaming too", async () => {
  const t = await setup();
  const reply = await t.openai.responses.create({ model: "gpt-4.1", instructions: "be kind", input: "hello" });
  assert.equal(reply.output_text, "Hello there");
  const stream = await t.openai.responses.create({ model: "gpt-4.1", input: [{ role: "user", content: "hi" }], stream: true });
  const deltas = [];
  for await (const event of stream) if (event.type === "response.output_text.delta") deltas.push(event.delta);
  assert.deepEqual(deltas, ["Hello", " there"]);
  const [plain, streamed] = await t.events();
  assert.deepEqual(plain.prompt, [
    { role: "system", content: "be kind" },
    { role: "user", content: "hello" },
  ]);
  assert.equal(plain.response, "Hello there");
  assert.equal(plain.model, "gpt-4.1-2025-04-14");
  assert.deepEqual([plain.tokens_input, plain.tokens_output], [5, 2]);
  assert.equal(plain.response_metadata.request_id, "req_resp");
  assert.deepEqual(streamed.prompt, [{ role: "user", content: "hi" }]);
  assert.equal(streamed.response, "Hello there");
  assert.deepEqual([streamed.tokens_input, streamed.tokens_output], [5, 2]);
  assert.equal(streamed.response_metadata.stream, true);
  await t.close();
});

test("an API error reaches the caller unchanged and is logged as an error call", async () => {
  const t = await setup();
  await assert.rejects(
    t.openai.chat.completions.create({ model: "fail", messages: [{ role: "user", content: "x" }] }),
    (e) => e instanceof OpenAI.BadRequestError && e.status === 400,
  );
  await assert.rejects(
    t.openai.responses.create({ model: "fail", input: "x", stream: true }),
    (e) => e.status === 400,
  );
  const events = await t.events();
  assert.equal(events.length, 2);
  for (const call of events) {
    assert.equal(call.status, "error");
    assert.equal(call.model, "fail");
    assert.match(call.error_message, /model fail does not exist/);
    assert.equal(call.response_metadata.http_status, 400);
    assert.equal(call.response_metadata.request_id, "req_bad");
  }
  await t.close();
});

test("the wrapper leaves other clients and the package alone (no global patching)", async () => {
  const t = await setup();
  const plain = new OpenAI({ apiKey: "sk-test", baseURL: t.llm.url, maxRetries: 0 });
  await plain.chat.completions.create({ model: "gpt-4o", messages: [{ role: "user", content: "hi" }] });
  assert.equal(t.llm.requests.length, 1);
  assert.equal((await t.events()).length, 0);
  await t.close();
});
