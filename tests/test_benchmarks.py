"""benchmarks/RESULTS.md is current: every section ran at (or after) the last change of its benchmark's code.

`benchmarks.common.record` stamps each section's marker with the commit it ran at,
`<!-- bench:NAME sha=SHA -->`. A section whose sha is missing, dirty (uncommitted benchmark or library code),
unknown to the repository, or older than the last commit touching `benchmarks/NAME.py` holds figures an
older version of the code measured: rerun it (`omnilab bench NAME`). Outside a git checkout, or in a shallow
clone (whose history cannot answer), the check is skipped.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from benchmarks import BENCHMARKS, NEEDS_CUDA
from benchmarks.common import RESULTS

ROOT = Path(__file__).resolve().parents[1]
SECTION = re.compile(r"<!-- bench:(\w+)(?: sha=(\S+))? -->")


def git(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True)


def sections(text: str) -> dict[str, str | None]:
    """{benchmark name: the sha its section marker records (None when it records none)}."""
    return {name: sha or None for name, sha in SECTION.findall(text)}


def stale(name: str, sha: str | None) -> str | None:
    """Why a section's recorded sha is not current for benchmarks/<name>.py, or None when it is."""
    if not sha:
        return "no sha recorded (rerun it: record() stamps the sha)"
    if sha.endswith("-dirty"):
        return f"ran on uncommitted code ({sha})"
    if git("cat-file", "-e", f"{sha}^{{commit}}").returncode:
        return f"sha {sha} is not a commit of this repository"
    last = git("log", "-1", "--format=%H", "--", f"benchmarks/{name}.py").stdout.strip()
    if last and git("merge-base", "--is-ancestor", last, sha).returncode:
        return f"ran at {sha[:12]}, before the last change of benchmarks/{name}.py ({last[:12]})"
    return None


@pytest.fixture(scope="module")
def full_history() -> None:
    if git("rev-parse", "--is-inside-work-tree").returncode:
        pytest.skip("not a git checkout")
    if git("rev-parse", "--is-shallow-repository").stdout.strip() == "true":
        pytest.skip("a shallow clone cannot tell which commit is older")


def test_every_benchmark_has_a_section_with_a_current_sha(full_history):
    recorded = sections(RESULTS.read_text())
    # a benchmark that needs CUDA has a section only once it ran on a GPU machine (`omnilab bench gpu`)
    missing, extra = set(BENCHMARKS) - set(recorded) - NEEDS_CUDA, set(recorded) - set(BENCHMARKS)
    assert not missing and not extra, f"RESULTS.md lacks sections for {missing}; has unregistered {extra}"
    problems = {name: why for name, sha in recorded.items() if (why := stale(name, sha))}
    assert not problems, problems


def test_a_sha_older_than_the_benchmark_change_is_stale(full_history):
    # The commit before the last change of a benchmark is older than that change; the change itself is not.
    last = git("log", "-1", "--format=%H", "--", "benchmarks/common.py").stdout.strip()
    parent = git("rev-parse", f"{last}^").stdout.strip()
    assert stale("common", last) is None
    assert "before the last change" in stale("common", parent)
    assert "uncommitted" in stale("common", last + "-dirty")
    assert "no sha" in stale("common", None)
    assert sections("<!-- bench:a sha=abc -->\n<!-- /bench:a -->\n<!-- bench:b -->") == {
        "a": "abc",
        "b": None,
    }
