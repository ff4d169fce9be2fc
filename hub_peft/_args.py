"""Settings objects from parsed command-line options (the standard library only: the CLI's parser stays fast)."""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any, TypeVar

T = TypeVar("T")


def from_args(cls: type[T], args: argparse.Namespace, **overrides: Any) -> T:
    """A ``cls`` dataclass whose fields are the options of ``args`` with the same names (argparse's ``dest``),
    then ``overrides``; fields ``args`` lacks keep their defaults."""
    names = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
    values = {name: getattr(args, name) for name in names if hasattr(args, name)}
    return cls(**(values | overrides))
