"""Sphinx configuration: Markdown pages (MyST), the furo theme, nothing loaded from the internet.

Built strict by ``make docs`` (``sphinx-build -W --keep-going -n``), which ``make test`` runs;
``tests/test_docs.py`` checks the built HTML names no http(s) asset.
"""

from __future__ import annotations

project = "tlserve"
author = "the tlserve authors"
extensions = ["myst_parser"]
source_suffix = {".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "_generated", "gen.py", "__init__.py"]  # _generated/: fragments the pages include
myst_heading_anchors = 3  # [text](page.md#a-heading) links are checked
myst_enable_extensions = ["colon_fence"]
suppress_warnings: list[str] = []
html_theme = "furo"
html_title = "tlserve"
html_static_path: list[str] = []
html_show_sourcelink = False
html_copy_source = False
# Offline: furo uses the system font stack (no web fonts); MathJax is only added to pages with math (none; the
# dollarmath extension is off), no analytics, no CDN. tests/test_docs.py checks the built HTML.
html_theme_options = {"navigation_with_keys": True}
