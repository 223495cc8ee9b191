"""Running the app: what `watchllm serve` gives uvicorn (`protocol.py`: its options and HTTP
protocol), the process tuning it applies (`tuning.py`), and the lifespan a host app runs
WatchLLM's store and writer with (`hosting.py`)."""
