"""The repository is whole: comments and docstrings point only at files and doc anchors inside it.

Every formula and judgment call lives in `docs/` (docs/method.md, docs/design.md). A comment or
docstring in src/ that names a Markdown file must name one in the repository, and a `docs/X.md#anchor`
must name a heading of that page; Markdown links in README.md and docs/ are held to the same rule.
"""

from __future__ import annotations

import io
import re
import tokenize
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "mmdiff"

# a Markdown file named in prose: "NOTES.md", "docs/method.md#adapted-features", "../x/notes.md"
MD_REF = re.compile(r"(?<![\w/.-])((?:\.\./|[\w.-]+/)*[\w.-]+\.md)(#[\w-]+)?")
# places outside the repository that must never be pointed at
OUTSIDE = re.compile(r"\.\./shared\b|/work/shared\b|\bseeds?/\d|\bseed \d{3}\b")


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a Markdown heading: lower case, punctuation dropped, spaces -> '-'."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    found: set[str] = set()
    in_code = False
    for line in page.read_text(encoding="utf-8").splitlines():
        if line.startswith("```"):
            in_code = not in_code
        elif not in_code and (m := re.match(r"#{1,6}\s+(.*)", line)):
            found.add(github_anchor(m.group(1)))
    return found


def comments_and_strings(path: Path) -> list[tuple[int, str]]:
    """(line, text) of every comment and string literal (docstrings included) of a Python file."""
    src = path.read_text(encoding="utf-8")
    out = []
    for tok in tokenize.generate_tokens(io.StringIO(src).readline):
        if tok.type in (tokenize.COMMENT, tokenize.STRING):
            out.append((tok.start[0], tok.string))
        elif tok.type == getattr(tokenize, "FSTRING_MIDDLE", -1):
            out.append((tok.start[0], tok.string))
    return out


def check_reference(ref: str, anchor: str | None, base: Path) -> str | None:
    """None when `ref` (+ anchor) resolves inside the repository, else what is wrong."""
    for candidate in (base / ref, ROOT / ref, ROOT / "docs" / ref):
        target = candidate.resolve()
        if target.is_file() and target.is_relative_to(ROOT):
            if anchor and anchor[1:] not in anchors(target):
                return f"{ref}{anchor}: no such heading in {target.relative_to(ROOT)}"
            return None
    return f"{ref}: not a file in the repository (put what it says in docs/ and point there)"


def test_github_anchor_rule() -> None:
    assert github_anchor("Variance gap, decoder cosine (A)") == "variance-gap-decoder-cosine-a"
    assert github_anchor("Held-out metrics and spliced loss") == "held-out-metrics-and-spliced-loss"
    assert "adapted-features" in anchors(ROOT / "docs" / "method.md")


def test_check_reference_catches_outside_files_and_missing_anchors() -> None:
    assert check_reference("NOTES.md", None, SRC) is not None
    assert check_reference("docs/method.md", "#no-such-section", SRC) is not None
    assert check_reference("docs/method.md", "#task-features", SRC) is None


@pytest.mark.parametrize("path", sorted(SRC.rglob("*.py")), ids=lambda p: str(p.relative_to(SRC)))
def test_source_points_only_inside_the_repository(path: Path) -> None:
    problems = []
    for line, text in comments_and_strings(path):
        if m := OUTSIDE.search(text):
            problems.append(f"line {line}: {m.group(0)!r} points outside the repository")
        for m in MD_REF.finditer(text):
            if err := check_reference(m.group(1), m.group(2), path.parent):
                problems.append(f"line {line}: {err}")
    assert not problems, f"{path.relative_to(ROOT)}:\n" + "\n".join(problems)


@pytest.mark.parametrize(
    "page", [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))], ids=lambda p: p.name
)
def test_markdown_links_resolve(page: Path) -> None:
    text = page.read_text(encoding="utf-8")
    problems = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
            continue
        ref, _, anchor = target.partition("#")
        if not ref:  # a link into the same page
            if anchor not in anchors(page):
                problems.append(f"#{anchor}: no such heading")
        elif ref.endswith(".md") and (err := check_reference(ref, "#" + anchor if anchor else None, page.parent)):
            problems.append(err)
    if m := OUTSIDE.search(text):
        problems.append(f"{m.group(0)!r} points outside the repository")
    assert not problems, f"{page.relative_to(ROOT)}:\n" + "\n".join(problems)
