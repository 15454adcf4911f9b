"""The documentation site (mkdocs.yml, docs/) builds with `mkdocs build --strict`, and the README stays short.

Strict makes every mkdocs warning an error, and mkdocs.yml's `validation` turns the ones that matter into warnings:
a link to a page or file that does not exist, a link to a missing anchor, and a page in docs/ missing from the nav.
The benchmark pages are generated from bench/records/ by docs/gen_bench.py (a mkdocs hook) during the build.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO

README_MAX_LINES = 260


def build(config: Path, site: Path) -> subprocess.CompletedProcess:
    if importlib.util.find_spec("material") is None:  # the dev extra installs it; a skip would hide a broken site
        pytest.fail("mkdocs-material is not installed: pip install -e '.[dev]' (scripts/setup.sh does)")
    return subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(config),
                           "--site-dir", str(site)], cwd=config.parent, capture_output=True, text=True,
                          env={**os.environ, "NO_MKDOCS_2_WARNING": "1"}, timeout=300)


def problems(result: subprocess.CompletedProcess) -> list[str]:
    return [line for line in result.stderr.splitlines() if "WARNING" in line or "ERROR" in line]


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    site = tmp_path_factory.mktemp("site")
    result = build(REPO / "mkdocs.yml", site)
    found = problems(result)
    assert result.returncode == 0 and not found, (
        "mkdocs build --strict failed: a broken link or anchor, or a page missing from the nav in mkdocs.yml:\n"
        + "\n".join(found or result.stderr.splitlines()[-20:]))
    return site


def test_site_builds_strict_without_warnings(site):
    """Every page of the nav is built (the moved README sections, the quickstart, the generated benchmarks)."""
    for page in ("index.html", "quickstart/index.html", "tune/index.html", "gpu/index.html",
                 "benchmarks/index.html", "benchmarks/tune/index.html", "benchmarks/eval/index.html"):
        assert (site / page).is_file(), page


def test_benchmark_pages_come_from_the_records(site):
    """The generated tables hold the records' numbers: per seed and mean +- sd for every arm, the base scores."""
    tune = (site / "benchmarks" / "tune" / "index.html").read_text(encoding="utf-8")
    for name in ("scifact", "medquad"):
        d = json.loads((REPO / "bench" / "records" / "tune" / f"{name}.json").read_text())["datasets"][name]
        assert f"{d['base']['ndcg_at_10']:.4f}" in tune
        for arm in ("default", "st", "tuned"):
            assert f"{d[arm]['ndcg_at_10']:.4f} +- {d[arm]['ndcg_at_10_sd']:.4f}" in tune, (name, arm)
            assert " / ".join(f"{r['ndcg_at_10']:.4f}" for r in d[arm]["runs"]) in tune, (name, arm)
    ev = (site / "benchmarks" / "eval" / "index.html").read_text(encoding="utf-8")
    metrics = json.loads((REPO / "bench/records/eval/minilm-base.json").read_text())["values"]["tasks"]
    assert f"{metrics['stsb']['metrics']['cosine_spearman']:.4f}" in ev


@pytest.mark.parametrize("bug, message", [("broken link", "but the target is not found"),
                                          ("broken anchor", "does not contain an anchor"),
                                          ("page missing from the nav", "not included in the \"nav\"")])
def test_strict_build_fails_on_the_bugs_it_guards(tmp_path, bug, message):
    """The guard itself: a copy of the site with one bug planted does not build."""
    shutil.copy(REPO / "mkdocs.yml", tmp_path / "mkdocs.yml")
    shutil.copytree(REPO / "docs", tmp_path / "docs")
    page = tmp_path / "docs" / "data.md"
    if bug == "broken link":
        page.write_text(page.read_text() + "\nSee [the gone page](gone.md).\n")
    elif bug == "broken anchor":
        page.write_text(page.read_text() + "\nSee [train](train.md#no-such-heading).\n")
    else:
        (tmp_path / "docs" / "orphan.md").write_text("# Orphan\n")
    result = build(tmp_path / "mkdocs.yml", tmp_path / "site")
    assert result.returncode != 0 and any(message in line for line in problems(result)), result.stderr[-2000:]


def test_readme_is_short():
    """The README is the front page (what, for whom, two commands, the ten-minute path, one results table, where
    next); everything else lives in docs/."""
    lines = (REPO / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, (f"README.md has {len(lines)} lines (at most {README_MAX_LINES}): "
                                            "move the detail to a page under docs/")
