#!/usr/bin/env python3
"""Checks the relative links of README.md and the book (docs/src).

Every relative link or image must point at a file that exists, and a
`#fragment` at a heading of the target Markdown file (the anchor mdBook and
GitHub give it), or at an explicit `id="..."`. A link from a book chapter
must stay inside docs/src, since only that directory is built into the book.
Every `{{#include path}}` must name an existing file. Links inside code
spans and fenced code blocks are not links and are skipped, and so are
absolute URLs (`https:`, `mailto:`, ...).

    python3 scripts/check_links.py            # README.md and docs/src/*.md
    python3 scripts/check_links.py FILE...    # these files only

Exits 1, listing each broken link as FILE:LINE: message, when any is broken.
"""

from __future__ import annotations

import re
import sys
import unicodedata
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BOOK_SRC = ROOT / "docs" / "src"

FENCE = re.compile(r"^\s*(```|~~~)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
CODE_SPAN = re.compile(r"(`+)(?:(?!\1).)+?\1")
# [text](target) and ![alt](target); the target may hold one level of
# balanced parentheses, and may be followed by a "title".
INLINE_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*<?([^()\s<>]*(?:\([^()\s]*\)[^()\s<>]*)*)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE_DEF = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+.*)?$")
INCLUDE = re.compile(r"(?<!\\)\{\{#include\s+([^}\s:]+)(?::[^}]*)?\s*\}\}")
HTML_ID = re.compile(r"""\bid\s*=\s*["']([^"']+)["']""")
SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")


def slug(text: str) -> str:
    """The anchor of a heading, as mdBook and GitHub write it."""
    text = CODE_SPAN.sub(lambda m: m.group(0).strip("`"), text)
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", text)  # links: their text
    text = re.sub(r"<[^>]+>", "", text)  # inline HTML tags
    out = []
    for ch in text.strip().lower():
        if ch.isalnum() or ch in "-_":
            out.append(ch)
        elif ch.isspace():
            out.append("-")
        elif unicodedata.category(ch).startswith("M"):
            out.append(ch)
    return "".join(out)


def lines_outside_code(text: str):
    """(line number, line) for each line outside fenced code blocks."""
    fence = None
    for number, line in enumerate(text.split("\n"), 1):
        m = FENCE.match(line)
        if m:
            if fence is None:
                fence = m.group(1)
            elif line.strip().startswith(fence):
                fence = None
            continue
        if fence is None:
            yield number, line


def anchors(path: Path, cache: dict[Path, set[str]]) -> set[str]:
    if path not in cache:
        found: set[str] = set()
        seen: dict[str, int] = {}
        text = path.read_text(encoding="utf-8")
        for _, line in lines_outside_code(text):
            m = HEADING.match(line)
            if m:
                base = slug(m.group(2))
                n = seen.get(base, 0)
                seen[base] = n + 1
                found.add(base if n == 0 else f"{base}-{n}")
            found.update(HTML_ID.findall(line))
        cache[path] = found
    return cache[path]


def links(text: str):
    """(line number, target) of every link, image and reference definition."""
    for number, line in lines_outside_code(text):
        bare = CODE_SPAN.sub("", line)
        for m in INLINE_LINK.finditer(bare):
            yield number, m.group(1)
        m = REFERENCE_DEF.match(bare)
        if m:
            yield number, m.group(1)


def check(path: Path, cache: dict[Path, set[str]]) -> tuple[list[str], int]:
    """The broken links of one file, and how many relative links it has."""
    problems = []
    count = 0
    text = path.read_text(encoding="utf-8")
    shown = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
    in_book = path.resolve().is_relative_to(BOOK_SRC)

    for number, line in enumerate(text.split("\n"), 1):
        for target in INCLUDE.findall(line):
            if not (path.parent / target).is_file():
                problems.append(f"{shown}:{number}: include of a missing file: {target}")

    for number, target in links(text):
        if not target or SCHEME.match(target) or target.startswith("//"):
            continue
        count += 1
        file_part, _, fragment = target.partition("#")
        dest = (path.parent / file_part).resolve() if file_part else path.resolve()
        if file_part:
            if not dest.exists():
                problems.append(f"{shown}:{number}: missing file: {target}")
                continue
            if in_book and not dest.is_relative_to(BOOK_SRC):
                problems.append(f"{shown}:{number}: leaves docs/src, so not in the built book: {target}")
                continue
        if fragment:
            if dest.is_dir() or dest.suffix.lower() != ".md":
                problems.append(f"{shown}:{number}: an anchor into a file that is not Markdown: {target}")
            elif fragment not in anchors(dest, cache):
                problems.append(f"{shown}:{number}: no heading for #{fragment} in {dest.name}: {target}")
    return problems, count


def main(argv: list[str]) -> int:
    if argv:
        files = [Path(a).resolve() for a in argv]
    else:
        files = [ROOT / "README.md", *sorted(BOOK_SRC.rglob("*.md"))]
    cache: dict[Path, set[str]] = {}
    problems: list[str] = []
    count = 0
    for f in files:
        found, n = check(f, cache)
        problems += found
        count += n
    for p in problems:
        print(p)
    if problems:
        print(f"{len(problems)} of {count} relative link(s) broken, in {len(files)} file(s)", file=sys.stderr)
        return 1
    print(f"links: {count} relative link(s) in {len(files)} file(s), none broken")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
