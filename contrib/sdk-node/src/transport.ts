// Delivery: a bounded in-memory queue drained by one background sender, in batches by count,
// bytes and interval, gzip-compressed, retried with exponential backoff and full jitter. The
// host's calls only append to the queue; nothing here throws into the host code.
import { promisify } from "node:util";
import { gzip as gzipCallback } from "node:zlib";

import type { Accepted, ErrorBody } from "./contract.js";

const gzip = promisify(gzipCallback);

/** Why events were dropped: the keys of `stats().dropped`, every one there (0 when none). */
// The Python SDK's reasons, by the same names and in its order (watchllm_ext/sdk/core.py
// DROP_REASONS; tests/test_sdk_node.py compares the two).
export const DROP_REASONS = [
  "queue_full", // the queue held maxQueue events (or maxQueueBytes); the new one was dropped
  "invalid", // refused by the SDK's check of the contract (a field's type, range, length, ...)
  "mask_error", // the mask callback threw: dropped, never sent unmasked
  "rejected", // refused by the server (400, 404, 422, another 4xx, a 207's `rejected`); no retry
  "unauthorized", // 401 or 403: the key is unknown, revoked or has no ingest scope
  "too_large", // one event over maxEventBytes, or refused alone with 413
  "server_error", // 500 or another answer that is not retried
  "retries_exhausted", // still failing after retryForMs
  "shutdown", // logged after shutdown(), or still queued when its deadline passed
  "sdk_error", // a bug of the SDK itself, caught and logged (please report it)
] as const;

export type DropReason = (typeof DROP_REASONS)[number];

/** Every drop reason at 0: `stats().dropped.invalid` is a number before the first drop. */
export function noDrops(): Record<DropReason, number> {
  return Object.fromEntries(DROP_REASONS.map((reason) => [reason, 0])) as Record<DropReason, number>;
}

export interface Logger {
  warn(message: string): void;
}

export interface DeliveryOptions {
  baseUrl: string;
  apiKey: string;
  flushAt: number;
  maxBatchEvents: number;
  maxBatchBytes: number;
  maxEventBytes: number;
  maxQueue: number;
  maxQueueBytes: number;
  flushIntervalMs: number;
  gzip: boolean;
  retryForMs: number;
  initialBackoffMs: number;
  maxBackoffMs: number;
  timeoutMs: number;
  logger: Logger;
}

/** The Python SDK's `stats()`, in camelCase. */
export interface DeliveryStats {
  /** Events the server accepted. */
  sent: number;
  /** Requests made (a retry is another request). */
  batches: number;
  retries: number;
  /** Events waiting in the queue (the batch being sent included). */
  queued: number;
  queuedBytes: number;
  /** Events lost, by reason: every reason, 0 when none. */
  dropped: Record<DropReason, number>;
  droppedTotal: number;
  /** The last delivery problem, for a health check or a log line. */
  lastError: string | undefined;
}

interface Item {
  json: string; // the event, serialised once when logged
  bytes: number;
}

// Answers worth another try: the server was overloaded, restarting, or the body was late.
const RETRY_STATUSES = new Set([408, 429, 502, 503, 504]);

class RetryLater extends Error {
  constructor(
    readonly reason: string,
    readonly retryAfterMs: number | undefined,
  ) {
    super(reason);
  }
}

/** `Retry-After` in milliseconds: delta-seconds or an HTTP date (RFC 9110 10.2.3). */
export function parseRetryAfter(value: string | null, now = Date.now()): number | undefined {
  if (value === null || value.trim() === "") return undefined;
  const text = value.trim();
  if (/^\d+(\.\d+)?$/.test(text)) return Number(text) * 1000;
  const at = Date.parse(text);
  return Number.isNaN(at) ? undefined : Math.max(0, at - now);
}

/** Wait `ms`, or less when `signal` aborts. Unreferenced: a retry waiting for a server that
 * is down never keeps the process alive by itself (beforeExit then gives it flushAtExitMs). */
function sleep(ms: number, signal: AbortSignal): Promise<void> {
  return new Promise((resolve) => {
    if (signal.aborted) return resolve();
    const timer = setTimeout(done, Math.max(0, ms));
    timer.unref();
    signal.addEventListener("abort", done, { once: true });
    function done(): void {
      clearTimeout(timer);
      signal.removeEventListener("abort", done);
      resolve();
    }
  });
}

/** The request's own time limit, ended early by `stop` (Node 20.3+ has AbortSignal.any). */
function requestSignal(timeoutMs: number, stop: AbortSignal): AbortSignal {
  const timeout = AbortSignal.timeout(timeoutMs);
  const any = (AbortSignal as { any?: (signals: AbortSignal[]) => AbortSignal }).any;
  return any ? any([timeout, stop]) : timeout;
}

export class Delivery {
  private readonly options: DeliveryOptions;
  private readonly url: string;
  private queue: Item[] = [];
  private queuedBytes = 0;
  private sending = false;
  private enqueuedTotal = 0; // events that entered the queue
  private settledTotal = 0; // of those, delivered or dropped (the queue is FIFO)
  private waiters: Array<{ target: number; resolve: () => void }> = [];
  private timer: NodeJS.Timeout | undefined;
  private deadline: number | undefined; // set by close(): no retry is started past it
  // Aborted when close() gives up: the batch in hand is already counted as dropped, so the
  // request or wait in progress ends and counts nothing more.
  private readonly stop = new AbortController();
  private closed = false;
  private readonly warned = new Set<string>();
  private readonly counters = { sent: 0, batches: 0, retries: 0 };
  private lastError: string | undefined;
  private readonly dropped = noDrops();

  constructor(options: DeliveryOptions) {
    this.options = options;
    this.url = `${options.baseUrl.replace(/\/+$/, "")}/v1/events/batch`;
    this.timer = setInterval(() => this.kick(), options.flushIntervalMs);
    this.timer.unref(); // an idle SDK never keeps the process alive
  }

  /** Queue one serialised event; false when it was dropped (and counted). Never throws. */
  enqueue(json: string): boolean {
    if (this.closed) return this.drop("shutdown", 1);
    const bytes = Buffer.byteLength(json);
    if (bytes > this.options.maxEventBytes) {
      this.warnOnce("too_large", `an event of ${bytes} bytes is over maxEventBytes; dropped`);
      return this.drop("too_large", 1);
    }
    if (
      this.queue.length >= this.options.maxQueue ||
      this.queuedBytes + bytes > this.options.maxQueueBytes
    ) {
      // Drop the newest: what is queued is older, closer to being sent, and a run keeps
      // its beginning (docs: "the queue is full").
      this.warnOnce("queue_full", "the queue is full; new events are dropped until it drains");
      return this.drop("queue_full", 1);
    }
    this.queue.push({ json, bytes });
    this.queuedBytes += bytes;
    this.enqueuedTotal += 1;
    if (this.queue.length >= this.options.flushAt || this.queuedBytes >= this.options.maxBatchBytes) {
      setImmediate(() => this.kick()); // a full batch goes now, after the caller's code
    }
    return true;
  }

  /** Count events dropped before they reach the queue (sampling, the SDK's own checks). */
  drop(reason: DropReason, n: number, why?: string): false {
    this.dropped[reason] += n;
    this.lastError = `${reason}: ${why ?? `${n} events`}`;
    return false;
  }

  stats(): DeliveryStats {
    return {
      ...this.counters,
      queued: this.queue.length,
      queuedBytes: this.queuedBytes,
      dropped: { ...this.dropped },
      droppedTotal: Object.values(this.dropped).reduce((a, b) => a + b, 0),
      lastError: this.lastError,
    };
  }

  /** Resolves true once every event queued before the call is sent or dropped, false when
   * `timeoutMs` passes first (delivery goes on in the background). Never rejects. */
  flush(timeoutMs: number): Promise<boolean> {
    const target = this.enqueuedTotal;
    if (this.settledTotal >= target) return Promise.resolve(true);
    this.kick();
    return new Promise<boolean>((resolve) => {
      const waiter = { target, resolve: () => finish(true) };
      const timer = setTimeout(() => finish(false), Math.max(0, timeoutMs));
      const finish = (done: boolean): void => {
        clearTimeout(timer);
        this.waiters = this.waiters.filter((w) => w !== waiter);
        resolve(done);
      };
      this.waiters.push(waiter);
    });
  }

  /** Refuse new events, send what is queued until `timeoutMs` has passed, drop the rest.
   * Resolves true when nothing was left behind. */
  async close(timeoutMs: number): Promise<boolean> {
    this.closed = true;
    if (this.timer) clearInterval(this.timer);
    this.timer = undefined;
    this.deadline = Math.min(this.deadline ?? Infinity, Date.now() + timeoutMs);
    const before = this.dropped.shutdown;
    if (!(await this.flush(timeoutMs))) {
      this.stop.abort();
      this.dropQueued(this.queue.length, "shutdown");
    }
    // Dropped at the deadline by the sender (a retry that would end past it) or here.
    const lost = this.dropped.shutdown - before;
    if (lost) this.warnOnce("shutdown", `watchllm: ${lost} events not sent before the deadline`);
    return lost === 0;
  }

  private kick(): void {
    if (this.sending || this.queue.length === 0) return;
    this.sending = true;
    this.pump()
      .catch((error: unknown) => {
        // A bug of ours: count what was in hand and keep the SDK alive.
        this.warnOnce("internal", `watchllm: internal error in delivery: ${String(error)}`);
      })
      .finally(() => {
        this.sending = false;
        if (this.queue.length && !this.pastDeadline()) setImmediate(() => this.kick());
      });
  }

  private async pump(): Promise<void> {
    while (this.queue.length) {
      if (this.pastDeadline()) {
        this.dropQueued(this.queue.length, "shutdown");
        return;
      }
      // The batch stays at the queue's head while it is sent: flush() and stats() see it.
      const n = this.batchSize();
      try {
        await this.send(this.queue.slice(0, n));
      } catch (error) {
        if (this.stop.signal.aborted) return;
        this.warnOnce("internal", `watchllm: internal error in delivery: ${String(error)}`);
        this.dropQueued(n, "sdk_error");
        continue;
      }
      if (this.stop.signal.aborted) return; // close() settled the queue already
      this.settle(n);
    }
  }

  private batchSize(): number {
    let n = 0;
    let bytes = 0;
    for (const item of this.queue) {
      if (n >= this.options.maxBatchEvents) break;
      if (n > 0 && bytes + item.bytes > this.options.maxBatchBytes) break;
      n += 1;
      bytes += item.bytes;
    }
    return n;
  }

  /** Remove `n` events from the queue's head: they are delivered or counted as dropped. */
  private settle(n: number): void {
    for (const item of this.queue.splice(0, n)) this.queuedBytes -= item.bytes;
    this.settledTotal += n;
    for (const waiter of [...this.waiters]) {
      if (this.settledTotal >= waiter.target) waiter.resolve();
    }
  }

  private dropQueued(n: number, reason: DropReason): void {
    if (n <= 0) return;
    this.drop(reason, n);
    this.settle(n);
  }

  private pastDeadline(): boolean {
    return this.deadline !== undefined && Date.now() >= this.deadline;
  }

  /** Deliver one batch: retried as documented, split in halves on 413, and every event it
   * holds counted as sent or dropped by reason. Settling the queue is the caller's part. */
  private async send(batch: Item[]): Promise<void> {
    const body = `{"events":[${batch.map((item) => item.json).join(",")}]}`;
    // Below 1 KB gzip saves little and costs a little: sent as is (as the Python SDK does).
    const compress = this.options.gzip && body.length >= 1024;
    const payload: Uint8Array = compress ? await gzip(body) : Buffer.from(body);
    const headers: Record<string, string> = {
      Authorization: `Bearer ${this.options.apiKey}`,
      "Content-Type": "application/json",
    };
    if (compress) headers["Content-Encoding"] = "gzip";
    const giveUpAt = Date.now() + this.options.retryForMs;
    for (let attempt = 0; ; attempt += 1) {
      try {
        const status = await this.post(payload, headers, batch.length);
        if (status === 413 && batch.length > 1) {
          // Over the server's max_batch_events or body limit: halves go one after the other.
          const half = Math.ceil(batch.length / 2);
          await this.send(batch.slice(0, half));
          await this.send(batch.slice(half));
        }
        return;
      } catch (error) {
        if (this.stop.signal.aborted) return; // close() gave up on it and counted it
        if (!(error instanceof RetryLater)) throw error;
        // Full jitter: clients that failed together do not retry in step.
        const backoff =
          Math.random() *
          Math.min(this.options.maxBackoffMs, this.options.initialBackoffMs * 2 ** attempt);
        const wait =
          error.retryAfterMs !== undefined
            ? Math.min(error.retryAfterMs, Math.max(this.options.maxBackoffMs, this.options.retryForMs))
            : backoff;
        this.lastError = `retrying in ${Math.round(wait)} ms: ${error.reason}`;
        if (Date.now() + wait > giveUpAt) {
          this.warnOnce(
            "retries_exhausted",
            `watchllm: ${batch.length} events dropped after ${attempt + 1} attempts (${error.reason})`,
          );
          this.drop("retries_exhausted", batch.length, error.reason);
          return;
        }
        if (this.deadline !== undefined && Date.now() + wait >= this.deadline) {
          this.drop("shutdown", batch.length, error.reason);
          return;
        }
        this.counters.retries += 1;
        await sleep(wait, this.stop.signal);
        if (this.stop.signal.aborted) return;
      }
    }
  }

  /** One POST. Returns the status when the batch is settled by it (or 413 for a batch to
   * split); throws RetryLater when it is worth another try. */
  private async post(
    payload: Uint8Array,
    headers: Record<string, string>,
    count: number,
  ): Promise<number> {
    this.counters.batches += 1;
    let timeoutMs = this.options.timeoutMs;
    if (this.deadline !== undefined) {
      timeoutMs = Math.max(1, Math.min(timeoutMs, this.deadline - Date.now()));
    }
    let response: Response;
    let text: string;
    try {
      response = await fetch(this.url, {
        method: "POST",
        headers,
        body: payload,
        signal: requestSignal(timeoutMs, this.stop.signal),
      });
      text = await response.text();
    } catch (error) {
      // Refused, reset, timed out: the server may or may not have the batch. The events carry
      // their own ids, so sending them again cannot store them twice.
      const cause = (error as { cause?: { code?: string } }).cause?.code;
      throw new RetryLater(`network error: ${cause ?? String(error)}`, undefined);
    }
    const status = response.status;
    if (status === 202 || status === 207) {
      const answer = parseJson(text) as Partial<Accepted> | undefined;
      const rejected = answer?.rejected ?? [];
      this.counters.sent += answer?.accepted ?? count - rejected.length;
      if (rejected.length) {
        this.drop("rejected", count - (answer?.accepted ?? count - rejected.length));
        const detail = rejected
          .slice(0, 5)
          .map((r) => `#${r.index}: ${r.errors.map((e) => `${e.field}: ${e.message}`).join("; ")}`)
          .join(" | ");
        this.warnOnce("rejected", `watchllm: the server refused ${rejected.length} events: ${detail}`);
      }
      return status;
    }
    if (RETRY_STATUSES.has(status)) {
      throw new RetryLater(`HTTP ${status}`, parseRetryAfter(response.headers.get("retry-after")));
    }
    if (status === 413 && count > 1) return status;
    const error = parseJson(text) as Partial<ErrorBody> | undefined;
    let message = `${error?.message ?? text.slice(0, 300)}${error?.field ? ` (field ${error.field})` : ""}`;
    if (status === 404) {
      // The usual cause: a baseUrl that already ends in the route (…/v1/events/batch).
      message =
        `${this.url} is not the ingest route of a WatchLLM server: baseUrl should be the` +
        ` server's root, such as http://127.0.0.1:8787, with no path after it (${message})`;
    }
    const reason: DropReason =
      status === 413
        ? "too_large"
        : status === 422
          ? "rejected"
          : status === 401 || status === 403
            ? "unauthorized"
            : status >= 500
              ? "server_error"
              : "rejected";
    if (status === 422) {
      const rejected = (parseJson(text) as Partial<Accepted> | undefined)?.rejected ?? [];
      const detail = rejected
        .slice(0, 5)
        .map((r) => `#${r.index}: ${r.errors.map((e) => `${e.field}: ${e.message}`).join("; ")}`)
        .join(" | ");
      this.warnOnce(reason, `watchllm: HTTP 422, ${count} events refused: ${message} ${detail}`);
    } else {
      this.warnOnce(reason, `watchllm: HTTP ${status}, ${count} events dropped: ${message}`);
    }
    this.drop(reason, count, `HTTP ${status}: ${message}`);
    return status;
  }

  private warnOnce(key: string, message: string): void {
    if (this.warned.has(key)) return;
    this.warned.add(key);
    try {
      this.options.logger.warn(message);
    } catch {
      // a logger that throws must not break delivery
    }
  }
}

function parseJson(text: string): unknown {
  try {
    return JSON.parse(text);
  } catch {
    return undefined;
  }
}
