"""The plugin manager: hook specs, built-in plugins, entry points, settings, explicit ones.

Built-in behaviour (key authentication, cost estimates, the store sink) is registered as
plugins through the same hooks a third party uses. There is no global manager: each app
builds its own with `get_plugin_manager`, so tests never share state.
"""

from __future__ import annotations

import difflib
import importlib
import logging
from collections.abc import Iterable, Iterator
from importlib import metadata
from typing import Any

import pluggy
from starlette.exceptions import HTTPException

from . import hookspecs
from .errors import Problem
from .settings import Settings

log = logging.getLogger("watchllm.plugins")

PROJECT = "watchllm"
# The modules of the plugins shipped with WatchLLM, which read events by attribute (the
# structs or models alike).
BUILTIN_PREFIX = "watchllm_ext."
ENTRY_POINT_GROUP = "watchllm"
DEFAULT_PLUGINS = (
    "watchllm_ext.builtins.key_auth",
    "watchllm_ext.builtins.cost",
    "watchllm_ext.builtins.store_sink",
    "watchllm_ext.builtins.rollup",
    "watchllm_ext.quotas.plugin",
    "watchllm_ext.dashboard",
    "watchllm_ext.flags.builtin",
    "watchllm_ext.guardian.plugin",
    "watchllm_ext.notify.webhook",
    "watchllm_ext.notify.slack",
    "watchllm_ext.observability.otel_metrics",
    "watchllm_ext.otel.receiver",
    "watchllm_ext.otel.export",
)


class PluginError(Exception):
    """A plugin could not be loaded; the message names it."""


# What a hook may raise to answer the request itself, as the app answers it.
CHOSEN_ANSWERS = (Problem, HTTPException)


class PluginFailed(Problem):
    """A plugin's hook raised, or returned what its spec does not allow, while serving a
    request: a 500 that names the plugin and the hook (the traceback goes to the log, not to
    the client, whose data an exception's text may hold)."""

    def __init__(self, hook: str, plugin: str, why: str) -> None:
        super().__init__(
            500,
            "plugin_failed",
            f"plugin {plugin!r} failed in its {hook} hook: {why}; the error is in the server's log",
            hook=hook,
            plugin=plugin,
        )


def plugin_failed(hook: str, impl: pluggy.HookImpl, exc: BaseException) -> PluginFailed:
    """The PluginFailed of `impl` raising `exc`, logged with its traceback (call from the
    `except` block)."""
    log.error("plugin %r failed in its %s hook", impl.plugin_name, hook, exc_info=exc)
    return PluginFailed(hook, impl.plugin_name, f"{type(exc).__name__} raised")


def answered_wrongly(
    hook: pluggy.HookCaller, why: str, impls: list[pluggy.HookImpl] | None = None
) -> PluginFailed:
    """The PluginFailed of an answer the hook's spec does not allow (`why`), logged, naming
    `impls` (by default every implementation: once call_hook has run them all, which one
    answered so is not known)."""
    chosen = hook.get_hookimpls() if impls is None else impls
    names = ", ".join(impl.plugin_name for impl in reversed(chosen))
    log.error("plugin(s) %s in %s: %s", names, hook.name, why)
    return PluginFailed(hook.name, names, why)


def get_plugin_manager(
    settings: Settings, plugins: Iterable[Any] = (), *, entry_points: bool = True
) -> pluggy.PluginManager:
    pm = pluggy.PluginManager(PROJECT)
    pm.add_hookspecs(hookspecs)
    blocked = set(settings.disable_plugins)
    for name in DEFAULT_PLUGINS:
        if name not in blocked and name.rsplit(".", 1)[-1] not in blocked:
            pm.register(_instantiate(importlib.import_module(name), settings), name=name)
    if entry_points:
        _load_entry_points(pm, settings, blocked)
    for dotted in settings.plugins:
        if dotted in blocked:
            continue
        try:
            module = importlib.import_module(dotted)
        except Exception as exc:  # a module that raises as it is imported, not only a typo
            raise PluginError(f"plugin {dotted!r} from settings cannot be imported: {exc}") from exc
        if pm.get_plugin(dotted) is None and not pm.is_registered(module):
            if module in getattr(pm, "watchllm_entry_modules", ()):
                continue  # installed and named in settings too: its entry point loaded it
            try:
                plugin = _instantiate(module, settings)
            except Exception as exc:
                raise PluginError(f"plugin {dotted!r} from settings failed to load: {exc}") from exc
            _register(pm, plugin, dotted, f"plugin {dotted!r} from settings")
    for plugin in plugins:
        if not pm.is_registered(plugin):
            name = _object_name(pm, plugin)
            _register(pm, plugin, name, f"plugin {name!r} (passed to create_app)")
    _warn_of_unknown_disabled(blocked, settings.plugins)
    _warn_of_unmarked_hooks(pm)
    # A misspelled hook name would otherwise be ignored in silence.
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        raise PluginError(str(exc)) from exc
    return pm


def _warn_of_unmarked_hooks(pm: pluggy.PluginManager) -> None:
    """A WARNING for a plugin's function named after a hook but not marked `@hookimpl`:
    pluggy leaves it out, so it would never be called, without a word. Only functions the
    plugin defines itself (a module may import `feature_enabled`, say, to call it)."""
    hooks = {name for name in dir(hookspecs) if hasattr(getattr(hookspecs, name), "watchllm_spec")}
    for name, plugin in pm.list_name_plugin():
        if name.startswith(BUILTIN_PREFIX) or plugin is None:
            continue
        marked = {caller.name for caller in pm.get_hookcallers(plugin) or []}
        is_module = isinstance(plugin, type(importlib))
        for hook in sorted(hooks - marked):
            function = getattr(plugin, hook, None)
            if not callable(function):
                continue
            defined_here = (
                getattr(function, "__module__", None) == plugin.__name__
                if is_module
                else hook in vars(type(plugin)) or hook in vars(plugin)
            )
            if defined_here:
                log.warning(
                    "plugin %r has a %s not marked @hookimpl: it is never called",
                    name,
                    hook,
                )


def _register(pm: pluggy.PluginManager, plugin: Any, name: str, what: str) -> None:
    """pm.register, its refusal (a hook implementation whose arguments its spec does not
    have, say) as a PluginError naming the plugin."""
    try:
        pm.register(plugin, name=name)
    except (pluggy.PluginValidationError, ValueError) as exc:
        why = "; ".join(line.strip() for line in str(exc).splitlines() if line.strip())
        raise PluginError(f"{what} cannot be registered: {why}") from exc


def _object_name(pm: pluggy.PluginManager, plugin: Any) -> str:
    """A name for a plugin object passed to create_app that says what it is (pluggy's own
    is its id(), a number in `/-/plugins` and in errors): module.Class, or the module's name;
    #2, #3... for a second object of one class."""
    if isinstance(plugin, type(importlib)):
        base = plugin.__name__
    elif isinstance(plugin, type):
        base = f"{plugin.__module__}.{plugin.__qualname__}"
    else:
        base = f"{type(plugin).__module__}.{type(plugin).__qualname__}"
    name, n = base, 1
    while pm.has_plugin(name):
        n += 1
        name = f"{base}#{n}"
    return name


_WARNED: set[str] = set()  # once a process: each app builds its own manager


def _warn_of_unknown_disabled(blocked: set[str], named: Iterable[str]) -> None:
    """A WARNING for a disable_plugins name that is no plugin's: a typo would otherwise
    leave the plugin on without a word."""
    known = set(DEFAULT_PLUGINS) | {name.rsplit(".", 1)[-1] for name in DEFAULT_PLUGINS}
    known.update(named)
    # Every installed entry point, loaded or not (entry_points=False skips loading only).
    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
        known.update((ep.name, ep.value))
    for name in sorted(blocked - known - _WARNED):
        _WARNED.add(name)
        close = difflib.get_close_matches(name, sorted(known), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        log.warning("disable_plugins names %r, which is no plugin's name%s", name, hint)


def _instantiate(module: Any, settings: Settings) -> Any:
    """A plugin module may expose `make_plugin(settings)` to get its settings; the object it
    returns is registered instead of the module."""
    factory = getattr(module, "make_plugin", None)
    return factory(settings) if callable(factory) else module


def _load_entry_points(pm: pluggy.PluginManager, settings: Settings, blocked: set[str]) -> None:
    origins: dict[str, tuple[str, str]] = getattr(pm, "watchllm_origins", {})
    # The modules loaded here: one also named in `plugins` is not registered a second time
    # (with make_plugin each load is a new object, so is_registered cannot tell).
    modules: list[Any] = []
    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
        if ep.name in blocked or ep.value in blocked or pm.get_plugin(ep.name) is not None:
            continue
        try:
            loaded = ep.load()
            plugin = _instantiate(loaded, settings)
        except Exception as exc:
            raise PluginError(f"plugin {ep.name!r} ({ep.value}) failed to load: {exc}") from exc
        modules.append(loaded)
        if pm.is_registered(plugin):
            continue
        _register(pm, plugin, ep.name, f"plugin {ep.name!r} ({ep.value})")
        if ep.dist is not None:
            origins[ep.name] = (ep.dist.name, ep.dist.version)
    pm.watchllm_origins = origins  # type: ignore[attr-defined]
    pm.watchllm_entry_modules = modules  # type: ignore[attr-defined]


def call_hook(hook: pluggy.HookCaller, **kwargs: Any) -> Any:
    """`hook(**kwargs)`, for the hooks called on every request: when no implementation is a
    wrapper, the implementations are called here, in pluggy's order (last registered first,
    tryfirst/trylast as sorted), with pluggy's result rules (non-None results; the first one
    for a firstresult hook). pluggy's general machinery costs microseconds a call, more than
    the built-in implementations themselves. Anything else (a wrapper, a missing argument)
    is pluggy's, as is tracing: WatchLLM sets no hook-call monitoring."""
    calls = []
    for impl in reversed(hook.get_hookimpls()):
        if impl.hookwrapper or impl.wrapper:
            return hook(**kwargs)
        try:
            calls.append((impl, [kwargs[name] for name in impl.argnames]))
        except KeyError:
            return hook(**kwargs)  # pluggy's HookCallError names the missing argument
    firstresult = hook.spec is not None and hook.spec.opts.get("firstresult", False)
    results: list[Any] = []
    for impl, args in calls:
        try:
            result = impl.function(*args)
        except CHOSEN_ANSWERS:
            raise  # an answer the plugin chose (a 401 of its own, say)
        except Exception as exc:
            raise plugin_failed(hook.name, impl, exc) from exc
        if result is not None:
            if firstresult:
                return result
            results.append(result)
    return None if firstresult else results


def each_result(hook: pluggy.HookCaller, **kwargs: Any) -> Iterator[tuple[pluggy.HookImpl, Any]]:
    """Each implementation's (impl, result), in call_hook's order, one implementation called
    per step: a caller that stops (at a quota's denial) runs none of the rest. Raises
    PluginFailed as call_hook does."""
    impls = list(reversed(hook.get_hookimpls()))
    if any(impl.hookwrapper or impl.wrapper for impl in impls):
        for result in hook(**kwargs):  # pluggy's machinery calls them all
            yield impls[0], result
        return
    for impl in impls:
        if any(name not in kwargs for name in impl.argnames):
            hook(**kwargs)  # pluggy's HookCallError names the missing argument
        try:
            result = impl.function(*[kwargs[name] for name in impl.argnames])
        except CHOSEN_ANSWERS:
            raise
        except Exception as exc:
            raise plugin_failed(hook.name, impl, exc) from exc
        yield impl, result


def describe_plugins(pm: pluggy.PluginManager) -> list[dict[str, Any]]:
    """Loaded plugins with their hooks and distribution version (for `/-/plugins`)."""
    origins: dict[str, tuple[str, str]] = getattr(pm, "watchllm_origins", {})
    out = []
    for name, plugin in sorted(pm.list_name_plugin(), key=lambda item: item[0]):
        dist = origins.get(name)
        hooks = sorted(caller.name for caller in pm.get_hookcallers(plugin) or [])
        out.append(
            {
                "name": name,
                "hooks": hooks,
                "distribution": dist[0] if dist else None,
                "version": dist[1] if dist else None,
            }
        )
    return out
