"""Running WatchLLM itself: its own metrics (`metrics`) and error reporting to Sentry
(`sentry`). docs/OPERATIONS.md is the operator's guide."""
