// Compile-time checks (`npm run typecheck`, part of `npm test`): the generated contract types
// accept what the server accepts and refuse mistakes. Each @ts-expect-error fails the build
// when its line starts to compile, so a types regression cannot pass unnoticed.
import OpenAI from "openai";

import { WatchLLM, type Event, type PromptCallEvent } from "../src/index.js";
import { wrapOpenAI } from "../src/openai.js";

const wl = new WatchLLM({ enabled: false });

wl.logPromptCall({ model: "gpt-4o", tokens_input: 1, prompt: [{ role: "user", content: "hi" }] });
wl.logToolCall({ tool_name: "search", tool_input: { q: 1 }, status: "error" });
wl.logAgentStep({ step_number: 3, reasoning: "because" });
wl.logError({ error_type: "E", error_message: "m" });
wl.logAssertionFailed({ assertion_name: "a", expected: 1, actual: 2, severity: "high" });
wl.logHallucinationDetected({ detection_method: "judge", confidence: 0.5, claim: "c" });
wl.logCostThresholdExceeded({ threshold_usd: 1, actual_usd: 2, window: "1d" });
wl.logPerformanceAlert({ metric: "p95", threshold: 1, actual: 2, window: "1h" });
wl.logEvent({ event_type: "tool_call", tool_name: "x" });

// @ts-expect-error: tool_name is required
wl.logToolCall({});
// @ts-expect-error: no such field (a typo)
wl.logPromptCall({ modle: "gpt-4o" });
// @ts-expect-error: status is one of five words
wl.logToolCall({ tool_name: "t", status: "ok" });
// @ts-expect-error: counts are numbers
wl.logPromptCall({ tokens_input: "10" });
// @ts-expect-error: env is production, staging or development
wl.logError({ error_type: "E", error_message: "m", env: "prod" });
// @ts-expect-error: the server sets cost_source
wl.logPromptCall({ cost_source: "client" });

const event: Event = { event_type: "agent_step", run_id: "r", step_number: 1 };
const narrowed: PromptCallEvent["event_type"] = "prompt_call";

// observe keeps the function's type: sync stays sync, async stays async.
const add: (a: number, b: number) => number = wl.observe((a: number, b: number) => a + b);
const later: (s: string) => Promise<number> = wl.observe(async (s: string) => s.length);
const fromRun: Promise<string> = wl.run("r", async (run) => run.runId);

// The wrapper returns the client's own type.
const client: OpenAI = wrapOpenAI(new OpenAI({ apiKey: "k" }), wl);

export { add, client, event, fromRun, later, narrowed };
