"""MkDocs hooks of natskv's documentation site (mkdocs.yml lists this file under ``hooks:``).

natskv's docstrings name other objects with Sphinx roles (``:class:`Entry```), which read well in
``help()`` and in an editor. mkdocstrings renders docstrings as Markdown, where a role is plain
text before a code span: the rendered page would show ``:class:`` in front of the name. This hook
drops the role and keeps the code span. It runs in the mkdocs build process, once per page.
"""

from __future__ import annotations

import re
from typing import Any

_ROLE = re.compile(r":(?:class|meth|func|exc|attr|mod|data|obj|py:\w+):(?=<code>)")


def on_page_content(html: str, **_: Any) -> str:
    return _ROLE.sub("", html)
