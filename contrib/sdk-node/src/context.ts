// The run context: which run new events belong to and which event they nest under. The
// counterpart of watchllm_ext/sdk/context.py; AsyncLocalStorage plays the part of Python's
// context variables, so nesting follows awaits, promise chains, timers and event emitters.
import { AsyncLocalStorage } from "node:async_hooks";
import { randomUUID } from "node:crypto";

/** Where new events belong: their run, the event they nest under, and who they are for. */
export interface RunContext {
  readonly runId: string;
  readonly parentEventId?: string;
  readonly userId?: string;
  readonly sessionId?: string;
  readonly tags?: readonly string[];
  readonly metadata?: Readonly<Record<string, unknown>>;
  /** Shared by every context of one run: numbers the run's agent steps in start order. */
  readonly steps: { next: number };
}

const storage = new AsyncLocalStorage<RunContext>();

/** The run the calling code is part of, or undefined outside any run. */
export function currentRun(): RunContext | undefined {
  return storage.getStore();
}

/** Run `fn` with `context` as the current run (restored after, even when it throws). */
export function useRun<T>(context: RunContext, fn: () => T): T {
  return storage.run(context, fn);
}

/** A fresh id for a run or an event: 32 hex digits, valid in every id field (as Python's). */
export function newId(): string {
  return randomUUID().replaceAll("-", "");
}
