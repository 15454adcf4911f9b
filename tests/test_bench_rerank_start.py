"""bench/bench_rerank_start.py: the held-out rows that say whether a reranker start learns."""

from __future__ import annotations

import json

import pytest

from conftest import bench_module


@pytest.fixture(scope="module")
def bench():
    yield from bench_module("bench_rerank_start")


def test_held_out_rows_share_no_query_with_training_and_are_the_same_every_run(tmp_path, bench):
    """Bug caught: a split by row rather than by query (a held-out query's other positive trained on: the held-out
    figure would measure memory), or a split that changes between arms and seeds (their figures would not compare)."""
    rows = [{"query": f"q{i // 2}", "positive": f"p{i}", "negatives": [f"n{i}"]} for i in range(80)]
    source = tmp_path / "rows.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    train, held = bench.split_rows(source, tmp_path)
    trained = [json.loads(line) for line in train.read_text().splitlines()]
    assert {r["query"] for r in trained}.isdisjoint({r["query"] for r in held})
    assert len(trained) + len(held) == 80 and len({r["query"] for r in held}) == 6  # 15% of 40 queries
    assert bench.split_rows(source, tmp_path)[1] == held
    assert bench.summarize([0, 0, 1, 7]) == {"first": 0.5, "mrr": (1 + 1 + 0.5 + 0.125) / 4}


@pytest.fixture(scope="module")
def bench_rerank():
    yield from bench_module("bench_rerank")


def test_bench_rerank_names_every_seeds_files_apart(tmp_path, bench_rerank):
    """Bug caught: a model named with the lr as 0.0001, whose .result.json (with_suffix) lost the seed and the arm
    after the dot, so a second seed read the first one's result back under --resume."""
    names = {bench_rerank.model_path(tmp_path, "scifact", arm, seed).with_suffix(".result.json").name
             for arm in ("embedkit", "st") for seed in (42, 43)}
    assert len(names) == 4 and all(f"-lr{bench_rerank.SETTINGS['lr']:.0e}-" in n for n in names)
