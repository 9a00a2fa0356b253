"""The documentation references only files that exist: every relative Markdown link in README.md and docs/*.md,
and every `code span` that names a path inside the repository (its first component is a tracked top-level file
or directory), resolves to a file or directory of this checkout."""
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
CODE = re.compile(r"`([^`\n]+)`")
PATH_CHARS = re.compile(r"^[\w.\-/]+$")


def top_level() -> set:
    """Tracked top-level names (git when available, else what is on disk), so that build outputs such as build/
    do not count as repository paths."""
    try:
        files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
        names = {f.split("/")[0] for f in files.splitlines()}
    except (OSError, subprocess.CalledProcessError):
        names = set()
    return names or {p.name for p in ROOT.iterdir() if not p.name.startswith(("build", ".venv"))}


def references(doc: Path, tops: set):
    """(line, text, resolved path) of every repository reference in doc."""
    for n, line in enumerate(doc.read_text().splitlines(), 1):
        for target in LINK.findall(line):
            if re.match(r"^[a-z]+:", target) or target.startswith("#"):
                continue  # URLs and anchors
            yield n, target, (doc.parent / target.split("#")[0]).resolve()
        for span in CODE.findall(line):
            for token in span.split():
                token = token.rstrip(".,:;)")
                first = token.split("/")[0]
                if not PATH_CHARS.match(token) or first not in tops or token in tops and "/" not in token \
                        and "." not in token:
                    continue
                yield n, token, (ROOT / token).resolve()


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_docs_reference_only_existing_files(doc):
    tops = top_level()
    missing = [f"{doc.relative_to(ROOT)}:{n}: {text}" for n, text, path in references(doc, tops)
               if not path.exists()]
    assert not missing, "references to files that do not exist:\n" + "\n".join(missing)


def test_the_scan_finds_references(tmp_path):
    """The scanner is not vacuous: it sees the links and code paths the README is known to have, and flags a
    reference to a file that does not exist."""
    found = {text for _, text, _ in references(ROOT / "README.md", top_level())}
    assert {"docs/semantics.md", "include/tilewise/tilewise.h", "bench/bench_e2e.py"} <= found, found
    fake = tmp_path / "doc.md"
    fake.write_text("See [the kernel](docs/hopper_kernel.md), `src/core/no_such_file.cpp` and `python/tilewise/`.\n")
    refs = [(text, path.exists()) for _, text, path in references(fake, top_level())]
    assert ("src/core/no_such_file.cpp", False) in refs and ("python/tilewise/", True) in refs


def test_environment_variables_are_documented():
    text = "\n".join(d.read_text() for d in DOCS)
    for variable in ("TILEWISE_LIBRARY", "TILEWISE_NUM_THREADS"):
        assert f"`{variable}`" in text, variable
