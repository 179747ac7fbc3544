"""Comma-separated option values (``--fractions 0.05,0.25,1``, ``--stages head,all``), parsed one way.

The CLI and the few core functions that still accept such text (``expand_stages``, ``--by age:18,65``) call
``comma_list``; the core's functions otherwise take sequences.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from typing import TypeVar

from cxrcae.errors import OptionError

T = TypeVar("T")

_KINDS: dict[Callable, str] = {float: "a number", int: "a whole number"}


def comma_list(
    text: str,
    convert: Callable[[str], T] = str,  # type: ignore[assignment]
    what: str = "the list",
    *,
    choices: Collection[str] | None = None,
) -> tuple[T, ...]:
    """The items of ``text``: split on commas, blanks stripped, empty items dropped, each ``convert``-ed.

    ``what`` names the option in the error; ``choices``, when given, are the only items allowed (before
    conversion). Raises ``OptionError`` (a usage error, exit 2) naming the option and the first bad item.

    >>> comma_list(" 0.05, 0.25,,1 ", float, "--fractions")
    (0.05, 0.25, 1.0)
    """
    out: list[T] = []
    for item in (part.strip() for part in str(text).split(",")):
        if not item:
            continue
        if choices is not None and item not in choices:
            raise OptionError(f"{what}: unknown {item!r}; use {', '.join(map(str, choices))}")
        try:
            out.append(convert(item))
        except (ValueError, TypeError, KeyError) as exc:
            reason = f"is not {_KINDS[convert]}" if convert in _KINDS else f"is not valid ({exc})"
            raise OptionError(f"{what}: {item!r} {reason}") from None
    return tuple(out)
