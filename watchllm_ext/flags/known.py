"""The flag names something in WatchLLM asks for. A flag set under any other name changes
nothing, so the built-in provider warns about it: `{"gaurdian": true}` would otherwise leave
Guardian off without a word.

WatchLLM's own flags are listed here; a plugin (or an application) that asks for a flag of
its own declares it once, at import: `FLAG = declare_flag("my_plugin_beta", "what it does")`.
"""

from __future__ import annotations

import difflib
import threading
from collections.abc import Iterable

GUARDIAN = "guardian"

# Names are code, not state: one table for the process, like the hook specs.
_KNOWN: dict[str, str] = {
    GUARDIAN: "Guardian mode: the guardian_rules are checked for the project",
}
_LOCK = threading.Lock()
# Names listed in one warning at most (the rest are counted).
MAX_LISTED = 20


def declare_flag(name: str, description: str = "") -> str:
    """Make `name` a known flag (declaring it again is harmless); returns `name`."""
    with _LOCK:
        if description or name not in _KNOWN:
            _KNOWN[name] = description
    return name


def known_flags() -> dict[str, str]:
    """The known flag names and what each one does."""
    with _LOCK:
        return dict(_KNOWN)


def unknown_flags_warning(names: Iterable[str], source: str) -> str | None:
    """The warning for the names in `source` that nothing asks for (each with the known name
    it resembles, if one does), or None when every name is known."""
    known = known_flags()
    unknown = sorted({name for name in names if name not in known})
    if not unknown:
        return None
    listed = []
    for name in unknown[:MAX_LISTED]:
        close = difflib.get_close_matches(name, known, n=1)
        # repr: a name read from a file is shown as it is, on one line.
        listed.append(f"{name!r} (did you mean {close[0]!r}?)" if close else repr(name))
    more = len(unknown) - MAX_LISTED
    if more > 0:
        listed.append(f"and {more} more")
    return (
        f"{source}: unknown flag{'s' if len(unknown) > 1 else ''} {', '.join(listed)}: nothing"
        f" in WatchLLM asks for {'them' if len(unknown) > 1 else 'it'}, so setting"
        f" {'them' if len(unknown) > 1 else 'it'} changes nothing (known flags:"
        f" {', '.join(sorted(known))}; a plugin makes its own flag known with"
        " watchllm_ext.flags.declare_flag)"
    )
