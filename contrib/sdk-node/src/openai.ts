// The `openai` npm client, observed: `wrapOpenAI(new OpenAI(), watchllm)` returns a client that
// logs one prompt_call per `chat.completions.create` and `responses.create` (streaming
// included: tokens, time to first token and latency are recorded when the stream ends).
// It wraps the object handed in (a Proxy); nothing global is patched, and the package is not
// imported: the SDK has no runtime dependency on it.
import type { ChatMessage, PromptCallEvent, ToolCallItem } from "./contract.js";
import type { WatchLLM } from "./client.js";
import { currentRun, type RunContext } from "./context.js";

export interface WrapOpenAIOptions {
  /** The `provider` of the events (default "openai"; e.g. "azure" for an Azure client). */
  provider?: string;
  /** Tags and metadata added to every event of this client. */
  tags?: string[];
  metadata?: Record<string, unknown>;
}

type Fields = Omit<PromptCallEvent, "event_type" | "run_id">;
type Create = (...args: unknown[]) => unknown;
type AnyRecord = Record<string, any>; // eslint-disable-line @typescript-eslint/no-explicit-any

/** `client` with its chat completions and responses observed. Every other property is the
 * client's own. */
export function wrapOpenAI<T extends object>(
  client: T,
  watchllm: WatchLLM,
  options: WrapOpenAIOptions = {},
): T {
  const observer = new Observer(watchllm, options);
  const wrapCreate = (owner: AnyRecord, kind: Kind): AnyRecord =>
    proxy(owner, {
      create: (create: Create) =>
        function (this: unknown, ...args: unknown[]) {
          return observer.call(kind, create.bind(owner), args);
        },
    });
  return proxy(client as AnyRecord, {
    chat: (chat: AnyRecord) =>
      proxy(chat, { completions: (completions: AnyRecord) => wrapCreate(completions, "chat") }),
    responses: (responses: AnyRecord) => wrapCreate(responses, "responses"),
  }) as T;
}

/** A Proxy of `target` whose named properties are replaced by `wrap(value)`, made once. */
function proxy(target: AnyRecord, wrappers: Record<string, (value: any) => unknown>): AnyRecord {
  const made = new Map<string, unknown>();
  return new Proxy(target, {
    get(obj, prop, receiver) {
      const value = Reflect.get(obj, prop, receiver);
      if (typeof prop !== "string" || !(prop in wrappers) || value == null) {
        // Methods run on the real object: the client's own #private fields are not on a Proxy.
        return typeof value === "function" ? value.bind(obj) : value;
      }
      if (!made.has(prop)) made.set(prop, wrappers[prop](value));
      return made.get(prop);
    },
  });
}

type Kind = "chat" | "responses";

class Observer {
  constructor(
    private readonly watchllm: WatchLLM,
    private readonly options: WrapOpenAIOptions,
  ) {}

  call(kind: Kind, create: Create, args: unknown[]): unknown {
    const params = (args[0] ?? {}) as AnyRecord;
    const context = currentRun(); // the call's run: the event is logged after awaits
    const started = new Date();
    const t0 = performance.now();
    let promise: unknown;
    try {
      promise = create(...args);
    } catch (error) {
      this.failed(kind, params, context, started, t0, error);
      throw error;
    }
    if (!isThenable(promise)) return promise;
    if (params.stream === true) {
      // The stream object is handed over wrapped: its events are read as the caller reads.
      const withResponse = (promise as AnyRecord).withResponse;
      const settled =
        typeof withResponse === "function"
          ? (withResponse.call(promise) as Promise<AnyRecord>).then((r) => [r.data, r.request_id])
          : (promise as Promise<unknown>).then((data) => [data, undefined]);
      return settled.then(
        ([stream, requestId]) =>
          this.wrapStream(kind, params, context, started, t0, stream as AnyRecord, requestId),
        (error: unknown) => {
          this.failed(kind, params, context, started, t0, error);
          throw error;
        },
      );
    }
    // The caller gets the client's own promise (withResponse() and all); we only watch it.
    (promise as Promise<AnyRecord>).then(
      (result) => this.safely(() => this.done(kind, params, context, started, t0, result)),
      (error: unknown) => this.failed(kind, params, context, started, t0, error),
    );
    return promise;
  }

  private done(
    kind: Kind,
    params: AnyRecord,
    context: RunContext | undefined,
    started: Date,
    t0: number,
    result: AnyRecord,
  ): void {
    const fields = kind === "chat" ? chatResult(result) : responsesResult(result);
    this.log(context, {
      ...this.base(kind, params, started),
      status: "success",
      ...fields,
      latency_ms: performance.now() - t0,
      response_metadata: {
        ...(fields.response_metadata ?? {}),
        ...(result._request_id ? { request_id: result._request_id } : {}),
      },
    });
  }

  private failed(
    kind: Kind,
    params: AnyRecord,
    context: RunContext | undefined,
    started: Date,
    t0: number,
    error: unknown,
    partial: Fields = {},
  ): void {
    this.safely(() => {
      const e = (error ?? {}) as AnyRecord;
      this.log(context, {
        ...this.base(kind, params, started),
        ...partial,
        status: e.name === "APIConnectionTimeoutError" ? "timeout" : "error",
        error_message: String(e.message ?? error).slice(0, 10_000),
        latency_ms: performance.now() - t0,
        response_metadata: {
          ...(partial.response_metadata ?? {}),
          ...(typeof e.status === "number" ? { http_status: e.status } : {}),
          ...(e.requestID ? { request_id: e.requestID } : {}),
          ...(e.name ? { error_type: e.name } : {}),
        },
      });
    });
  }

  private wrapStream(
    kind: Kind,
    params: AnyRecord,
    context: RunContext | undefined,
    started: Date,
    t0: number,
    stream: AnyRecord,
    requestId: unknown,
  ): AnyRecord {
    const acc = kind === "chat" ? new ChatAccumulator() : new ResponsesAccumulator();
    let firstChunkMs: number | undefined;
    let logged = false;
    const finish = (error?: unknown): void => {
      if (logged) return;
      logged = true;
      this.safely(() => {
        const fields = acc.fields();
        fields.response_metadata = {
          ...(fields.response_metadata ?? {}),
          stream: true,
          ...(firstChunkMs !== undefined ? { time_to_first_token_ms: firstChunkMs } : {}),
          ...(requestId ? { request_id: requestId } : {}),
        };
        if (error !== undefined) {
          this.failed(kind, params, context, started, t0, error, fields);
          return;
        }
        this.log(context, {
          ...this.base(kind, params, started),
          status: "success",
          ...fields,
          latency_ms: performance.now() - t0,
        });
      });
    };
    const iterate = (): AsyncIterator<unknown> => {
      const inner = (Reflect.get(stream, Symbol.asyncIterator) as () => AsyncIterator<unknown>).call(
        stream,
      );
      return {
        async next(...a: [] | [unknown]) {
          let step: IteratorResult<unknown>;
          try {
            step = await inner.next(...a);
          } catch (error) {
            finish(error);
            throw error;
          }
          if (step.done) {
            finish();
          } else {
            if (firstChunkMs === undefined) firstChunkMs = performance.now() - t0;
            try {
              acc.add(step.value as AnyRecord);
            } catch {
              // an unexpected chunk shape must not break the caller's loop
            }
          }
          return step;
        },
        async return(value?: unknown) {
          finish(); // the caller stopped reading (break): what was read is recorded
          return inner.return ? inner.return(value) : { done: true, value: undefined };
        },
        async throw(error?: unknown) {
          finish(error);
          if (inner.throw) return inner.throw(error);
          throw error;
        },
      };
    };
    return new Proxy(stream, {
      get(obj, prop, receiver) {
        if (prop === Symbol.asyncIterator) return iterate;
        return Reflect.get(obj, prop, receiver);
      },
    });
  }

  private base(kind: Kind, params: AnyRecord, started: Date): Fields {
    return {
      timestamp: started.toISOString(),
      provider: this.options.provider ?? "openai",
      ...(typeof params.model === "string" && params.model ? { model: params.model } : {}),
      prompt: kind === "chat" ? chatPrompt(params) : responsesPrompt(params),
      ...(this.options.tags ? { tags: this.options.tags } : {}),
      ...(this.options.metadata ? { metadata: this.options.metadata } : {}),
    };
  }

  private log(context: RunContext | undefined, fields: Fields): void {
    this.watchllm.logWith(context, "prompt_call", dropUndefined(fields));
  }

  private safely(fn: () => void): void {
    try {
      fn();
    } catch {
      // Recording must never reach the caller; the client counts its own drops.
    }
  }
}

function isThenable(value: unknown): boolean {
  return typeof (value as { then?: unknown } | null)?.then === "function";
}

function dropUndefined(fields: Fields): Record<string, unknown> {
  return Object.fromEntries(Object.entries(fields).filter(([, v]) => v !== undefined));
}

function text(value: unknown): string | undefined {
  if (typeof value === "string") return value;
  if (value === null || value === undefined) return undefined;
  return JSON.stringify(value);
}

function parseArguments(value: unknown): unknown {
  if (typeof value !== "string") return value;
  try {
    return JSON.parse(value);
  } catch {
    return value; // a model's half-written arguments are kept as they came
  }
}

function tokens(value: unknown): number | undefined {
  return typeof value === "number" && Number.isInteger(value) && value >= 0 ? value : undefined;
}

// -- chat completions ---------------------------------------------------------------------

function message(role: unknown, content: unknown, extra: AnyRecord = {}): ChatMessage {
  const m: ChatMessage = { role: typeof role === "string" && role ? role : "user" };
  if (typeof content === "string") m.content = content;
  else if (Array.isArray(content)) {
    m.content = content.map((part) =>
      part !== null && typeof part === "object" ? part : { type: "text", text: String(part) },
    );
  }
  if (typeof extra.name === "string") m.name = extra.name;
  if (typeof extra.tool_call_id === "string") m.tool_call_id = extra.tool_call_id;
  return m;
}

function chatPrompt(params: AnyRecord): ChatMessage[] | undefined {
  if (!Array.isArray(params.messages)) return undefined;
  return params.messages.map((m: AnyRecord) => message(m.role, m.content, m));
}

function chatToolCalls(calls: unknown): ToolCallItem[] | undefined {
  if (!Array.isArray(calls) || calls.length === 0) return undefined;
  return calls.map((c: AnyRecord) => ({
    ...(c.id ? { id: String(c.id) } : {}),
    tool_name: String(c.function?.name ?? c.custom?.name ?? c.type ?? "tool"),
    tool_input: parseArguments(c.function?.arguments ?? c.custom?.input),
  }));
}

function chatResult(result: AnyRecord): Fields {
  const choice = result.choices?.[0] ?? {};
  return {
    ...(result.model ? { model: result.model } : {}),
    response: text(choice.message?.content ?? choice.message?.refusal),
    tokens_input: tokens(result.usage?.prompt_tokens),
    tokens_output: tokens(result.usage?.completion_tokens),
    tool_calls: chatToolCalls(choice.message?.tool_calls),
    response_metadata: {
      ...(result.id ? { id: result.id } : {}),
      ...(choice.finish_reason ? { finish_reason: choice.finish_reason } : {}),
    },
  };
}

class ChatAccumulator {
  private model: string | undefined;
  private id: string | undefined;
  private content = "";
  private finishReason: string | undefined;
  private usage: AnyRecord | undefined;
  private readonly calls = new Map<number, { id?: string; name: string; args: string }>();

  add(chunk: AnyRecord): void {
    this.model = chunk.model ?? this.model;
    this.id = chunk.id ?? this.id;
    if (chunk.usage) this.usage = chunk.usage;
    const choice = chunk.choices?.[0];
    if (!choice) return;
    if (typeof choice.delta?.content === "string") this.content += choice.delta.content;
    if (choice.finish_reason) this.finishReason = choice.finish_reason;
    for (const call of choice.delta?.tool_calls ?? []) {
      const index = typeof call.index === "number" ? call.index : this.calls.size;
      const entry = this.calls.get(index) ?? { name: "", args: "" };
      if (call.id) entry.id = call.id;
      if (call.function?.name) entry.name += call.function.name;
      if (call.function?.arguments) entry.args += call.function.arguments;
      this.calls.set(index, entry);
    }
  }

  fields(): Fields {
    const calls = [...this.calls.values()].map((c) => ({
      ...(c.id ? { id: c.id } : {}),
      tool_name: c.name || "tool",
      tool_input: parseArguments(c.args),
    }));
    return {
      ...(this.model ? { model: this.model } : {}),
      response: this.content,
      tokens_input: tokens(this.usage?.prompt_tokens),
      tokens_output: tokens(this.usage?.completion_tokens),
      ...(calls.length ? { tool_calls: calls } : {}),
      response_metadata: {
        ...(this.id ? { id: this.id } : {}),
        ...(this.finishReason ? { finish_reason: this.finishReason } : {}),
      },
    };
  }
}

// -- responses ----------------------------------------------------------------------------

function responsesPrompt(params: AnyRecord): string | ChatMessage[] | undefined {
  const system: ChatMessage[] =
    typeof params.instructions === "string"
      ? [{ role: "system", content: params.instructions }]
      : [];
  if (typeof params.input === "string") {
    return system.length ? [...system, { role: "user", content: params.input }] : params.input;
  }
  if (!Array.isArray(params.input)) return system.length ? system : undefined;
  const messages = params.input.map((item: AnyRecord): ChatMessage => {
    if (item.type === "function_call_output") {
      return { role: "tool", content: text(item.output) ?? "", tool_call_id: item.call_id };
    }
    if (item.type === "function_call") {
      return { role: "assistant", content: [{ ...item }] };
    }
    return message(item.role, item.content);
  });
  return [...system, ...messages];
}

function responsesResult(result: AnyRecord): Fields {
  const output: AnyRecord[] = Array.isArray(result.output) ? result.output : [];
  const outputText =
    typeof result.output_text === "string"
      ? result.output_text
      : output
          .filter((item) => item.type === "message")
          .flatMap((item) => item.content ?? [])
          .filter((part: AnyRecord) => part.type === "output_text")
          .map((part: AnyRecord) => part.text)
          .join("");
  const calls = output
    .filter((item) => item.type === "function_call")
    .map((item) => ({
      ...(item.call_id ? { id: String(item.call_id) } : {}),
      tool_name: String(item.name ?? "tool"),
      tool_input: parseArguments(item.arguments),
    }));
  const failed = result.status === "failed" || result.status === "incomplete";
  return {
    ...(result.model ? { model: result.model } : {}),
    response: outputText,
    tokens_input: tokens(result.usage?.input_tokens),
    tokens_output: tokens(result.usage?.output_tokens),
    ...(calls.length ? { tool_calls: calls } : {}),
    ...(failed ? { status: "error" as const } : {}),
    ...(result.error?.message ? { error_message: String(result.error.message) } : {}),
    response_metadata: {
      ...(result.id ? { id: result.id } : {}),
      ...(result.status ? { response_status: result.status } : {}),
    },
  };
}

class ResponsesAccumulator {
  private text = "";
  private final: AnyRecord | undefined;
  private model: string | undefined;

  add(event: AnyRecord): void {
    if (event.response?.model) this.model = event.response.model;
    if (event.type === "response.output_text.delta" && typeof event.delta === "string") {
      this.text += event.delta;
    }
    if (
      event.type === "response.completed" ||
      event.type === "response.failed" ||
      event.type === "response.incomplete"
    ) {
      this.final = event.response;
    }
  }

  fields(): Fields {
    if (this.final) {
      const fields = responsesResult(this.final);
      if (!fields.response) fields.response = this.text;
      return fields;
    }
    return { ...(this.model ? { model: this.model } : {}), response: this.text };
  }
}
