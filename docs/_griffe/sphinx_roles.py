"""Griffe extension for the docs build: Sphinx roles in docstrings become Markdown code spans.

hub_peft's docstrings name other objects with Sphinx roles (``:class:`HubPeftError```, ``:func:`.load_adapter```).
mkdocstrings renders Markdown, where such a role would show as text with its colons; this turns each role into
a code span with the target's name (a leading ``~`` or ``.`` dropped). Used by mkdocs.yml only.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_ROLE = re.compile(r":(?:py:)?(?:attr|class|data|exc|func|meth|mod|obj|const):`[~.]?([^`]+)`")


class SphinxRoles(griffe.Extension):
    """Rewrite ``:role:`target``` as ```target``` in every docstring griffe visits."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = _ROLE.sub(r"`\1`", obj.docstring.value)
