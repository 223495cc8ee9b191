// The WatchLLM client: one method per event type, runs and observed functions, delivery in the
// background. Mirrors the Python SDK (watchllm_ext.sdk): same env variables, same event ids,
// same drop reasons; nothing it does throws into the host code unless `strict` is set.
import { hostname } from "node:os";

import { checkEvent, describe } from "./check.js";
import {
  type AgentStepEvent,
  type AssertionFailedEvent,
  type CostThresholdExceededEvent,
  type ErrorEvent,
  type Event,
  type EventType,
  type HallucinationDetectedEvent,
  type PerformanceAlertEvent,
  type PromptCallEvent,
  type ToolCallEvent,
} from "./contract.js";
import { currentRun, newId, useRun, type RunContext } from "./context.js";
import { Delivery, noDrops, type DeliveryStats, type DropReason, type Logger } from "./transport.js";
import { SDK_VERSION } from "./version.js";

/** The fields a `log*` method takes: the event without its type; ids, time and the run's
 * fields are filled in (from the current run when there is one). */
export type EventInput<E extends Event> = Omit<E, "event_type" | "run_id"> & { run_id?: string };

/** Any event of the contract with its `event_type`, `run_id` optional (distributes over the
 * union, so each type keeps its own fields). */
export type AnyEventInput = Event extends infer E
  ? E extends Event
    ? Omit<E, "run_id"> & { run_id?: string }
    : never
  : never;

export interface WatchLLMOptions {
  /** An ingest key (default: $WATCHLLM_API_KEY). Without a key and URL the client is off. */
  apiKey?: string;
  /** The server (default: $WATCHLLM_BASE_URL, then http://127.0.0.1:8787 when a key is set). */
  baseUrl?: string;
  /** false: every method is a no-op (default: on when a key is known). */
  enabled?: boolean;
  env?: "production" | "staging" | "development";
  release?: string;
  /** Throw WatchLLMValidationError at the call site for a malformed event (for development);
   * otherwise such events are counted (`invalid`) and dropped with one warning. */
  strict?: boolean;
  /** Share of runs kept, 0 to 1 (default 1). Decided per run id, so a run is kept whole. */
  sampleRate?: number;
  /** Called with every event before it is queued: return it (changed or not) or null to drop
   * it. For redaction. */
  mask?: (event: Event) => Event | null | undefined;
  /** false: prompts, responses, tool input/output and step content are left out. */
  captureContent?: boolean;
  // Delivery: the Python SDK's options and defaults, in milliseconds.
  /** Send as soon as this many events are queued (default 500). */
  flushAt?: number;
  /** Send what is queued at least this often (default 1000 ms). */
  flushIntervalMs?: number;
  /** Events per request (default 1000; the server takes up to its max_batch_events, and a
   * 413 splits the batch). */
  maxBatchEvents?: number;
  /** JSON bytes per request before gzip (default 4 MiB; an event larger goes alone). */
  maxBatchBytes?: number;
  /** A larger event is dropped as `too_large` (default 8 MiB, under the server's limits). */
  maxEventBytes?: number;
  /** The queue's bounds: past them new events are dropped as `queue_full` (defaults 10,000
   * events, 64 MiB). */
  maxQueue?: number;
  maxQueueBytes?: number;
  /** gzip request bodies (default true). */
  gzip?: boolean;
  /** One request's time limit (default 10,000 ms). */
  timeoutMs?: number;
  /** How long one batch is retried before it is dropped (default 300,000 ms). */
  retryForMs?: number;
  /** Backoff: a random wait up to min(maxBackoffMs, initialBackoffMs * 2^attempt), or the
   * server's Retry-After (default 500 and 30,000 ms). */
  initialBackoffMs?: number;
  maxBackoffMs?: number;
  /** Send what is queued when the process is about to exit (beforeExit; default true). */
  flushOnExit?: boolean;
  /** How long that last send may take (default 5,000 ms). */
  flushAtExitMs?: number;
  /** Where warnings go (default: console). */
  logger?: Logger;
}

export interface RunOptions {
  name?: string;
  runId?: string;
  userId?: string;
  sessionId?: string;
  tags?: string[];
  metadata?: Record<string, unknown>;
}

export interface ObserveOptions {
  /** The event's name (default: the function's name). */
  name?: string;
  /** Each call is an `agent_step` (default) or a `tool_call` event. */
  asType?: "agent_step" | "tool_call";
  /** Record the arguments as the step's action (tool_input); default true. */
  captureInput?: boolean;
  /** Record the result as the step's observation (tool_output); default true. */
  captureOutput?: boolean;
}

export interface Stats extends DeliveryStats {
  enabled: boolean;
  /** Events given to the log methods (and by run(), observe() and the integrations). */
  logged: number;
  /** Events left out by sampleRate (by design: not counted as dropped). */
  sampledOut: number;
}

/** A malformed event in strict mode: `field` names the field at fault, as a path
 * (`tokens_input`, `tool_calls[0].latency_ms`). A wrong type, a missing or unknown field is a
 * TypeError; a value outside its range, length, pattern or set of values is a
 * {@link WatchLLMRangeError}, a RangeError. Both are `instanceof WatchLLMValidationError`. */
export class WatchLLMValidationError extends TypeError {
  constructor(
    message: string,
    readonly field: string | undefined,
  ) {
    super(message);
    this.name = "WatchLLMValidationError";
  }

  // One class to catch for both kinds (a class cannot extend TypeError and RangeError both).
  static override [Symbol.hasInstance](value: unknown): boolean {
    return value instanceof WatchLLMRangeError || Function.prototype[Symbol.hasInstance].call(this, value);
  }
}

/** A value outside the contract's range, length, pattern or set of values, in strict mode. */
export class WatchLLMRangeError extends RangeError {
  constructor(
    message: string,
    readonly field: string | undefined,
  ) {
    super(message);
    this.name = "WatchLLMValidationError"; // as the TypeError kind: one name to look for
  }
}

// Fields that hold what the user or the model said: left out with captureContent: false.
const CONTENT_FIELDS = [
  "prompt",
  "response",
  "tool_input",
  "tool_output",
  "reasoning",
  "action",
  "observation",
  "evidence",
  "expected",
  "actual",
] as const;
const MAX_IO_CHARS = 10_000; // an observed function's arguments and result, as JSON
const MAX_ERROR_CHARS = 10_000; // error_message's limit in the contract

function truncate(text: string, max: number): string {
  return text.length <= max ? text : `${text.slice(0, max - 1)}…`;
}

/** JSON for anything: cycles, BigInts and functions do not throw. */
function safeJson(value: unknown): string {
  try {
    const seen = new WeakSet<object>();
    const text = JSON.stringify(value, (_key, v: unknown) => {
      if (typeof v === "bigint") return v.toString();
      if (typeof v === "function") return `[function ${v.name || "anonymous"}]`;
      if (v !== null && typeof v === "object") {
        if (seen.has(v)) return "[circular]";
        seen.add(v);
      }
      return v;
    });
    return text ?? String(value);
  } catch {
    return String(value);
  }
}

const CRC_TABLE = Array.from({ length: 256 }, (_, n) => {
  let c = n;
  for (let k = 0; k < 8; k += 1) c = c & 1 ? 0xedb88320 ^ (c >>> 1) : c >>> 1;
  return c >>> 0;
});

/** CRC-32 of the run id's UTF-8 over 2^32, in [0, 1): the Python SDK's sampling function
 * (zlib.crc32), so a run that crosses a Python and a Node service is kept or left out whole. */
export function runFraction(runId: string): number {
  let crc = 0xffffffff;
  for (const byte of Buffer.from(runId, "utf8")) crc = CRC_TABLE[(crc ^ byte) & 0xff] ^ (crc >>> 8);
  return ((crc ^ 0xffffffff) >>> 0) / 2 ** 32;
}

interface Step {
  kind: "agent_step" | "tool_call";
  name: string;
  captureInput?: boolean;
  captureOutput?: boolean;
}

/** A JSON-safe copy of a value (cycles, BigInts and functions made harmless), for tool input
 * and output; undefined when it has no JSON form. */
function capture(value: unknown): unknown {
  const text = safeJson(value);
  try {
    return JSON.parse(text);
  } catch {
    return text;
  }
}

function isPromise(value: unknown): value is PromiseLike<unknown> {
  return (
    value !== null &&
    (typeof value === "object" || typeof value === "function") &&
    typeof (value as { then?: unknown }).then === "function"
  );
}

function errorParts(error: unknown): { type: string; message: string; stack?: string } {
  if (error instanceof Error) {
    return { type: error.name || "Error", message: error.message, stack: error.stack };
  }
  return { type: typeof error, message: safeJson(error) };
}

export class WatchLLM {
  readonly enabled: boolean;
  private readonly options: WatchLLMOptions;
  private readonly delivery: Delivery | undefined;
  private readonly logger: Logger;
  private readonly client: { hostname: string; sdk_version: string; platform: string };
  private readonly recordedErrors = new WeakSet<object>();
  private readonly onBeforeExit: (() => void) | undefined;
  private warnedInvalid = false;
  private shutDown = false;
  private sampledOut = 0;
  private logged = 0;

  constructor(options: WatchLLMOptions = {}) {
    this.options = options;
    this.logger = options.logger ?? console;
    const apiKey = options.apiKey ?? process.env.WATCHLLM_API_KEY;
    const baseUrl =
      options.baseUrl ?? process.env.WATCHLLM_BASE_URL ?? (apiKey ? "http://127.0.0.1:8787" : "");
    this.client = {
      hostname: truncate(hostname(), 256),
      sdk_version: `watchllm-node/${SDK_VERSION}`,
      platform: `node ${process.version} ${process.platform}-${process.arch}`,
    };
    this.enabled = options.enabled !== false && Boolean(apiKey) && Boolean(baseUrl);
    if (this.enabled) {
      // At construction, not as a delivery failure retried for retryForMs and then dropped.
      const from = options.baseUrl !== undefined ? "baseUrl" : "baseUrl (from WATCHLLM_BASE_URL)";
      checkBaseUrl(baseUrl, from);
    }
    if (!this.enabled) {
      if (options.enabled !== false) {
        this.warn("watchllm: no API key (apiKey or WATCHLLM_API_KEY); events are not sent");
      }
      return;
    }
    this.delivery = new Delivery({
      baseUrl,
      apiKey: apiKey as string,
      flushAt: options.flushAt ?? 500,
      flushIntervalMs: options.flushIntervalMs ?? 1000,
      maxBatchEvents: options.maxBatchEvents ?? 1000,
      maxBatchBytes: options.maxBatchBytes ?? 4 * 1024 * 1024,
      maxEventBytes: options.maxEventBytes ?? 8 * 1024 * 1024,
      maxQueue: options.maxQueue ?? 10_000,
      maxQueueBytes: options.maxQueueBytes ?? 64 * 1024 * 1024,
      gzip: options.gzip ?? true,
      timeoutMs: options.timeoutMs ?? 10_000,
      retryForMs: options.retryForMs ?? 300_000,
      initialBackoffMs: options.initialBackoffMs ?? 500,
      maxBackoffMs: options.maxBackoffMs ?? 30_000,
      logger: this.logger,
    });
    if (options.flushOnExit !== false) {
      // beforeExit: the event loop is empty, so the host is done. A shutdown (not a flush)
      // so a server that cannot be reached cannot make beforeExit fire again and again.
      this.onBeforeExit = () => {
        void this.shutdown(options.flushAtExitMs ?? 5000);
      };
      process.once("beforeExit", this.onBeforeExit);
    }
  }

  // -- one method per event type --------------------------------------------------------

  /** Log a prompt call; returns its event id (also when the event is dropped). */
  logPromptCall(fields: EventInput<PromptCallEvent>): string {
    return this.log("prompt_call", fields);
  }

  logToolCall(fields: EventInput<ToolCallEvent>): string {
    return this.log("tool_call", fields);
  }

  logAgentStep(fields: EventInput<AgentStepEvent>): string {
    return this.log("agent_step", fields);
  }

  logError(fields: EventInput<ErrorEvent>): string {
    return this.log("error", fields);
  }

  logAssertionFailed(fields: EventInput<AssertionFailedEvent>): string {
    return this.log("assertion_failed", fields);
  }

  logHallucinationDetected(fields: EventInput<HallucinationDetectedEvent>): string {
    return this.log("hallucination_detected", fields);
  }

  logCostThresholdExceeded(fields: EventInput<CostThresholdExceededEvent>): string {
    return this.log("cost_threshold_exceeded", fields);
  }

  logPerformanceAlert(fields: EventInput<PerformanceAlertEvent>): string {
    return this.log("performance_alert", fields);
  }

  /** Log any event of the contract (its `event_type` says which); returns its id. */
  logEvent(event: AnyEventInput): string {
    const { event_type: type, ...fields } = event as { event_type: EventType };
    return this.log(type, fields as Record<string, unknown>);
  }

  // -- runs and nesting -----------------------------------------------------------------

  /** Run `fn` as one run: its events nest under the run's root, an agent_step (step 0) that
   * records the name, time taken and outcome; steps inside count from 1. Inside another run
   * it is a step of that run instead. An error is logged as an `error` event (once) and
   * thrown again. Returns what `fn` returns (a promise stays a promise). */
  run<T>(options: string | RunOptions, fn: (run: RunContext) => T): T {
    const opts: RunOptions = typeof options === "string" ? { name: options } : options;
    const parent = currentRun();
    const context: RunContext =
      parent && !opts.runId
        ? parent
        : {
            runId: opts.runId ?? newId(),
            userId: opts.userId,
            sessionId: opts.sessionId,
            tags: opts.tags,
            metadata: opts.metadata,
            steps: { next: 0 },
          };
    const step: Step = { kind: "agent_step", name: opts.name ?? "run" };
    return this.traced(context, step, () => fn(currentRun() as RunContext));
  }

  /** Wrap `fn` so each call is an event of the current run (a new run when there is none):
   * an agent_step (or a tool_call with `asType`), timed from call to return, under which the
   * events logged during the call nest. Sync functions stay sync; a returned promise is timed
   * until it settles. */
  observe<A extends unknown[], R>(
    fn: (...args: A) => R,
    options: ObserveOptions = {},
  ): (...args: A) => R {
    const self = this;
    const step: Step = {
      kind: options.asType ?? "agent_step",
      name: options.name ?? (fn.name || "anonymous"),
      captureInput: options.captureInput ?? true,
      captureOutput: options.captureOutput ?? true,
    };
    return function observed(this: unknown, ...args: A): R {
      const context = currentRun() ?? { runId: newId(), steps: { next: 1 } };
      return self.traced(context, step, () => fn.apply(this, args), args);
    };
  }

  /** The engine of run() and observe(): one event for the call, logged when it ends, whose
   * id (chosen at the start) is the parent of everything logged during it. */
  private traced<R>(context: RunContext, step: Step, fn: () => R, args?: unknown[]): R {
    if (!this.enabled) return useRun(context, fn);
    const stepId = newId();
    const stepNumber = step.kind === "agent_step" ? context.steps.next++ : 0;
    const started = new Date();
    const t0 = performance.now();
    const inner: RunContext = { ...context, parentEventId: stepId };
    const finish = (result: unknown, error?: unknown): void => {
      const failed = error !== undefined;
      try {
        if (failed) this.recordError(error, inner);
        const input = step.captureInput && args !== undefined ? capture(args) : undefined;
        const output = step.captureOutput && !failed && result !== undefined ? capture(result) : undefined;
        const common = {
          event_id: stepId,
          timestamp: started.toISOString(),
          status: failed ? ("error" as const) : ("success" as const),
          latency_ms: performance.now() - t0,
        };
        if (step.kind === "tool_call") {
          this.logWith(context, "tool_call", {
            ...common,
            tool_name: truncate(step.name, 256),
            tool_input: input,
            tool_output: output,
            ...(failed ? { error_message: truncate(errorParts(error).message, MAX_ERROR_CHARS) } : {}),
          });
        } else {
          this.logWith(context, "agent_step", {
            ...common,
            step_number: stepNumber,
            step_name: truncate(step.name, 256),
            action: input === undefined ? undefined : truncate(safeJson(input), MAX_IO_CHARS),
            observation: output === undefined ? undefined : truncate(safeJson(output), MAX_IO_CHARS),
          });
        }
      } catch (e) {
        // strict mode's check surfaces, but never over the caller's own error
        if (!failed && e instanceof WatchLLMValidationError) throw e;
        if (!(e instanceof WatchLLMValidationError)) this.internalError(e);
      }
    };
    let result: R;
    try {
      result = useRun(inner, fn);
    } catch (error) {
      finish(undefined, error ?? new Error(String(error)));
      throw error;
    }
    if (isPromise(result)) {
      return Promise.resolve(result).then(
        (value) => {
          finish(value);
          return value;
        },
        (error: unknown) => {
          finish(undefined, error ?? new Error(String(error)));
          throw error;
        },
      ) as R;
    }
    finish(result);
    return result;
  }

  /** An error event for `error`, once per error object however many observed calls it
   * passes through on its way up. */
  private recordError(error: unknown, context: RunContext): void {
    if (error !== null && typeof error === "object") {
      if (this.recordedErrors.has(error)) return;
      this.recordedErrors.add(error);
    }
    const parts = errorParts(error);
    this.logWith(context, "error", {
      error_type: truncate(parts.type, 256),
      error_message: truncate(parts.message, MAX_ERROR_CHARS),
      ...(parts.stack ? { stack_trace: parts.stack } : {}),
    });
  }

  // -- delivery -------------------------------------------------------------------------

  /** Wait until everything logged so far is sent or dropped; false when `timeoutMs` passes
   * first. Never rejects. */
  async flush(timeoutMs = 10_000): Promise<boolean> {
    return this.delivery ? this.delivery.flush(timeoutMs) : true;
  }

  /** Send what is queued (within `timeoutMs`), then stop: later events are dropped as
   * `shutdown`. Never rejects; true when nothing was left behind. */
  async shutdown(timeoutMs = 10_000): Promise<boolean> {
    if (this.onBeforeExit) process.removeListener("beforeExit", this.onBeforeExit);
    this.shutDown = true;
    return this.delivery ? this.delivery.close(timeoutMs) : true;
  }

  /** What was sent and what was dropped, by reason. */
  stats(): Stats {
    const empty: DeliveryStats = {
      sent: 0,
      batches: 0,
      retries: 0,
      queued: 0,
      queuedBytes: 0,
      dropped: noDrops(),
      droppedTotal: 0,
      lastError: undefined,
    };
    return {
      enabled: this.enabled,
      logged: this.logged,
      sampledOut: this.sampledOut,
      ...(this.delivery?.stats() ?? empty),
    };
  }

  // -- building events ------------------------------------------------------------------

  private log(type: EventType, fields: object): string {
    const context = currentRun();
    return this.logWith(context, type, fields as Record<string, unknown>);
  }

  /** Build, check and queue one event for `context` (the current run, or a new one). Used by
   * the integrations, which log after an await with the context of the call's start. */
  logWith(
    context: RunContext | undefined,
    type: EventType,
    fields: Record<string, unknown>,
  ): string {
    let eventId = typeof fields.event_id === "string" ? fields.event_id : newId();
    try {
      if (!this.enabled || this.delivery === undefined) return eventId;
      this.logged += 1;
      let event: Record<string, unknown> = {
        event_id: eventId,
        event_type: type,
        run_id: context?.runId ?? newId(),
        timestamp: new Date().toISOString(),
        ...(context?.parentEventId ? { parent_event_id: context.parentEventId } : {}),
        ...(context?.userId ? { user_id: context.userId } : {}),
        ...(context?.sessionId ? { session_id: context.sessionId } : {}),
        ...(context?.tags?.length ? { tags: [...context.tags] } : {}),
        ...(context?.metadata ? { metadata: { ...context.metadata } } : {}),
        ...(this.options.env ? { env: this.options.env } : {}),
        ...(this.options.release ? { release: this.options.release } : {}),
        client: this.client,
      };
      for (const [key, value] of Object.entries(fields)) {
        if (value === undefined) continue;
        if (key === "metadata" && event.metadata && value && typeof value === "object") {
          event.metadata = { ...(event.metadata as object), ...(value as object) };
        } else if (key === "tags" && Array.isArray(value) && Array.isArray(event.tags)) {
          event.tags = [...new Set([...(event.tags as string[]), ...(value as string[])])];
        } else {
          event[key] = value;
        }
      }
      eventId = event.event_id as string;
      if (this.shutDown) {
        this.delivery.drop("shutdown", 1);
        return eventId;
      }
      const rate = this.options.sampleRate ?? 1;
      if (rate < 1 && runFraction(event.run_id as string) >= rate) {
        this.sampledOut += 1;
        return eventId;
      }
      if (this.options.mask) {
        let masked: Event | null | undefined;
        try {
          masked = this.options.mask({ ...event } as unknown as Event);
        } catch (error) {
          // Never sent unmasked.
          this.delivery.drop("mask_error", 1, `the mask callback threw ${String(error)}`);
          this.warn(`watchllm: the mask callback threw ${String(error)}; event dropped`);
          return eventId;
        }
        if (masked === null || masked === undefined) return eventId; // by design, not a loss
        event = masked as unknown as Record<string, unknown>;
      }
      if (this.options.captureContent === false) event = withoutContent(event);
      const problem = checkEvent(type, event);
      if (problem) {
        if (this.options.strict) {
          const Kind = problem.kind === "range" ? WatchLLMRangeError : WatchLLMValidationError;
          throw new Kind(describe(type, problem), problem.field);
        }
        this.delivery.drop("invalid", 1, describe(type, problem));
        if (!this.warnedInvalid) {
          this.warnedInvalid = true;
          this.warn(`watchllm: an event was dropped: ${describe(type, problem)} (set strict to throw)`);
        }
        return eventId;
      }
      const json = JSON.stringify(event);
      this.delivery.enqueue(json);
    } catch (error) {
      if (error instanceof WatchLLMValidationError) throw error;
      if (this.options.strict) throw error;
      this.delivery?.drop("sdk_error", 1);
      this.internalError(error);
    }
    return eventId;
  }

  private internalError(error: unknown): void {
    this.warn(`watchllm: internal error, event dropped: ${String(error)}`);
  }

  private warn(message: string): void {
    try {
      this.logger.warn(message);
    } catch {
      // a logger that throws must not reach the host
    }
  }
}

function withoutContent(event: Record<string, unknown>): Record<string, unknown> {
  const out = { ...event };
  for (const field of CONTENT_FIELDS) delete out[field];
  if (Array.isArray(out.tool_calls)) {
    out.tool_calls = (out.tool_calls as Array<Record<string, unknown>>).map(
      ({ tool_input: _i, tool_output: _o, ...rest }) => rest,
    );
  }
  return out;
}

/** Throws a TypeError unless `url` is an http:// or https:// URL with a host. */
export function checkBaseUrl(url: string, name = "baseUrl"): void {
  let parsed: URL | undefined;
  try {
    parsed = new URL(url);
  } catch {
    parsed = undefined;
  }
  if (parsed && (parsed.protocol === "http:" || parsed.protocol === "https:") && parsed.hostname) {
    return;
  }
  const hint = /^[a-z][a-z0-9+.-]*:\/\//i.test(url) ? "" : ` (no scheme; did you mean 'http://${url}'?)`;
  throw new TypeError(
    `${name}: must be an http:// or https:// URL with a host, such as http://127.0.0.1:8787, not '${url}'${hint}`,
  );
}
