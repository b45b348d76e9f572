"""The registry of methods: every method (and preset) a context can run, by name.

A method registers itself with :func:`register` where it is defined; the registry is what the
shared conformance suite (``tests/test_conformance.py``) runs, so a new method is tested
against every engine guarantee without being listed anywhere by hand.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TypeVar

from .._protocol import Method

__all__ = ["REGISTRY", "Registered", "register", "register_preset"]

M = TypeVar("M", bound=type[Method])
#: Builds a configured instance for a number of modalities.
Factory = Callable[[int], Method]


@dataclass(frozen=True)
class Registered:
    """A registered method or preset.

    Attributes:
        name: its registry name (``"cggm"``, ``"cggm-official"``, ...).
        make: builds a configured instance for ``m`` modalities.
        doc: one line on what it is.
    """

    name: str
    make: Factory
    doc: str


#: Every registered method and preset, by name.
REGISTRY: dict[str, Registered] = {}


def register_preset(name: str, make: Factory, doc: str) -> None:
    """List a configured instance under ``name`` (e.g. an official-parity preset)."""
    if name in REGISTRY:
        raise ValueError(f"a method is already registered as {name!r}")
    REGISTRY[name] = Registered(name, make, doc)


def register(
    name: str,
    *,
    make: Factory | None = None,
    presets: Mapping[str, tuple[Factory, str]] | None = None,
) -> Callable[[M], M]:
    """Class decorator: list the method under ``name`` (built by ``make``, default: the class
    with its default arguments) and its ``presets`` (name -> (factory, one-line doc))."""

    def decorate(cls: M) -> M:
        first = (cls.__doc__ or cls.__name__).strip().splitlines()[0]
        register_preset(name, make if make is not None else (lambda m: cls()), first)
        for preset, (factory, doc) in (presets or {}).items():
            register_preset(preset, factory, doc)
        return cls

    return decorate
