"""The WatchLLM client: send events to a WatchLLM server over HTTP.

Imports only pydantic and httpx, never the server's dependencies (chDB, pandas, pyarrow),
so an application that only sends events stays light.
"""

from .client import SendResult, WatchLLMClient, WatchLLMError

__all__ = ["SendResult", "WatchLLMClient", "WatchLLMError"]
