"""The target registry: `register_target`, `get_target`, and the read-only `TARGETS` view."""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

from .target import Target, TargetError

__all__ = ["TARGETS", "register_target", "get_target"]

_REGISTRY: dict[str, Target] = {}
TARGETS: Mapping[str, Target] = MappingProxyType(_REGISTRY)  # read-only view, kept current by register_target


def register_target(target: Target) -> Target:
    """Add a target; registering a name twice is a programming error."""
    if target.name in _REGISTRY:
        raise ValueError(f"target {target.name!r} is already registered")
    _REGISTRY[target.name] = target
    return target


def get_target(name: str | Target) -> Target:
    """The target called `name` (case-insensitive); raises TargetError listing the known ones."""
    if isinstance(name, Target):
        return name
    key = str(name).strip().lower()
    if key not in _REGISTRY:
        known = ", ".join(f"{t.name} ({', '.join(t.chips)})" for t in _REGISTRY.values())
        raise TargetError(f"unknown target {name!r}; known targets: {known}")
    return _REGISTRY[key]
