"""The docs agree with the tree: docs/layout.md has one row per module, and links resolve.

* ``docs/layout.md``'s package table lists exactly the ``.py`` files under ``selfconsist/``
  (a row is a table line whose first cell is a backticked ``selfconsist/...py`` path);
* every relative link in ``README.md``, ``docs/``, ``benchmarks/`` and ``examples/`` (``[text](target)``, images and
  reference definitions included) points to a file or folder that exists. Web (``http(s)``),
  ``mailto:`` links are not checked; links inside code blocks and code spans are not links;
* every ``#anchor`` of such a link, in-page or ``page.md#anchor``, names a heading of that page
  (GitHub's rule: the heading's text lowercased, punctuation dropped, spaces to hyphens, ``-1``,
  ``-2`` … for repeats) or an ``<a id="…">`` in it.
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


_HEADING = re.compile(r"^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
_HTML_ID = re.compile(r"<a\s+(?:id|name)=\"([^\"]+)\"")
_MD_LINK = re.compile(r"!?\[((?:[^\[\]]|\[[^\]]*\])*)\]\([^)]*\)")


def slug(heading: str) -> str:
    """GitHub's anchor for a heading's text: links reduced to their text, code spans to their
    content, then lowercased, everything but letters, digits, ``_``, ``-`` and spaces dropped,
    each space a hyphen."""
    text = _MD_LINK.sub(r"\1", heading).replace("`", "")
    return re.sub(r"[^\w\- ]", "", text.lower()).replace(" ", "-")


def anchors(text: str) -> set[str]:
    """Every anchor a page defines: its headings' slugs (repeats numbered) and HTML ids."""
    seen: dict[str, int] = {}
    out: set[str] = set()
    in_fence = False
    for line in text.splitlines():
        if _FENCE.match(line):
            in_fence = not in_fence
            continue
        if in_fence:
            continue
        out.update(_HTML_ID.findall(line))
        if m := _HEADING.match(line):
            s = slug(m.group(2))
            n = seen.get(s, 0)
            seen[s] = n + 1
            out.add(s if n == 0 else f"{s}-{n}")
    return out


def broken_links(page: Path) -> list[str]:
    bad = []
    for n, target in links(page.read_text(encoding="utf-8")):
        if not target or _EXTERNAL.match(target):
            continue
        path, _, anchor = unquote(target.split("?", 1)[0]).partition("#")
        resolved = page if not path else (
            (ROOT / path.lstrip("/")) if path.startswith("/") else (page.parent / path))
        where = f"{page.relative_to(ROOT).as_posix()}:{n}: {target}"
        if not resolved.exists():
            bad.append(where)
        elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved.read_text(encoding="utf-8")):
            bad.append(where + " (no such heading)")
    return bad


def test_links_parse():
    text = ("[a](docs/x.md) ![b](img/y.png \"t\") [c](x.md#anchor) [d](#only) [e](https://e.org)\n"
            "`[f](in-code.md)` [g](<with space.md>)\n```\n[h](fenced.md)\n```\n[i]: ../ref.py\n")
    assert [t for _, t in links(text)] == [
        "docs/x.md", "img/y.png", "x.md#anchor", "#only", "https://e.org", "with space.md", "../ref.py"]


def test_slugs_follow_github():
    assert slug("bf16 for `train` (Zen 4, 2026-12-03)") == "bf16-for-train-zen-4-2026-12-03"
    assert slug("Speed, against the [official](x.md) code: ≥ 1.2×") == "speed-against-the-official-code--12"
    assert anchors("# A\n## A\n```\n# A\n```\n<a id=\"x\"></a>\n") == {"a", "a-1", "x"}


def test_relative_links_resolve():
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")),
             *sorted((ROOT / "benchmarks").glob("*.md")), *sorted((ROOT / "examples").rglob("*.md"))]
    bad = [entry for page in pages for entry in broken_links(page)]
    assert not bad, f"{len(bad)} relative link(s) point to no file or heading:\n  " + "\n  ".join(bad)
