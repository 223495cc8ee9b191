// Events the contract refuses, one mistake each: contract.test.mjs checks that the SDK refuses
// them, e2e.test.mjs that the server does too (so the SDK is not stricter than the server).

/** [what, log call, the field at fault, the error's kind]: each refused by the server too. */
export const REFUSED = [
  ["a negative count", (wl) => wl.logPromptCall({ tokens_input: -1 }), "tokens_input", RangeError],
  ["a fractional count", (wl) => wl.logPromptCall({ tokens_input: 1.5 }), "tokens_input", TypeError],
  ["a count as text", (wl) => wl.logPromptCall({ tokens_output: "10" }), "tokens_output", TypeError],
  ["a count over its maximum", (wl) => wl.logPromptCall({ tokens_input: 2 ** 32 }), "tokens_input", RangeError],
  ["an unknown status", (wl) => wl.logToolCall({ tool_name: "t", status: "weird" }), "status", RangeError],
  ["a null status", (wl) => wl.logToolCall({ tool_name: "t", status: null }), "status", TypeError],
  ["an unknown env", (wl) => wl.logPromptCall({ env: "prod" }), "env", RangeError],
  ["a negative latency", (wl) => wl.logAgentStep({ step_number: 1, latency_ms: -5 }), "latency_ms", RangeError],
  ["a confidence over 1", (wl) => wl.logHallucinationDetected({ detection_method: "j", confidence: 1.5, claim: "c" }), "confidence", RangeError],
  ["an empty model", (wl) => wl.logPromptCall({ model: "" }), "model", RangeError],
  ["a model too long", (wl) => wl.logPromptCall({ model: "m".repeat(257) }), "model", RangeError],
  ["too many tags", (wl) => wl.logPromptCall({ tags: Array.from({ length: 65 }, (_, i) => `t${i}`) }), "tags", RangeError],
  ["an empty tag", (wl) => wl.logPromptCall({ tags: ["ok", ""] }), "tags[1]", RangeError],
  ["an id with a space", (wl) => wl.logPromptCall({ run_id: "run 1" }), "run_id", RangeError],
  ["a timestamp without a zone", (wl) => wl.logPromptCall({ timestamp: "2026-01-01T12:00:00" }), "timestamp", RangeError],
  ["a message without a role", (wl) => wl.logPromptCall({ prompt: [{ content: "hi" }] }), "prompt[0].role", TypeError],
  ["a message with an unknown field", (wl) => wl.logPromptCall({ prompt: [{ role: "user", text: "hi" }] }), "prompt[0].text", TypeError],
  ["a tool call's negative latency", (wl) => wl.logPromptCall({ tool_calls: [{ tool_name: "t" }, { tool_name: "u", latency_ms: -1 }] }), "tool_calls[1].latency_ms", RangeError],
  ["metadata that is a list", (wl) => wl.logPromptCall({ metadata: ["a"] }), "metadata", TypeError],
  ["an unknown field", (wl) => wl.logToolCall({ tool_name: "t", toolName: "typo" }), "toolName", TypeError],
  ["a missing required field", (wl) => wl.logError({ error_type: "E" }), "error_message", TypeError],
];

/** One event of each type, using every field in a valid form (limits included): the SDK must
 * send them, strict or not, and the server takes them. */
export function VALID(wl) {
  const emoji = "😀".repeat(256); // 512 UTF-16 units, 256 characters: the limit is in characters
  wl.logPromptCall({
    model: emoji,
    provider: "openai",
    prompt: [
      { role: "system", content: "be brief" },
      { role: "user", content: [{ type: "text", text: "hi" }], name: "u1", tool_call_id: null },
    ],
    response: "hello",
    tokens_input: 0,
    tokens_output: 4294967295,
    cost_estimate_usd: 0.5,
    latency_ms: 12.5,
    status: "warning",
    env: "staging",
    release: "r1",
    tags: ["a", "b"],
    metadata: { nested: { deep: [1, 2, null] } },
    response_metadata: {},
    timestamp: "2026-01-01 12:00:00.123456789+02:00",
    event_id: `evt:${Math.random().toString(36).slice(2)}.a_b-c`,
    parent_event_id: null,
    tool_calls: [{ id: "c1", tool_name: "search", tool_input: { q: 1 }, status: "success", latency_ms: 0 }],
    error_message: null,
  });
  wl.logToolCall({ tool_name: "t", timestamp: new Date(), tool_output: [1, "two"], latency_ms: 3 });
  wl.logAgentStep({ step_number: 0, step_name: "s", reasoning: "r", action: "a", observation: "o" });
  wl.logError({ error_type: "E", error_message: "m", stack_trace: "at x" });
  wl.logAssertionFailed({ assertion_name: "a", expected: { x: 1 }, actual: null, severity: "critical" });
  wl.logHallucinationDetected({ detection_method: "judge", confidence: 1, claim: "c", evidence: "e" });
  wl.logCostThresholdExceeded({ threshold_usd: 1, actual_usd: 2.5, window: "1d" });
  wl.logPerformanceAlert({ metric: "p95", threshold: -1e15, actual: 1e15, window: "1h" });
}
