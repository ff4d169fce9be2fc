"""Read and check prompt → response examples from CSV, JSONL or JSON files (the Space and ``hub-peft train``).

Reading is strict about what cannot work (size, encoding, format) and raises
:class:`~hub_peft.errors.InvalidInputError` with what to do; checking reports problems per row
(empty, duplicate, too long) so a person can fix them, and :func:`clean_rows` drops the ones that
training can safely skip.
"""

from __future__ import annotations

import csv
import io
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import InvalidInputError

MAX_FILE_BYTES = 5 * 2**20
MAX_ROWS = 2000
MAX_TOKENS = 256  # prompt (in its template) + response; keeps a CPU training step around a second
PROMPT_NAMES = ("prompt", "instruction", "input", "question", "query", "user", "text")
RESPONSE_NAMES = ("response", "output", "answer", "completion", "assistant", "target", "label")


@dataclass
class Table:
    """Records as read from a file, before choosing which columns are the prompt and the response."""

    records: list[dict[str, Any]]
    columns: list[str]
    source: str = "table"

    def guess_mapping(self) -> tuple[str | None, str | None]:
        """The columns that look like prompt and response (exact or common names, case-insensitive)."""
        lower = {c.lower().strip(): c for c in self.columns}
        prompt = next((lower[n] for n in PROMPT_NAMES if n in lower), None)
        response = next((lower[n] for n in RESPONSE_NAMES if n in lower and lower[n] != prompt), None)
        return prompt, response

    def rows(self, prompt_column: str | None = None, response_column: str | None = None) -> list[dict[str, str]]:
        """``{"prompt", "response"}`` rows using the given (or guessed) columns."""
        guessed = self.guess_mapping()
        prompt_column, response_column = prompt_column or guessed[0], response_column or guessed[1]
        missing = [c for c in (prompt_column, response_column) if c is None or c not in self.columns]
        if missing or prompt_column is None or response_column is None or prompt_column == response_column:
            raise InvalidInputError(
                f"Choose which column holds the prompts and which the responses (two different columns); "
                f"{self.source} has columns {self.columns}."
            )
        return [
            {"prompt": _text(r.get(prompt_column)), "response": _text(r.get(response_column))} for r in self.records
        ]


def _text(value: Any) -> str:
    return "" if value is None else str(value)


def read_table(data: bytes, filename: str) -> Table:
    """Parse an uploaded file: ``.csv``, ``.jsonl`` (one object per line) or ``.json`` (a list of objects)."""
    name = Path(filename).name or "the file"
    suffix = Path(filename).suffix.lower()
    if suffix not in (".csv", ".jsonl", ".json", ".tsv"):
        raise InvalidInputError(
            f"{name}: unsupported file type {suffix or '(none)'}; upload a .csv, .jsonl or .json file."
        )
    if len(data) > MAX_FILE_BYTES:
        raise InvalidInputError(
            f"{name} is {len(data) / 2**20:.1f} MB; the limit is {MAX_FILE_BYTES // 2**20} MB. "
            f"Upload at most {MAX_ROWS} examples."
        )
    if not data.strip():
        raise InvalidInputError(f"{name} is empty; it needs one prompt/response example per row.")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise InvalidInputError(
            f"{name} is not UTF-8 text (byte 0x{data[e.start]:02x} at position {e.start}); save it as UTF-8."
        ) from None
    if suffix in (".csv", ".tsv"):
        records = _read_csv(text, name, "\t" if suffix == ".tsv" else ",")
    elif suffix == ".jsonl":
        records = []
        for number, line in enumerate(text.splitlines(), 1):
            if line.strip():
                records.append(_json_object(line, f"{name} line {number}"))
    else:
        try:
            value = json.loads(text)
        except json.JSONDecodeError as e:
            raise InvalidInputError(f"{name} is not valid JSON ({e.msg} at line {e.lineno}).") from None
        if isinstance(value, dict) and len(value) == 1 and isinstance(next(iter(value.values())), list):
            value = next(iter(value.values()))  # {"data": [...]}
        if not isinstance(value, list):
            raise InvalidInputError(f'{name} must hold a JSON list of objects like {{"prompt": ..., "response": ...}}.')
        records = [_object(v, f"{name} item {i + 1}") for i, v in enumerate(value)]
    if not records:
        raise InvalidInputError(f"{name} has no examples.")
    if len(records) > MAX_ROWS:
        raise InvalidInputError(f"{name} has {len(records):,} examples; the limit is {MAX_ROWS:,}. Use fewer rows.")
    columns = list(dict.fromkeys(k for r in records for k in r))
    return Table(records, columns, source=name)


def _read_csv(text: str, name: str, delimiter: str) -> list[dict[str, Any]]:
    reader = csv.DictReader(io.StringIO(text), delimiter=delimiter)
    if not reader.fieldnames or any(not (f or "").strip() for f in reader.fieldnames):
        raise InvalidInputError(f"{name} needs a header row naming its columns, e.g. prompt,response.")
    try:
        return [{k: v for k, v in row.items() if k is not None} for row in reader]
    except csv.Error as e:
        raise InvalidInputError(f"{name} is not valid CSV ({e}).") from None


def _json_object(line: str, where: str) -> dict[str, Any]:
    try:
        return _object(json.loads(line), where)
    except json.JSONDecodeError as e:
        raise InvalidInputError(f"{where} is not valid JSON ({e.msg}); JSONL needs one object per line.") from None


def _object(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise InvalidInputError(
            f'{where} is a {type(value).__name__}, not an object like {{"prompt": ..., "response": ...}}.'
        )
    return value


@dataclass
class Problem:
    row: int  # 1-based
    kind: str  # empty | duplicate | too_long
    message: str

    @property
    def blocking(self) -> bool:
        return self.kind == "too_long"


@dataclass
class Preview:
    """What would be trained: the clean rows, their token count, and the problems found."""

    rows: list[dict[str, str]]
    problems: list[Problem] = field(default_factory=list)
    tokens: int | None = None

    @property
    def ok(self) -> bool:
        return bool(self.rows) and not any(p.blocking for p in self.problems)

    def summary(self) -> str:
        parts = [f"{len(self.rows)} example{'s' * (len(self.rows) != 1)} to train on"]
        if self.tokens is not None:
            parts.append(f"{self.tokens:,} tokens")
        skipped = [p for p in self.problems if not p.blocking]
        if skipped:
            parts.append(f"{len(skipped)} row(s) skipped")
        blocking = [p for p in self.problems if p.blocking]
        if blocking:
            parts.append(f"{len(blocking)} row(s) to fix before training")
        return ", ".join(parts) + "."


def check_rows(rows: list[dict[str, str]], *, count_tokens=None, max_tokens: int = MAX_TOKENS) -> Preview:
    """Drop empty and duplicate rows (reported), and flag rows longer than ``max_tokens``.

    ``count_tokens(row) -> int`` measures a row as training will see it (template, EOS included).
    """
    if len(rows) > MAX_ROWS:
        raise InvalidInputError(f"{len(rows):,} examples; the limit is {MAX_ROWS:,}. Use fewer rows.")
    kept, problems, seen = [], [], dict[tuple[str, str], int]()
    total = 0
    for i, row in enumerate(rows, 1):
        prompt, response = str(row.get("prompt") or "").strip(), str(row.get("response") or "").strip()
        if not prompt or not response:
            problems.append(Problem(i, "empty", f"row {i}: empty {'prompt' if not prompt else 'response'} (skipped)"))
            continue
        key = (prompt, response)
        if key in seen:
            problems.append(Problem(i, "duplicate", f"row {i}: duplicate of row {seen[key]} (skipped)"))
            continue
        seen[key] = i
        clean = {"prompt": prompt, "response": response}
        if count_tokens is not None:
            n = count_tokens(clean)
            total += n
            if n > max_tokens:
                problems.append(Problem(i, "too_long", f"row {i}: {n} tokens, the limit is {max_tokens}; shorten it"))
        kept.append(clean)
    return Preview(kept, problems, total if count_tokens is not None else None)


def split_validation(
    rows: list[dict[str, str]], *, fraction: float = 0.1, min_rows: int = 20, seed: int = 0
) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """``(train, validation)``: a seeded ``fraction`` of ``rows`` held out (at least 2 rows) when there are
    ``min_rows`` or more, else no validation. ``rows`` are distinct (:func:`check_rows` drops duplicates),
    so no row is in both."""
    if len(rows) < min_rows:
        return list(rows), []
    held = set(random.Random(seed).sample(range(len(rows)), max(2, round(len(rows) * fraction))))
    return [r for i, r in enumerate(rows) if i not in held], [r for i, r in enumerate(rows) if i in held]


def without(rows: list[dict[str, str]], held_out: list[dict[str, str]]) -> list[dict[str, str]]:
    """``rows`` less those that also appear (same prompt and response) in ``held_out``."""
    taken = {(r["prompt"], r["response"]) for r in held_out}
    return [r for r in rows if (r["prompt"], r["response"]) not in taken]
