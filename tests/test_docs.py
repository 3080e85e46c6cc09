"""The project's text stays a guide: sizes within bounds, links that resolve, and words about the project only."""

import re
from pathlib import Path

import pytest
from conftest import REPO_ROOT

README = REPO_ROOT / "README.md"
DOCS = REPO_ROOT / "docs"
# Text that speaks of how the project was worked on rather than of the project: numbered work periods, borrowed
# machines, tracker numbers.
NOT_THE_PROJECT = re.compile(
    r"\b(first|second|third|fourth|fifth|sixth|seventh|eighth|ninth|tenth|eleventh|twelfth|thirteenth|\d+(st|nd|rd|th))"
    r" session\b|\blent\b|\bleased?\b|\bleases\b|\bissues? #?\d+|\.gpu/work", re.IGNORECASE)
TEXT_SUFFIXES = {".py", ".md", ".sh", ".toml"}


def project_text_files() -> list[Path]:
    skipped = {".git", "build", "runs", "__pycache__", ".pytest_cache", ".hypothesis", "exports", ".train"}
    return [path for path in REPO_ROOT.rglob("*")
            if path.suffix in TEXT_SUFFIXES and path.is_file() and not skipped & set(path.relative_to(REPO_ROOT).parts)
            and not path.relative_to(REPO_ROOT).parts[0].endswith(".egg-info")] + [REPO_ROOT / ".ci" / "run"]


def test_sizes():
    assert len(README.read_text()) <= 10_000
    assert len((DOCS / "results.md").read_text()) <= 40_000
    assert sum(path.stat().st_size for path in DOCS.rglob("*") if path.is_file()) <= 1_500_000


def test_the_text_speaks_of_the_project_alone():
    offending = [f"{path.relative_to(REPO_ROOT)}:{number}: {line.strip()}"
                 for path in project_text_files() if path != Path(__file__)
                 for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1)
                 if NOT_THE_PROJECT.search(line)]
    assert not offending, "\n".join(offending)


@pytest.mark.parametrize("page", [README, *sorted(DOCS.glob("*.md"))], ids=lambda path: path.name)
def test_links_and_cited_files_exist(page):
    text = page.read_text()
    targets = re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", text)  # markdown links, anchors dropped
    targets = [t for t in targets if "://" not in t]
    missing = [t for t in targets if not (page.parent / t).exists()]
    cited = re.findall(r"`(docs/runs/[^`]+?)/?`", text)  # raw files that a table cites
    missing += [c for c in cited if not (REPO_ROOT / c).exists()]
    assert not missing, missing


def test_every_raw_run_folder_is_cited():
    results = (DOCS / "results.md").read_text()
    uncited = [path.name for path in (DOCS / "runs").iterdir() if f"docs/runs/{path.name}" not in results]
    assert not uncited, uncited
