"""MkDocs hook: render the Sphinx roles of lam_plugin's docstrings.

The docstrings cite other objects the Sphinx way, ``:class:`~lam_plugin.index.UncertainIndex```,
``:meth:`fit```. mkdocstrings (Google style) leaves the role in front of the code span,
so the page would read ":class:UncertainIndex". This hook drops the role, shortens a
``~``-prefixed name to its last part as Sphinx does, and links fully qualified
``lam_plugin`` names to their reference entry where the site has one (an optional
cross-reference: a name the site does not document stays plain code, without a warning).
"""

from __future__ import annotations

import re
from typing import Any

_ROLE = re.compile(r":(?:py:)?(?:class|meth|func|mod|data|attr|exc|obj|const):<code>(~?)([^<]+)</code>")


def _replace(match: re.Match[str]) -> str:
    tilde, target = match.group(1), match.group(2).strip()
    shown = target.rsplit(".", 1)[-1] if tilde else target
    if target.startswith("lam_plugin."):
        return f'<autoref identifier="{target}" optional><code>{shown}</code></autoref>'
    return f"<code>{shown}</code>"


def on_page_content(html: str, **kwargs: Any) -> str:
    """Rewrite the roles in a page's HTML (before autorefs resolves cross-references)."""
    return _ROLE.sub(_replace, html)
