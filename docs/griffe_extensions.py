"""Griffe extension for the API reference: qat's docstrings read as mkdocstrings renders them.

qat's docstrings are Google style with two reStructuredText habits that mkdocstrings' Markdown
does not share: Sphinx roles (:func:`qat.prepare`) and ``Example:`` section titles (griffe knows
``Examples:``). This shows a role as inline code and reads ``Example:`` as ``Examples:``, so the
doctests render as code, without changing the docstrings (``mkdocs.yml`` loads it).
"""

from __future__ import annotations

import re

import griffe

_ROLE = re.compile(r":(?:py:)?(?:func|class|meth|mod|attr|data|obj|exc|const):`(~?)([^`<]*?)(?:\s*<([^>`]+)>)?`")
_EXAMPLE = re.compile(r"(?m)^(\s*)Example:\s*$")


def _role_as_code(match: re.Match) -> str:
    short, text, target = match.groups()
    if target:  # :meth:`title <target>`: the title is what a reader sees
        return f"`{text.strip()}`"
    return f"`{text.rsplit('.', 1)[-1] if short else text}`"


class ReadRestHabits(griffe.Extension):
    """Rewrite each docstring's Sphinx roles and ``Example:`` titles when griffe loads it."""

    def on_instance(self, *, obj: griffe.Object, **kwargs) -> None:
        if obj.docstring is not None:
            obj.docstring.value = _EXAMPLE.sub(r"\1Examples:", _ROLE.sub(_role_as_code, obj.docstring.value))
