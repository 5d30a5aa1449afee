"""Griffe extension: the Sphinx markup in the docstrings reads as Markdown in the API pages.

The docstrings are written to read well in ``help()`` and use Sphinx's roles (``:func:`~a.b.c```) and literal
blocks (``text::`` before an indented block); mkdocstrings renders docstrings as Markdown, where both would show
their markup.

- ``:role:`~a.b.c``` becomes ```c```, ``:role:`a.b.c``` becomes ```a.b.c```, ``:role:`title <a.b.c>``` becomes
  ```title```.
- ``text::`` at the end of a line becomes ``text:`` (the indented block after it is already a Markdown code block).
"""

from __future__ import annotations

import re

import griffe

ROLE = re.compile(r":(?:py:)?(?:func|class|mod|meth|attr|data|exc|obj|const):`(~?)([^`<]*?)\s*(?:<([^>]*)>)?`")
LITERAL = re.compile(r"(\S)::$", re.MULTILINE)


def plain(text: str) -> str:
    def code(match: re.Match) -> str:
        short, name, target = match.groups()
        if target:  # :role:`title <target>`
            return f"`{name}`"
        return f"`{name.rsplit('.', 1)[-1] if short else name}`"

    return LITERAL.sub(r"\1:", ROLE.sub(code, text))


class SphinxMarkup(griffe.Extension):
    def on_object(self, *, obj: griffe.Object, loader: griffe.GriffeLoader, **kwargs) -> None:
        if obj.docstring is not None:
            obj.docstring.value = plain(obj.docstring.value)
