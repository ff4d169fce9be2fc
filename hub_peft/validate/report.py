"""A validation report: the problems found in an adapter folder, each with its fix, and what was read."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Problem:
    point: str
    fix: str
    incompatible_base: bool = False  # the adapter is fine, but made for another base model

    def __str__(self) -> str:
        return f"{self.point} -> fix: {self.fix}"


@dataclass
class Report:
    folder: Path
    problems: list[Problem] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    tensors: dict[str, tuple[str, list[int]]] = field(default_factory=dict)  # name -> (dtype, shape)
    warnings: list[str] = field(default_factory=list)  # worth saying, but the adapter still loads

    @property
    def ok(self) -> bool:
        return not self.problems

    def add(self, point: str, fix: str, *, incompatible_base: bool = False) -> None:
        """Record a problem; ``incompatible_base``: the adapter is fine, but made for another base."""
        self.problems.append(Problem(point, fix, incompatible_base))
