// Test helpers: a real HTTP server on loopback playing the WatchLLM ingest API with scripted
// answers, and a client wired to it with short intervals.
import { once } from "node:events";
import { createServer } from "node:http";
import { gunzipSync } from "node:zlib";

import { WatchLLM } from "watchllm";

/**
 * An ingest server. `script` is a list of answers taken one per request, in order; when it
 * runs out every request is accepted (202). An answer is
 *   { status, headers?, body? }        answered as given (the events are not kept)
 *   { drop: true }                     the connection is destroyed before any answer
 *   { drop: "after" }                  the batch is kept, then the connection is destroyed
 *   { reject: [indexes] }              207 with those events refused, the others kept
 *   { status: 413, maxEvents }         413 when the batch holds more than maxEvents events
 * `received` keeps every request's events; `stored` the event ids accepted, with repeats.
 */
export async function ingestServer(script = []) {
  const requests = [];
  const stored = [];
  const server = createServer(async (req, res) => {
    const chunks = [];
    for await (const chunk of req) chunks.push(chunk);
    let raw = Buffer.concat(chunks);
    const gzipped = req.headers["content-encoding"] === "gzip";
    if (gzipped) raw = gunzipSync(raw);
    const events = JSON.parse(raw.toString("utf8")).events;
    requests.push({ at: Date.now(), headers: req.headers, gzipped, events });
    const answer = script.shift() ?? {};
    const accept = (indexes) => {
      for (const i of indexes) stored.push(events[i].event_id);
      return { project_id: "acme", accepted: indexes.length, event_ids: indexes.map((i) => events[i].event_id) };
    };
    if (answer.drop === true) return req.socket.destroy();
    if (answer.drop === "after") {
      accept(events.map((_, i) => i));
      return req.socket.destroy();
    }
    if (answer.status === 413 && answer.maxEvents !== undefined && events.length <= answer.maxEvents) {
      script.unshift(answer); // the rule stays for the next requests
      return json(res, 202, accept(events.map((_, i) => i)));
    }
    if (answer.status === 413 && answer.maxEvents !== undefined) {
      script.unshift(answer);
    }
    if (answer.reject) {
      const kept = events.map((_, i) => i).filter((i) => !answer.reject.includes(i));
      const body = accept(kept);
      body.rejected = answer.reject.map((index) => ({
        index,
        event_id: events[index].event_id,
        errors: [{ field: "model", message: "String should have at least 1 character" }],
      }));
      return json(res, 207, body);
    }
    if (answer.status) return json(res, answer.status, answer.body ?? { error: "x", message: "scripted" }, answer.headers);
    return json(res, 202, accept(events.map((_, i) => i)));
  });
  server.listen(0, "127.0.0.1");
  await once(server, "listening");
  server.unref(); // a failed test that skips close() must not keep the runner waiting
  const url = `http://127.0.0.1:${server.address().port}`;
  return {
    url,
    requests,
    stored,
    script,
    events: () => requests.flatMap((r) => r.events),
    close: () => new Promise((resolve) => { server.closeAllConnections(); server.close(resolve); }),
  };
}

function json(res, status, body, headers = {}) {
  res.writeHead(status, { "content-type": "application/json", ...headers });
  res.end(JSON.stringify(body));
}

/** A logger that keeps the warnings. */
export function memoryLogger() {
  const lines = [];
  return { lines, warn: (message) => lines.push(message) };
}

/** A client for `url` with short intervals and a kept log. */
export function client(url, options = {}) {
  const logger = memoryLogger();
  const wl = new WatchLLM({
    apiKey: "wllm_test",
    baseUrl: url,
    flushIntervalMs: 20,
    initialBackoffMs: 5,
    maxBackoffMs: 20,
    flushOnExit: false,
    logger,
    ...options,
  });
  return { wl, logger };
}

/** `stats().dropped` as it must read: every drop reason, the Python SDK's in its order
 * (watchllm_ext/sdk/core.py DROP_REASONS), at 0 except those given. */
export function drops(counts = {}) {
  const reasons = [
    "queue_full",
    "invalid",
    "mask_error",
    "rejected",
    "unauthorized",
    "too_large",
    "server_error",
    "retries_exhausted",
    "shutdown",
    "sdk_error",
  ];
  return { ...Object.fromEntries(reasons.map((reason) => [reason, 0])), ...counts };
}
