"""Griffe extension: Sphinx cross-reference roles in the docstrings read as code in the API pages.

The docstrings are written to read well in ``help()`` and use Sphinx's roles (``:func:`~a.b.c```); mkdocstrings
renders docstrings as Markdown, where a role would show its markup. ``:role:`~a.b.c``` becomes ```c```,
``:role:`a.b.c``` becomes ```a.b.c``` and ``:role:`title <a.b.c>``` becomes ```title```.
"""

from __future__ import annotations

import re

import griffe

ROLE = re.compile(r":(?:py:)?(?:func|class|mod|meth|attr|data|exc|obj|const):`(~?)([^`<]*?)\s*(?:<([^>]*)>)?`")


def plain(text: str) -> str:
    def code(match: re.Match) -> str:
        short, name, target = match.groups()
        if target:  # :role:`title <target>`
            return f"`{name}`"
        return f"`{name.rsplit('.', 1)[-1] if short else name}`"

    return ROLE.sub(code, text)


class SphinxRoles(griffe.Extension):
    def on_object(self, *, obj: griffe.Object, loader: griffe.GriffeLoader, **kwargs) -> None:
        if obj.docstring is not None:
            obj.docstring.value = plain(obj.docstring.value)
