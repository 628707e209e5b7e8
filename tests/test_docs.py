"""The README and docs/ against the repository: every path and link they name exists, the README
stays a user's five-minute read, and the numbers they state about the code are the code's."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from test_architecture import MAX_LINES, MAX_PARAMS

from ftcore.inputs.batch_checks import MAX_STEPS

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parent.parent
README_MAX_LINES = 250
# a backticked repository path: a top-level folder or file of the project, or a docs/ page by name
PATH_RE = re.compile(r"`((?:ftcore|tests|bench|scripts|docs|\.ci|\.benchmarks)/[\w./-]*|[\w-]+\.md)`")
LINK_RE = re.compile(r"\]\(([^)#\s]+)\)")
RUN_OUTPUTS = {"report.md"}  # files a compare writes into its run folder, named by the docs


def documents(root: Path = ROOT) -> list[Path]:
    return [root / "README.md", *sorted((root / "docs").glob("*.md"))]


def missing_paths(doc: Path, root: Path = ROOT) -> list[str]:
    """Paths a document names in backticks or links that do not exist. A bare `name.md` is a page
    of docs/ (or the top level); paths with placeholders (`<backend>`, `*`) are skipped."""
    text = doc.read_text()
    names = [m for m in PATH_RE.findall(text) if "<" not in m and "*" not in m and m not in RUN_OUTPUTS]
    names += [m for m in LINK_RE.findall(text) if "://" not in m]
    out = []
    for name in names:
        candidates = [root / name, doc.parent / name, root / "docs" / name]
        if not any(c.exists() for c in candidates):
            out.append(f"{doc.relative_to(root)}: {name}")
    return out


def test_every_path_and_link_the_docs_name_exists() -> None:
    assert sum(len(PATH_RE.findall(d.read_text())) for d in documents()) > 50  # the scan sees them
    assert [m for d in documents() for m in missing_paths(d)] == []


def test_path_check_sees_a_missing_page(tmp_path: Path) -> None:
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.md").write_text("see `b.md` and [c](c.md)\n")
    (tmp_path / "README.md").write_text("`docs/a.md`, `ftcore/gone.py`\n")
    found = [m for d in documents(tmp_path) for m in missing_paths(d, tmp_path)]
    assert found == ["README.md: ftcore/gone.py", "docs/a.md: b.md", "docs/a.md: c.md"]


def test_the_readme_is_short_and_opens_with_the_two_commands() -> None:
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines; detail belongs in docs/"
    first_block = lines[lines.index("```bash") + 1 : lines.index("```")]
    assert first_block[0].startswith("bash scripts/setup.sh && .venv/bin/ftcore compare")
    assert "pytest tests/" in first_block[1] and "pytest bench/ --bench-quick" in first_block[1]


def stated(pattern: str) -> set[int]:
    """Every number the README and docs/ state in `pattern` (one group: the number)."""
    return {int(n.replace(",", "")) for d in documents() for n in re.findall(pattern, d.read_text())}


def test_numbers_the_docs_state_about_the_code_are_the_code_s() -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("root_conftest", ROOT / "conftest.py")  # not bench/'s
    root_conftest = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(root_conftest)
    assert stated(r"modules? (?:at most|over) (\d+) lines") == {MAX_LINES}
    assert stated(r"functions at most (\d+) parameters") == {MAX_PARAMS}
    assert stated(r"at most ([\d,]+) steps") == {MAX_STEPS}
    testing = (ROOT / "docs" / "testing.md").read_text()
    assert set(re.findall(r"^\| `(\w+)` \|", testing, flags=re.M)) == set(root_conftest.TIERS)
