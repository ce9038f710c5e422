"""Declared options: every model family states its options once, in a frozen dataclass.

Each field of a family's config dataclass is declared with :func:`option`: its default, the
check of its value (which also names its type for people), and one line of meaning. From that
one declaration come

- the validation (:func:`check_fields`, called from the dataclass's ``__post_init__``): each
  value goes through its check, which raises ``TypeError`` / ``ValueError`` naming the option,
  the bad value and what is allowed (a bool is never taken for an int, nor a str for a number);
- the error for an unknown keyword (:func:`check_names`), which lists every accepted option;
- the text of ``help(sdmerge.apply)`` (:func:`describe`).

Checks are small callables ``check(name, value) -> value`` with a ``kind`` string for the help
text; the ones shared by several families are here.
"""

from __future__ import annotations

import math
import numbers
import textwrap
from collections.abc import Callable
from dataclasses import MISSING, Field, dataclass, field, fields


@dataclass(frozen=True)
class Check:
    """``function(name, value) -> value`` (the checked value, e.g. a float for a real number),
    raising ``TypeError`` / ``ValueError``; ``kind`` says what is allowed, for ``help()``."""

    kind: str
    function: Callable[[str, object], object]

    def __call__(self, name: str, value):
        return self.function(name, value)


def option(default, check: Check, meaning: str, *, models: str | None = None) -> Field:
    """A dataclass field declared as an option: ``default``, its ``check``, one line of ``meaning``;
    ``models``: the models of the family it applies to, for the help text (``None``: all)."""
    return field(default=default, metadata={"check": check, "meaning": meaning, "models": models})


def declared(cls) -> list[Field]:
    """The fields of ``cls`` declared with :func:`option`, in declaration order."""
    return [f for f in fields(cls) if "check" in f.metadata]


def check_fields(instance) -> None:
    """Run every declared field of a frozen dataclass ``instance`` through its check, storing the
    checked value (e.g. ``int`` 1 as ``float`` 1.0 where a real number is declared)."""
    for f in declared(type(instance)):
        object.__setattr__(instance, f.name, f.metadata["check"](f.name, getattr(instance, f.name)))


def check_names(cls, given, family: str, skip: tuple[str, ...] = ()) -> None:
    """``TypeError`` if a name in ``given`` is not an option of ``cls`` (the fields in ``skip``,
    given otherwise, are not options), listing the accepted ones with their kind and default."""
    accepted = [f for f in declared(cls) if f.name not in skip]
    unknown = sorted(name for name in given if name not in {f.name for f in accepted})
    if unknown:
        listed = "; ".join(f"{f.name}: {f.metadata['check'].kind} = {f.default!r}" for f in accepted)
        raise TypeError(f"unknown option {', '.join(unknown)} for {family}; accepted options: {listed}")


def describe(cls, indent: str = "    ", skip: tuple[str, ...] = (), width: int = 100) -> str:
    """Each declared option of ``cls`` but ``skip``: ``name: kind = default -- meaning``, wrapped
    at ``width`` columns."""
    entries = []
    for f in declared(cls):
        if f.name in skip:
            continue
        default = "" if f.default is MISSING else f" = {f.default!r}"
        models = f" ({f.metadata['models']})" if f.metadata["models"] else ""
        text = f"{f.name}: {f.metadata['check'].kind}{default}{models} -- {f.metadata['meaning']}"
        entries.append(
            textwrap.fill(text, width, initial_indent=indent, subsequent_indent=indent + "    ", break_on_hyphens=False)
        )
    return "\n".join(entries)


# --- checks shared by the families -----------------------------------------------------------------


def _boolean(name: str, value):
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return value


BOOLEAN = Check("bool", _boolean)


def integer(minimum: int | None = None) -> Check:
    """An ``int`` (not a bool), at least ``minimum`` if given."""

    def check(name: str, value):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise TypeError(f"{name} must be an int, got {value!r}")
        if minimum is not None and value < minimum:
            raise ValueError(f"{name}={value} is not allowed; {name} must be >= {minimum}")
        return int(value)

    return Check("int" if minimum is None else f"int >= {minimum}", check)


def optional(check: Check) -> Check:
    """``None`` or what ``check`` allows."""
    return Check(f"{check.kind} or None", lambda name, value: None if value is None else check(name, value))


def choice(*allowed: str) -> Check:
    """One of the strings ``allowed``."""

    def check(name: str, value):
        if not isinstance(value, str) or value not in allowed:
            raise ValueError(f"{name}={value!r} is not allowed; allowed: {', '.join(map(repr, allowed))}")
        return value

    return Check(" | ".join(map(repr, allowed)), check)


def real_pair(name: str, value, what: str = "a real number") -> tuple[float, float]:
    """Two real numbers (not bools, not NaN) as floats, or ``TypeError`` saying an item is not ``what``."""
    if isinstance(value, (str, bytes)) or not hasattr(value, "__len__") or len(value) != 2:
        raise TypeError(f"{name} must be a pair (low, high), got {value!r}")
    for item in value:
        if isinstance(item, bool) or not isinstance(item, numbers.Real) or math.isnan(item):
            raise TypeError(f"{name}={value!r}: {item!r} is not {what}")
    return float(value[0]), float(value[1])


def _block_indices(name: str, value) -> tuple[int, ...]:
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        raise TypeError(f"{name} must be a range or a sequence of block indices (ints), got {value!r}")
    indices = tuple(value)
    if not indices or any(isinstance(i, bool) or not isinstance(i, numbers.Integral) for i in indices):
        raise TypeError(f"{name}={value!r} must hold at least one block index, each an int (0-based)")
    return tuple(int(i) for i in indices)


BLOCK_INDICES = Check("range or sequence of ints", _block_indices)
"""A range or a non-empty sequence of block indices (ints, not bools), as a tuple."""
