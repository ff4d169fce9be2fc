"""A model card's YAML front matter, read in bounded time and memory.

A README.md may open with YAML metadata between two ``---`` lines; the Hub returns it as ``cardData``. YAML
anchors and aliases let a few hundred bytes expand into gigabytes once the data is walked or serialised
("billion laughs"), so a card is parsed here without them: a card that uses one is refused at commit, and one
already stored reads as no metadata. The front matter and the data it expands to are both capped, and only
JSON values are allowed (strings, numbers, booleans, null, lists, mappings), since the data goes out as JSON.

The front matter is found by a linear scan (a lazy regular expression over the whole card backtracks
quadratically on a README that opens with ``---`` and many blank lines); the commit checks, ``model_info``
and the HTML pages all read cards through this module.
"""

from __future__ import annotations

import math
import re

import yaml

from ..errors import CardError

MAX_FRONT_MATTER_BYTES = 64 << 10  # the YAML between the two '---' lines, UTF-8 encoded
MAX_CARD_DATA_BYTES = 256 << 10  # the parsed metadata, measured as (about) the size of its JSON
MAX_CARD_DEPTH = 64  # lists and mappings nested in one another
HEAD_BYTES = MAX_FRONT_MATTER_BYTES + 4096  # how much of a README can hold its front matter (with its '---' lines)
MAX_CARD_BYTES = 1 << 20  # a larger README.md is served as a file but not read as a card

_OPENING = re.compile(r"---[^\S\n]*\n")  # the first line: '---' and nothing but spaces
_CLOSING = re.compile(r"^---[^\S\n]*(?:\n|\Z)", re.M)  # the first later line of the same shape
_LEADING_BLANK_LINES = re.compile(r"\A(?:[^\S\n]*\n)+")
_ADVICE = "use only strings, numbers, booleans, null, lists and mappings (quote dates and other special values)"


# NOTE(card-loader): the C loader when PyYAML has it: a card is parsed on every model_info and for each repo of
# list_models, and the pure-Python loader is several times slower. Timestamps stay the strings they were written
# as: a datetime is not JSON, so a ``date: 2024-01-01`` in a card would break model_info.
class _CardLoader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):  # type: ignore[misc]
    """``yaml.safe_load``'s loader, with timestamps kept as strings."""


_CardLoader.add_constructor("tag:yaml.org,2002:timestamp", yaml.SafeLoader.construct_yaml_str)


def split_card(text: str, *, complete: bool = True) -> tuple[str | None, str]:
    """``(front matter, body)`` of a card, ``(None, text)`` when it has no front matter.

    ``complete=False`` says ``text`` is only the first bytes of the README (at least :data:`HEAD_BYTES`): a front
    matter that does not close within them raises :class:`CardError`, as does one over the size cap.
    """
    opening = _OPENING.match(text)
    if not opening:
        return None, text
    closing = _CLOSING.search(text, opening.end())
    if closing is not None and not complete and closing.end() == len(text) and not closing.group().endswith("\n"):
        closing = None  # '---' at the very end of a truncated head is not known to end a line
    if closing is None:
        if complete:
            return None, text  # an opening '---' that never closes is Markdown (a rule)
        raise CardError(
            f"the YAML front matter opened by the first '---' line does not close within the first "
            f"{MAX_FRONT_MATTER_BYTES // 1024} KiB: end it with a line holding only '---' (and keep it under "
            f"{MAX_FRONT_MATTER_BYTES // 1024} KiB), or start the card with something other than '---'."
        )
    front = _LEADING_BLANK_LINES.sub("", text[opening.end() : closing.start()])
    size = len(front.encode("utf-8", errors="replace"))
    if size > MAX_FRONT_MATTER_BYTES:
        raise CardError(
            f"the YAML front matter is {size} bytes, over the {MAX_FRONT_MATTER_BYTES // 1024} KiB limit: keep "
            "metadata short and move long text into the card's Markdown body."
        )
    return front, text[closing.end() :]


def load_card_data(front: str) -> dict | None:
    """The metadata in a front matter (``None`` when it is empty), or :class:`CardError`.

    Anchors and aliases are refused before anything is built, so the data is never larger than the YAML was;
    the size and depth of what is built are checked again anyway (see :func:`_check_json_like`).
    """
    try:
        for event in yaml.parse(front, Loader=_CardLoader):
            if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
                raise CardError(
                    "the YAML front matter uses an anchor or an alias ('&name' / '*name'), which the hub refuses "
                    "(they can expand a small card into gigabytes): write each value out in full."
                )
        data = yaml.load(front, Loader=_CardLoader)  # a SafeLoader; no alias (see above)
    except CardError:
        raise
    except yaml.YAMLError as e:
        raise CardError(f"the YAML front matter does not parse: {e}") from None
    except (ValueError, OverflowError, RecursionError) as e:  # e.g. an integer of more than 4300 digits
        raise CardError(f"the YAML front matter holds a value that cannot be read ({e}): {_ADVICE}.") from None
    if data is None:
        return None
    if not isinstance(data, dict):
        raise CardError("the YAML front matter must be a mapping of keys to values.")
    _check_json_like(data)
    return data


def read_card_data(text: str, *, complete: bool = True) -> dict:
    """The metadata of a stored card, ``{}`` when it has none or it cannot be accepted (a card committed before
    these checks existed may hold anything): reading a card never expands an alias."""
    try:
        front, _ = split_card(text, complete=complete)
        return (load_card_data(front) if front is not None else None) or {}
    except CardError:
        return {}


def _check_json_like(data: object) -> None:
    """Refuse what JSON cannot carry, and data nested too deep or larger than :data:`MAX_CARD_DATA_BYTES` (counted
    as JSON would spell it, roughly); walks without recursion and stops as soon as a limit is passed."""
    size, stack = 0, [(data, 0)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, (dict, list, tuple)):
            if depth >= MAX_CARD_DEPTH:
                raise CardError(
                    f"the YAML front matter nests lists and mappings more than {MAX_CARD_DEPTH} levels "
                    "deep: flatten it."
                )
            size += 2
            if isinstance(value, dict):
                for key, item in value.items():
                    if isinstance(key, (dict, list, tuple)):
                        raise CardError(f"the YAML front matter has a key that is a list or a mapping: {_ADVICE}.")
                    size += _scalar_size(key) + 1
                    stack.append((item, depth + 1))
            else:
                stack.extend((item, depth + 1) for item in value)
        else:
            size += _scalar_size(value) + 1
        if size > MAX_CARD_DATA_BYTES:
            raise CardError(
                f"the YAML front matter holds more than {MAX_CARD_DATA_BYTES // 1024} KiB of data: keep "
                "metadata short and move long text into the card's Markdown body."
            )


def _scalar_size(value: object) -> int:
    if value is None or isinstance(value, bool):
        return 5
    if isinstance(value, str):
        return len(value) + 2
    if isinstance(value, int):
        return value.bit_length() // 3 + 2
    if isinstance(value, float):
        if not math.isfinite(value):
            raise CardError(f"the YAML front matter holds NaN or an infinity, which JSON cannot carry: {_ADVICE}.")
        return 24
    raise CardError(f"the YAML front matter holds a value of type {type(value).__name__!r}: {_ADVICE}.")


_STRING_LIST_FIELDS = ("tags", "datasets", "language", "metrics", "base_model")


def card_metadata_errors(text: str, *, complete: bool = True) -> list[str]:
    """What the Hub would refuse in a model card's YAML front matter (empty list when valid); ``complete=False``
    when ``text`` is only the README's first :data:`~hub_peft.hub.card.HEAD_BYTES` bytes.

    NOTE(security): parsed without anchors or aliases and within size limits (see above), so that a card that
    would expand on every model_info/list_models never gets in."""
    if len(text) > HEAD_BYTES:  # (validate-yaml's whole text) only the head can hold an acceptable front matter
        text, complete = text[:HEAD_BYTES], False
    try:
        front, _ = split_card(text, complete=complete)
        data = load_card_data(front) if front is not None else None
    except CardError as e:
        return [str(e)]
    if data is None:
        return []
    errors = []
    for key in _STRING_LIST_FIELDS:
        value = data.get(key)
        if (
            value is not None
            and not isinstance(value, str)
            and not (isinstance(value, list) and all(isinstance(v, str) for v in value))
        ):
            errors.append(f"'{key}' must be a string or a list of strings.")
    for key in ("license", "library_name", "pipeline_tag", "base_model_relation"):
        if data.get(key) is not None and not isinstance(data[key], str):
            errors.append(f"'{key}' must be a string.")
    if data.get("model-index") is not None and not isinstance(data["model-index"], list):
        errors.append("'model-index' must be a list.")
    return errors
