// watchllm: the Node/TypeScript SDK of WatchLLM (docs: README.md here, docs/SDK.md).
export {
  WatchLLM,
  WatchLLMRangeError,
  WatchLLMValidationError,
  type AnyEventInput,
  type EventInput,
  type ObserveOptions,
  type RunOptions,
  type Stats,
  type WatchLLMOptions,
} from "./client.js";
export { currentRun, newId, useRun, type RunContext } from "./context.js";
export { DROP_REASONS, parseRetryAfter, type DropReason, type Logger } from "./transport.js";
export { SDK_VERSION } from "./version.js";
export * from "./contract.js";
