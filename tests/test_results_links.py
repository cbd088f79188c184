"""Every relative link of ``benchmarks/RESULTS.md`` and of the per-area result pages
points at an existing file and, with ``#anchor``, at a heading of that file (GitHub's
anchor rule); every area page is linked from the summary."""

from __future__ import annotations

import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SUMMARY = os.path.join(ROOT, "benchmarks", "RESULTS.md")
PAGES = os.path.join(ROOT, "benchmarks", "results")
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped (letters, digits,
    spaces, '-' and '_' kept), spaces to '-'."""
    text = re.sub(r"`", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: str) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    fenced = False
    for line in open(path, encoding="utf-8"):
        if line.startswith("```"):
            fenced = not fenced
        m = None if fenced else re.match(r"#{1,6} (.*)", line)
        if m:
            s = slug(m.group(1))
            n = seen.get(s, 0)
            seen[s] = n + 1
            out.add(s if n == 0 else f"{s}-{n}")
    return out


def links(path: str) -> list[str]:
    text = re.sub(r"`[^`\n]*`", "", open(path, encoding="utf-8").read())  # no links in code spans
    return [t for t in LINK.findall(text) if not re.match(r"[a-z]+:", t)]


def pages() -> list[str]:
    return [SUMMARY] + sorted(os.path.join(PAGES, f) for f in os.listdir(PAGES) if f.endswith(".md"))


def test_slug_follows_github():
    assert slug("The testbeds' measure on the digits model: ODE error at NFE 5") == (
        "the-testbeds-measure-on-the-digits-model-ode-error-at-nfe-5"
    )
    assert slug("The main job: `jdiff bench` (issue 9)") == "the-main-job-jdiff-bench-issue-9"


@pytest.mark.parametrize("path", pages(), ids=os.path.basename)
def test_every_relative_link_resolves(path):
    for target in links(path):
        file, _, anchor = target.partition("#")
        dest = os.path.normpath(os.path.join(os.path.dirname(path), file)) if file else path
        assert os.path.exists(dest), f"{os.path.relpath(path, ROOT)}: {target}: no file {dest}"
        if anchor:
            assert anchor in anchors(dest), f"{os.path.relpath(path, ROOT)}: {target}: no heading #{anchor}"


def test_every_area_page_is_linked_from_the_summary():
    linked = {os.path.normpath(os.path.join(os.path.dirname(SUMMARY), t.partition("#")[0])) for t in links(SUMMARY)}
    for page in pages()[1:]:
        assert page in linked, f"{os.path.relpath(page, ROOT)} is not linked from benchmarks/RESULTS.md"
