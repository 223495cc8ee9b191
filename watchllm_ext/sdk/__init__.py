"""The WatchLLM Python SDK: log events from your app; a background worker delivers them.

    from watchllm_ext.sdk import WatchLLM, observe
    client = WatchLLM()            # WATCHLLM_API_KEY, WATCHLLM_BASE_URL
    with client.run(name="answer"):
        client.log_prompt_call(model="gpt-4o", tokens_input=10, tokens_output=20)

Imports only pydantic and httpx, never the server's dependencies (chDB, pandas, pyarrow),
so an application that only sends events stays light. docs/SDK.md has the whole guide.
`WatchLLMClient` is the older one-batch-per-call synchronous client, kept as it was.
"""

from .client import SendResult, WatchLLMClient, WatchLLMError
from .context import RunContext, current_run, new_id, use_run
from .core import DROP_REASONS, AsyncWatchLLM, WatchLLM, get_client
from .observe import observe

__all__ = [
    "DROP_REASONS",
    "AsyncWatchLLM",
    "RunContext",
    "SendResult",
    "WatchLLM",
    "WatchLLMClient",
    "WatchLLMError",
    "current_run",
    "get_client",
    "new_id",
    "observe",
    "use_run",
]
