"""bench/bench_cpu_backends.py without the peer venv: the verdict and ratio arithmetic, round-robin timing, and the
worker protocol against bench/st_backend_worker.py's model-free `fake` backend (run under this interpreter)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import bench_cpu_backends as bench  # noqa: E402
import st_backend_worker  # noqa: E402


def test_speeds_and_ratios_use_the_median_and_st_torch():
    times = {"short": {"st-torch": [2.0, 1.0, 4.0], "embedkit-onnx-int8": [0.5, 0.5, 0.25]}}
    speed = bench.speeds(times, 100)
    assert speed["short"] == {"st-torch": 50.0, "embedkit-onnx-int8": 200.0}
    assert bench.ratios(speed["short"]) == {"st-torch": 1.0, "embedkit-onnx-int8": 4.0}
    assert bench.ratios({"embedkit-torch": 10.0}) == {"embedkit-torch": None}  # no reference: no ratio


def test_verdict_compares_the_fastest_of_each_side():
    speed = {"short": {"st-torch": 100.0, "st-onnx-qint8": 300.0, "st-openvino-qint8": 250.0,
                       "embedkit-torch": 110.0, "embedkit-openvino-int8": 360.0},
             "abstracts": {"st-torch": 10.0, "st-onnx-qint8": 30.0, "embedkit-openvino-int8": 31.0}}
    v = bench.verdict(speed)
    assert v["short"]["embedkit"] == "embedkit-openvino-int8" and v["short"]["st"] == "st-onnx-qint8"
    assert v["short"]["speedup"] == pytest.approx(1.2) and v["short"]["met"] is True
    assert v["abstracts"]["speedup"] == pytest.approx(31 / 30) and v["abstracts"]["met"] is False
    lines = bench.verdict_lines(v)
    assert "x1.20" in lines[0] and "met" in lines[0] and "NOT met" in lines[1]


def test_verdict_quality_needs_the_ndcg_bound_and_batch_independence():
    speed = {"short": {"st-torch": 100.0, "embedkit-onnx-int8": 200.0}}
    good = {"st-torch": {"ndcg_at_10": 0.650}, "embedkit-onnx-int8": {"ndcg_at_10": 0.646, "batch_vs_alone": 0.0}}
    assert bench.verdict(speed, good)["short"]["met"] is True
    drop = {**good, "embedkit-onnx-int8": {"ndcg_at_10": 0.640, "batch_vs_alone": 0.0}}
    assert bench.verdict(speed, drop)["short"]["met"] is False
    batchy = {**good, "embedkit-onnx-int8": {"ndcg_at_10": 0.650, "batch_vs_alone": 0.01}}
    assert bench.verdict(speed, batchy)["short"]["quality_met"] is False
    # without st-torch the fp32 reference is embedkit-torch
    ek_ref = {"embedkit-torch": {"ndcg_at_10": 0.650}, "embedkit-onnx-int8": {"ndcg_at_10": 0.647,
                                                                             "batch_vs_alone": 0.0}}
    assert bench.verdict(speed, ek_ref)["short"]["fp32"] == "embedkit-torch"


def test_verdict_without_one_side_is_not_decided():
    v = bench.verdict({"short": {"embedkit-torch": 10.0}})
    assert v["short"]["met"] is None and "no ST backend" in v["short"]["reason"]
    assert "not decided" in bench.verdict_lines(v)[0]


def test_openvino_bf16_backend_is_listed_and_skipped_without_bf16(tmp_path, monkeypatch):
    """Catches the bf16 OpenVINO backend missing from the record's default list, and one that runs (measuring f32
    under a bf16 name) on a CPU without avx512_bf16 / AMX instead of being skipped with the export's refusal."""
    pytest.importorskip("openvino")
    import embedkit.export.openvino as ov_export

    assert "embedkit-openvino-int8-bf16" in bench.BACKENDS
    assert bench.OPENVINO_PRECISIONS == {"embedkit-openvino-int8": "f32", "embedkit-openvino-int8-bf16": "bf16"}
    monkeypatch.setattr(ov_export, "cpu_instructions", lambda *a, **k: {"model": "Old Xeon", "instructions": ["avx2"]})
    found = bench.start_backends(["embedkit-openvino-int8-bf16"], str(tmp_path / "no-model"), tmp_path, 1,
                                 tmp_path / "no-venv")
    reason = found["embedkit-openvino-int8-bf16"]
    assert isinstance(reason, str) and reason.startswith("skipped: ModelError") and "avx512_bf16" in reason


def test_onnx_quant_config_follows_the_cpu_flags():
    assert st_backend_worker.onnx_quant_config({"avx2", "avx512f", "avx512_vnni"}) == "avx512_vnni"
    assert st_backend_worker.onnx_quant_config({"avx2", "avx512f"}) == "avx512"
    assert st_backend_worker.onnx_quant_config({"avx2"}) == "avx2"
    assert st_backend_worker.onnx_quant_config(set(), machine="aarch64") == "arm64"
    with pytest.raises(RuntimeError):
        st_backend_worker.onnx_quant_config(set(), machine="x86_64")


def _fake_worker(tmp_path: Path) -> bench.Worker:
    worker = bench.Worker("fake", sys.executable, "fake", str(tmp_path), tmp_path, threads=2)
    worker.wait_ready()
    return worker


def test_worker_protocol_with_the_fake_backend(tmp_path):
    worker = _fake_worker(tmp_path)
    try:
        assert worker.info["backend"] == "fake"
        texts = bench.TextSet("short", ["a", "bb", "ccc"], tmp_path)
        assert worker.time_pass(texts, 2) >= 0.0
        vectors = worker.encode(["x", "y", "x"], "document", 2)
        assert vectors.shape == (3, 8) and np.allclose(vectors[0], vectors[2])
        assert bench.batch_vs_alone(worker, ["p", "q"], 32) == 0.0
        with pytest.raises(bench.Unavailable, match="unknown cmd"):
            worker.request(cmd="nonsense")
        assert worker.time_pass(texts, 2) >= 0.0  # still serving after an error
    finally:
        worker.close()
    assert worker.proc.returncode == 0


def test_worker_that_cannot_load_reports_why(tmp_path):
    worker = bench.Worker("broken", sys.executable, "st-openvino-qint8", str(tmp_path / "missing"), tmp_path,
                          threads=2, worker=Path(__file__).resolve().parents[1] / "bench" / "no_such_worker.py")
    with pytest.raises(bench.Unavailable, match="exited with code"):
        worker.wait_ready()


def test_round_robin_times_every_backend_and_drops_a_failing_one(tmp_path):
    calls = []

    class Fake:
        def __init__(self, name, fail=False):
            self.name, self.fail = name, fail

        def time_pass(self, texts, batch_size):
            calls.append((self.name, texts.name))
            if self.fail:
                raise RuntimeError("boom")
            return 0.5

    sets = [bench.TextSet("short", ["a"], tmp_path), bench.TextSet("abstracts", ["b"], tmp_path)]
    skipped: dict[str, str] = {}
    times = bench.round_robin({"a": Fake("a"), "b": Fake("b"), "c": Fake("c", fail=True)}, sets, 32, 2, skipped,
                              settle_s=0.0)
    assert times["short"] == {"a": [0.5, 0.5], "b": [0.5, 0.5]} and times["abstracts"] == times["short"]
    assert "boom" in skipped["c"]
    # round 2 starts with the second backend
    assert [c[0] for c in calls if c[1] == "short"] == ["a", "b", "c", "b", "a"]


def test_table_prints_skipped_backends_with_their_reason():
    lines = bench.table(["st-torch", "st-onnx-qint8"], {"st-onnx-qint8": "skipped: no peer venv"},
                        {"short": {"st-torch": 100.0}}, None)
    assert "x1.00" in lines[1] and lines[2].endswith("skipped: no peer venv")
    assert json.dumps(lines)
