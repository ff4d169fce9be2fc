"""The regexes an adapter config holds, matched with a bound (adapters are untrusted data).

PEFT full-matches a string ``target_modules`` against every module name with Python's ``re``, and pastes other
fields (``rank_pattern`` keys, ``modules_to_save``...) into regexes of its own; either can backtrack for ever while
holding the GIL. Here such regexes are compiled with the ``regex`` module's bounds and matched within a time
budget, and pasted entries are checked by their shape.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterable
from typing import Any

from .errors import InvalidInputError

MAX_REGEX_CHARS = 1000  # longer regexes are refused outright
MAX_REGEX_SIZE = 20_000  # a regex with its counted repeats unrolled (`regex` unrolls x{n} when it compiles)
REGEX_BUDGET_S = 1.0  # the time to match one config's regexes against all the module names, in all
MAX_PATTERN_KEYS = 10_000  # entries of one rank_pattern-like map, modules_to_save or target_modules list
MAX_REGEX_KEYS = 32  # of the entries PEFT pastes into its regexes, those that are regexes, not plain names
MAX_ALTERNATIVES = 16  # ways the alternations of one such entry may match
# PEFT re.fullmatch-es a string value of these, whole, against every module name: expand_target_modules resolves
# them into lists of module names
REGEX_FIELDS = ("target_modules", "exclude_modules", "feedforward_modules")
# PEFT pastes these entries into regexes of its own, e.g. re.match(rf"(.*\.)?({key})$", name) for the keys of
# rank_pattern (and every other *_pattern map) and rf"(^|.*\.){m}($|\..*)" for modules_to_save: they are checked
# by their shape (pasted_problem)
PASTED_LIST_FIELDS = ("modules_to_save", "layers_pattern")
# the PEFT types whose target_modules is no regex: adaption prompts name the attention modules' attribute
NOT_REGEX_TYPES = ("ADAPTION_PROMPT",)
_PLAIN_NAME = re.compile(r"[\w\-]+(?:\.[\w\-]+)*")
_LIST_FIX = (
    'list the module names instead of a regex, e.g. ["q_proj", "v_proj"] or full names such as '
    '"model.layers.0.self_attn.q_proj"'
)


def short_pattern(pattern: str, limit: int = 80) -> str:
    return repr(pattern if len(pattern) <= limit else pattern[:limit] + "...")


def _regex_tree(pattern: str, field: str) -> Any:
    """The parse tree of ``pattern`` as Python's ``re`` (what PEFT matches with) reads it; InvalidInputError when
    it is too long or not a regex. ``re.compile`` only compiles, it never backtracks."""
    from re import _parser  # type: ignore[attr-defined]  # the parser re.compile uses (private: no stub)

    if len(pattern) > MAX_REGEX_CHARS:
        raise InvalidInputError(
            f"The {field} regex {short_pattern(pattern)} is too costly to match: it has {len(pattern)} "
            f"characters (at most {MAX_REGEX_CHARS}). Fix: {_LIST_FIX}."
        )
    try:
        re.compile(pattern)
        return _parser.parse(pattern)
    except (re.error, RecursionError, OverflowError, ValueError) as e:
        raise InvalidInputError(
            f"{field} {short_pattern(pattern)} is not a valid regular expression ({e}). Fix: {_LIST_FIX}."
        ) from None


def _items(tree: Any) -> list[tuple[Any, Any]]:
    return list(getattr(tree, "data", tree))


def _parts(op: Any, av: Any) -> list[Any]:
    """The sub-patterns inside one item of a parse tree."""
    name = str(op)
    if name.endswith("_REPEAT"):
        return [av[2]]
    if name == "SUBPATTERN":
        return [av[3]]
    if name == "BRANCH":
        return list(av[1])
    if name in ("ASSERT", "ASSERT_NOT"):
        return [av[1]]
    if name == "ATOMIC_GROUP":
        return [av]
    if name == "GROUPREF_EXISTS":
        return [p for p in av[1:] if p is not None]
    return []


def _unrolled_size(tree: Any) -> int:
    """How big a regex gets once every counted repeat is written out (``x{n}`` as n copies of x)."""
    from re import _constants  # type: ignore[attr-defined]  # private: no stub

    total = 0
    for op, av in _items(tree):
        if str(op).endswith("_REPEAT"):
            low, high, body = av
            total += max(1, low + 1 if high == _constants.MAXREPEAT else high) * _unrolled_size(body)
        else:
            total += 1 + sum(_unrolled_size(p) for p in _parts(op, av))
    return total


def compile_bounded(pattern: str, field: str) -> Any:
    """``pattern`` compiled by the third-party ``regex`` module, whose matches take a timeout: the syntax and the
    matches of Python's ``re`` (``regex.VERSION0``); checked with ``re`` first. InvalidInputError when it is too
    long, not a regex, or too big once unrolled."""
    tree = _regex_tree(pattern, field)
    try:
        size = _unrolled_size(tree)
    except RecursionError:
        size = MAX_REGEX_SIZE + 1
    if size > MAX_REGEX_SIZE:
        # NOTE(security): `regex` unrolls counted repeats when it compiles, so a short pattern such as
        # (?:a{1000}){1000} would take hundreds of megabytes before matching anything
        raise InvalidInputError(
            f"The {field} regex {short_pattern(pattern)} is too costly to match: its counted repeats "
            f"unroll to over {MAX_REGEX_SIZE} items. Fix: {_LIST_FIX}."
        )
    try:
        import regex
    except ImportError:  # a transformers dependency, so normally there
        raise InvalidInputError(
            f"{field} is the regex {short_pattern(pattern)}, which hub_peft matches only with the "
            f"`regex` package. Fix: pip install regex, or {_LIST_FIX}."
        ) from None
    try:
        return regex.compile(pattern, flags=regex.VERSION0)
    except (regex.error, RecursionError, OverflowError, ValueError) as e:
        raise InvalidInputError(
            f"{field} {short_pattern(pattern)} is not a valid regular expression ({e}). Fix: {_LIST_FIX}."
        ) from None


class BoundedMatcher:
    """Matches untrusted regexes against module names within one time budget for all of them: InvalidInputError
    ("too costly") once it is spent, where Python's ``re`` would backtrack for ever (``(.|.)*!``), holding the
    GIL, so that no thread or timer could stop it."""

    def __init__(self, budget_s: float = REGEX_BUDGET_S) -> None:
        self.budget_s = budget_s
        self.deadline = time.monotonic() + budget_s

    def _too_costly(self, field: str, pattern: str, n_names: int) -> InvalidInputError:
        return InvalidInputError(
            f"The {field} regex {short_pattern(pattern)} is too costly to match: matching it against {n_names} "
            f"module names took over {self.budget_s:g} s (PEFT matches it with Python's re, which can backtrack for "
            f"ever on such a regex). Fix: {_LIST_FIX}."
        )

    def matcher(
        self, pattern: str, field: str, n_names: int = 1, *, before: str = "", after: str = "", whole: bool = True
    ) -> Callable[[str], bool]:
        """``re.fullmatch(before + pattern + after, name)`` (``re.match`` when not ``whole``) as a function of
        ``name``, on this budget; the regex is checked and compiled at once."""
        compiled = compile_bounded(before + pattern + after, field)
        method = compiled.fullmatch if whole else compiled.match

        def match(name: str) -> bool:
            left = self.deadline - time.monotonic()
            if left <= 0:
                raise self._too_costly(field, pattern, n_names)
            try:
                return method(name, timeout=left) is not None
            except TimeoutError:
                raise self._too_costly(field, pattern, n_names) from None

        return match

    def fullmatches(self, pattern: str, names: Iterable[str], field: str) -> list[str]:
        """The ``names`` that ``re.fullmatch(pattern, name)`` matches (PEFT's rule for a string target_modules)."""
        names = list(names)
        match = self.matcher(pattern, field, len(names))
        return [n for n in names if match(n)]


def list_matches(name: str, entries: set[str] | frozenset[str]) -> bool:
    """PEFT's rule for a list of names (target_modules, exclude_modules): ``name`` is an entry or ends with
    ``"." + entry``; one set lookup per dot of ``name`` instead of one ``endswith`` per entry."""
    if name in entries:
        return True
    dot = name.find(".")
    while dot != -1:
        if name[dot + 1 :] in entries:
            return True
        dot = name.find(".", dot + 1)
    return False


def pattern_lookup(
    keys: Iterable[str], field: str = "rank_pattern", matcher: BoundedMatcher | None = None
) -> Callable[[str], str | None]:
    r"""PEFT's ``get_pattern_key`` for the keys of a ``rank_pattern``-like map, bounded: a function giving, for a
    module name, the first of ``keys`` (in order) for which ``re.match(rf"(.*\.)?({key})$", name)``, or None.

    NOTE: a plain key (a module name) is compared as text with the name and its dotted suffixes, where ``re``
    reads its dots as any character; the same for module names, whose parts are separated by dots. Only regex
    keys (at most MAX_REGEX_KEYS of them, see :func:`config_problems`) are matched, with a bound."""
    keys = list(keys)
    matcher = matcher or BoundedMatcher()
    plain: dict[str, int] = {}
    regexes: list[tuple[int, Callable[[str], bool]]] = []
    for i, key in enumerate(keys):
        if is_plain_name(key):
            plain.setdefault(key, i)
        else:
            regexes.append((i, matcher.matcher(key, field, before=r"(.*\.)?(", after=")$", whole=False)))

    def lookup(name: str) -> str | None:
        best = plain.get(name)
        dot = name.find(".")
        while dot != -1:
            found = plain.get(name[dot + 1 :])
            best = found if best is None or (found is not None and found < best) else best
            dot = name.find(".", dot + 1)
        for i, match in regexes:
            if best is not None and i > best:
                break
            if match(name):
                best = i
                break
        return None if best is None else keys[best]

    return lookup


def is_plain_name(value: Any) -> bool:
    """A dotted module name (``q_proj``, ``model.layers.0.mlp``): no regex syntax but its dots."""
    return isinstance(value, str) and _PLAIN_NAME.fullmatch(value) is not None


def pasted_problem(pattern: Any, field: str = "pattern") -> str | None:
    """Why ``pattern`` is unsafe to hand to PEFT, which pastes it into regexes of its own and runs them with
    Python's ``re`` (rank_pattern keys, modules_to_save entries, layers_pattern); None when it is safe.

    NOTE(security): ``re`` takes no timeout, so these are judged by their shape, not timed. A module name always
    passes; a regex may hold one quantifier, on a single character or class (``\\d+``, ``.*``, ``[0-9]+``), and
    alternations or optional groups of up to MAX_ALTERNATIVES ways to match, but no backreference or conditional.
    Nested or sequenced quantifiers (``(a+)+``, ``.*.*``) and repeated groups backtrack exponentially or
    polynomially; one quantifier inside PEFT's ``(.*\\.)?(...)$`` stays about linear per dot of a name."""
    if not isinstance(pattern, str) or not pattern:
        return f"{pattern!r} is not a non-empty string"
    if is_plain_name(pattern):
        return None
    try:
        tree = _regex_tree(pattern, field)
    except InvalidInputError as e:
        return str(e).split(" Fix:")[0]
    quantifiers, problems = 0, []

    def ways(items: Any) -> int:
        """How many ways ``items`` can match, quantifiers aside (those are counted in ``quantifiers``)."""
        nonlocal quantifiers
        count = 1
        for op, av in _items(items):
            name = str(op)
            if name.startswith("GROUPREF"):
                problems.append("a backreference or conditional")
            elif name.endswith("_REPEAT"):
                low, high, body = av
                single = len(_items(body)) == 1 and not _parts(*_items(body)[0])
                if low == high and not single:
                    problems.append("a repeated group")
                elif high == 1:  # x? and (...)? : one more way to match
                    count *= 1 + ways(body)
                elif low != high:
                    quantifiers += 1
                    if not single:
                        problems.append("a quantifier on a group")
            elif name == "BRANCH":
                count *= sum(ways(p) for p in av[1])
            else:
                for part in _parts(op, av):
                    count *= ways(part)
        return count

    try:
        total = ways(tree)
    except RecursionError:
        problems.append("too deep a nesting of groups")
        total = 0
    if quantifiers > 1:
        problems.append(f"{quantifiers} quantifiers (at most one)")
    if total > MAX_ALTERNATIVES:
        problems.append(f"alternations that can match {total} ways (at most {MAX_ALTERNATIVES})")
    return f"the regex {short_pattern(pattern)} has {problems[0]}" if problems else None
