"""Which prefix of the patch series the torch under test carries.

Every test of this repository declares the range of series levels it holds for
with ``@levels(lo, hi)``: level 0 is the pin (no patch), level N means patches
1..N are applied.  A later patch can supersede an expectation of an earlier one
by ending the old test's range and starting a new test at its own level.

The level is read, in this order, from
  1. ``SYMM_STACK_LEVEL`` (set by scripts/apply_and_build.sh and scripts/test.sh,
     and needed in source mode, where no overlay marker exists),
  2. a ``SERIES_LEVEL`` file beside this module (written into each commit of
     the stack that scripts/ghstack_stack.sh prepares for upstream review),
  3. the ``OVERLAY.json`` that scripts/stack.py writes beside an overlaid
     ``torch`` package,
  4. otherwise 0: a stock torch.

The base (``BASE``, e.g. "2.11.0") is the version of the torch under test,
read from its ``torch/version.py`` without importing torch.  Each base has a
series of its own, so an expectation that holds on one base only says so with
``@bases(...)``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import unittest
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar


_T = TypeVar("_T")


def overlay_marker() -> Path | None:
    spec = importlib.util.find_spec("torch")
    if spec is None or spec.origin is None:
        return None
    marker = Path(spec.origin).parent.parent / "OVERLAY.json"
    return marker if marker.is_file() else None


def current_level() -> int:
    env = os.environ.get("SYMM_STACK_LEVEL")
    if env is not None and env != "":
        return int(env)
    level_file = Path(__file__).with_name("SERIES_LEVEL")
    if level_file.is_file():
        return int(level_file.read_text().strip())
    marker = overlay_marker()
    if marker is not None:
        return int(json.loads(marker.read_text())["upto"])
    return 0


LEVEL = current_level()


def holds(lo: int, hi: int | None = None) -> bool:
    return lo <= LEVEL and (hi is None or LEVEL <= hi)


def levels(lo: int, hi: int | None = None) -> Callable[[_T], _T]:
    """Run the decorated test (or class) only at series levels lo..hi."""
    span = f"{lo}..{hi}" if hi is not None else f"{lo}.."
    return unittest.skipUnless(
        holds(lo, hi), f"holds for series levels {span}; torch is at level {LEVEL}"
    )


def current_base() -> str:
    """The torch version under test without its local part ("2.14.1")."""
    spec = importlib.util.find_spec("torch")
    if spec is None or spec.origin is None:
        return "none"
    text = (Path(spec.origin).parent / "version.py").read_text()
    found = re.search(r"^__version__\s*=\s*['\"]([^'\"+]+)", text, re.M)
    return found.group(1) if found else "unknown"


BASE = current_base()


def on_base(*names: str) -> bool:
    return BASE in names


def bases(*names: str) -> Callable[[_T], _T]:
    """Run the decorated test (or class) only on these bases."""
    return unittest.skipUnless(
        on_base(*names), f"holds on base {', '.join(names)}; torch is {BASE}"
    )


def levels_by_base(spans: dict[str, tuple[int, int | None]]) -> Callable[[_T], _T]:
    """`levels(lo, hi)` with a range per base: an expectation that one base
    already meets at level 0 holds there from level 0, and from the patch
    that brings it on another.  A base not named skips the test."""
    if BASE not in spans:
        return bases(*spans)
    return levels(*spans[BASE])
