"""Finds every provider and sync declared in the package.

A provider module in ``sync_project.providers`` exposes ``PROVIDER``; a sync module in
``sync_project.syncs`` exposes one or more :class:`SyncDefinition` at module level. Adding a module
is all it takes to add a provider or a sync.
"""

from __future__ import annotations

import importlib
import pkgutil
from functools import cache

from sync_project.core.provider import Provider
from sync_project.core.sync import SyncDefinition


def _modules(package_name: str) -> list[object]:
    package = importlib.import_module(package_name)
    return [
        importlib.import_module(f"{package_name}.{info.name}")
        for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda m: m.name)
        if not info.name.startswith("_")
    ]


@cache
def providers() -> dict[str, Provider]:
    found: dict[str, Provider] = {}
    for module in _modules("sync_project.providers"):
        provider = getattr(module, "PROVIDER", None)
        if isinstance(provider, Provider):
            if provider.name in found:
                raise ValueError(f"provider {provider.name!r} declared twice")
            found[provider.name] = provider
    return found


@cache
def syncs() -> tuple[SyncDefinition, ...]:
    found: dict[str, SyncDefinition] = {}
    for module in _modules("sync_project.syncs"):
        for value in vars(module).values():
            if isinstance(value, SyncDefinition):
                if value.key in found and found[value.key] is not value:
                    raise ValueError(f"sync {value.key!r} declared twice")
                found[value.key] = value
    model_keys: dict[str, str] = {}
    for sync in found.values():
        for model in sync.all_models:
            key = sync.model_key(model.name)
            if key in model_keys and model_keys[key] != sync.key:
                raise ValueError(f"records {key!r} declared by both {model_keys[key]} and {sync.key}")
            model_keys[key] = sync.key
    known = providers()
    for sync in found.values():
        if sync.provider not in known:
            raise ValueError(f"sync {sync.key} names unknown provider {sync.provider!r}")
    return tuple(sorted(found.values(), key=lambda s: s.key))


def get_sync(key: str) -> SyncDefinition:
    for sync in syncs():
        if sync.key == key:
            return sync
    raise KeyError(f"unknown sync {key!r}; known: {', '.join(s.key for s in syncs())}")


def get_provider(name: str) -> Provider:
    try:
        return providers()[name]
    except KeyError:
        raise KeyError(f"unknown provider {name!r}; known: {', '.join(sorted(providers()))}") from None


def syncs_for_event(provider: str, event_type: str) -> list[SyncDefinition]:
    """The syncs of ``provider`` subscribed to ``event_type``."""
    return [s for s in syncs() if s.provider == provider and s.subscribes_to(event_type)]
