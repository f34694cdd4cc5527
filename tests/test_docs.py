"""The docs agree with the tree: docs/layout.md has one row per module, and links resolve.

* ``docs/layout.md``'s package table lists exactly the ``.py`` files under ``selfconsist/``
  (a row is a table line whose first cell is a backticked ``selfconsist/...py`` path);
* every relative link in ``README.md`` and ``docs/*.md`` (``[text](target)``, images and
  reference definitions included) points to a file or folder that exists. Web (``http(s)``),
  ``mailto:`` and in-page ``#anchor`` links are not checked, nor is the anchor of
  ``page.md#anchor``; links inside code blocks and code spans are not links.
"""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "selfconsist"
LAYOUT = ROOT / "docs" / "layout.md"

_ROW = re.compile(r"^\s*\|\s*`(selfconsist/[^`|]*\.py)`\s*\|")
_FENCE = re.compile(r"^\s*(```|~~~)")
_CODE_SPAN = re.compile(r"(`+).*?\1")
# [text](target) or ![alt](target), target optionally <...> and optionally followed by a title
_INLINE = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*(<[^>]*>|[^)\s]+)(?:\s+(?:\"[^\"]*\"|'[^']*'))?\s*\)")
_REFERENCE = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*(<[^>]*>|\S+)")
_EXTERNAL = re.compile(r"^(?:[a-zA-Z][a-zA-Z0-9+.\-]*:|//)")  # http:, https:, mailto:, ftp:, //host


def layout_rows(text: str) -> list[str]:
    """The module paths of the package table, in order."""
    return [m.group(1) for line in text.splitlines() if (m := _ROW.match(line))]


def package_modules() -> set[str]:
    return {p.relative_to(ROOT).as_posix() for p in PACKAGE.rglob("*.py")}


def test_layout_lists_every_module_once():
    rows = layout_rows(LAYOUT.read_text(encoding="utf-8"))
    modules = package_modules()
    missing = sorted(modules - set(rows))
    extra = sorted(set(rows) - modules)
    repeated = sorted({r for r in rows if rows.count(r) > 1})
    problems = []
    if missing:
        problems.append("modules without a row in docs/layout.md:\n  " + "\n  ".join(missing))
    if extra:
        problems.append("rows in docs/layout.md for modules that do not exist:\n  " + "\n  ".join(extra))
    if repeated:
        problems.append("modules with more than one row in docs/layout.md:\n  " + "\n  ".join(repeated))
    assert not problems, "\n".join(problems)


def links(text: str) -> list[tuple[int, str]]:
    """(line number, target) of every link outside code, in order."""
    out: list[tuple[int, str]] = []
    in_fence = False
    for n, line in enumerate(text.splitlines(), 1):
        if _FENCE.match(line):
            in_fence = not in_fence
            continue
        if in_fence:
            continue
        line = _CODE_SPAN.sub("", line)
        out += [(n, m.group(1)) for m in _INLINE.finditer(line)]
        if m := _REFERENCE.match(line):
            out.append((n, m.group(1)))
    return [(n, t[1:-1] if t.startswith("<") and t.endswith(">") else t) for n, t in out]


def broken_links(page: Path) -> list[str]:
    bad = []
    for n, target in links(page.read_text(encoding="utf-8")):
        if not target or target.startswith("#") or _EXTERNAL.match(target):
            continue
        path = unquote(re.split(r"[#?]", target, maxsplit=1)[0])
        if not path:
            continue
        resolved = (ROOT / path.lstrip("/")) if path.startswith("/") else (page.parent / path)
        if not resolved.exists():
            bad.append(f"{page.relative_to(ROOT).as_posix()}:{n}: {target}")
    return bad


def test_links_parse():
    text = ("[a](docs/x.md) ![b](img/y.png \"t\") [c](x.md#anchor) [d](#only) [e](https://e.org)\n"
            "`[f](in-code.md)` [g](<with space.md>)\n```\n[h](fenced.md)\n```\n[i]: ../ref.py\n")
    assert [t for _, t in links(text)] == [
        "docs/x.md", "img/y.png", "x.md#anchor", "#only", "https://e.org", "with space.md", "../ref.py"]


def test_relative_links_resolve():
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    bad = [entry for page in pages for entry in broken_links(page)]
    assert not bad, f"{len(bad)} relative link(s) point to no file:\n  " + "\n  ".join(bad)
