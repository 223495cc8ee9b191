// The cost of one log call on the caller's thread (p50/p99, beside a no-op call measured the
// same way) and the SDK's throughput to a local server that accepts everything.
//
//   npm run build && node scripts/bench-log.mjs [calls]
import { once } from "node:events";
import { createServer } from "node:http";

import { WatchLLM } from "watchllm";

const calls = Number(process.argv[2] ?? 100_000);
let received = 0;
const server = createServer(async (req, res) => {
  for await (const _ of req); // read the body (gzipped JSON); counting comes from the SDK
  res.writeHead(202, { "content-type": "application/json" });
  res.end('{"accepted":0,"event_ids":[]}');
  received += 1;
});
server.listen(0, "127.0.0.1");
await once(server, "listening");
const wl = new WatchLLM({
  apiKey: "bench",
  baseUrl: `http://127.0.0.1:${server.address().port}`,
  maxQueue: calls + 1,
  flushOnExit: false,
});

function percentiles(samples) {
  samples.sort((a, b) => a - b);
  const at = (q) => samples[Math.min(samples.length - 1, Math.floor(q * samples.length))];
  return { p50: at(0.5), p99: at(0.99) };
}

function measure(fn) {
  const samples = new Float64Array(calls);
  for (let i = 0; i < calls; i += 1) {
    const t0 = process.hrtime.bigint();
    fn(i);
    samples[i] = Number(process.hrtime.bigint() - t0) / 1000; // microseconds
  }
  return percentiles(Array.from(samples));
}

const noop = measure(() => {});
const t0 = performance.now();
const log = measure((i) =>
  wl.logPromptCall({
    model: "gpt-4o",
    provider: "openai",
    prompt: "What is the capital of France?",
    response: "Paris.",
    tokens_input: 14,
    tokens_output: 2,
    latency_ms: 380 + (i % 7),
  }),
);
await wl.flush(120_000);
const seconds = (performance.now() - t0) / 1000;
const fmt = ({ p50, p99 }) => `p50 ${p50.toFixed(1)} us, p99 ${p99.toFixed(1)} us`;
console.log(`no-op call:        ${fmt(noop)}`);
console.log(`logPromptCall:     ${fmt(log)}`);
console.log(
  `throughput:        ${calls} events in ${seconds.toFixed(2)} s (${Math.round(calls / seconds)} events/s, ${received} requests, log calls included)`,
);
await wl.shutdown(1000);
server.close();
