"""bench/gpu_check.py without a GPU and without training: the CUDA-missing error, row selection, the deadline and
the table. (The check itself runs on a GPU, or with `--device cpu --quick`; neither belongs in CI.)"""

from __future__ import annotations

import json

import pytest

@pytest.fixture(scope="module")
def gc():
    from conftest import bench_module

    yield from bench_module("gpu_check")


def test_cuda_missing_is_a_one_line_error_and_runs_nothing(gc, monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(gc, "cuda_status", lambda: (False, 0, "torch 2.13.0, a CPU-only build"))
    out = tmp_path / "report"
    assert gc.main(["--rows", "1,2", "--out", str(out)]) == 2  # --device defaults to cuda
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in captured.err
    assert lines[0].startswith("error: --device cuda: CUDA is not available on this machine (torch 2.13.0, a CPU")
    assert "--device cpu --quick" in lines[0]
    assert not out.exists()


def test_device_errors(gc):
    one_gpu = lambda: (True, 1, "torch 2.11.0, CUDA 13.0")  # noqa: E731
    assert gc.device_error("cuda", one_gpu) is None
    assert gc.device_error("cuda:0", one_gpu) is None
    assert gc.device_error("cpu", lambda: pytest.fail("cpu needs no CUDA probe")) is None
    assert gc.device_error("cuda:3", one_gpu) == "error: --device cuda:3: only 1 GPU(s) are visible"
    assert gc.device_error("tpu", one_gpu).startswith("error: --device: unknown device 'tpu'")


def test_row_selection(gc, capsys):
    assert gc.parse_rows("1,2,5") == [1, 2, 5]
    assert gc.parse_rows(" 5, 1,5 ") == [1, 5]
    assert gc.parse_rows("2-4") == [2, 3, 4]
    assert gc.parse_rows("all") == gc.parse_rows(None) == [1, 2, 3, 4, 5, 6, 7, 8]
    assert gc.parse_rows("7-8") == [7, 8]
    for bad, words in (("9", "no row '9'"), ("x", "'x' is not a row number"), ("4-2", "no row '4-2'"), (",", "no row")):
        with pytest.raises(gc.CheckError) as info:
            gc.parse_rows(bad)
        assert words in info.value.one_line()
    assert gc.main(["--rows", "9", "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: field 'rows': --rows: no row '9' (rows are 1-8)"]


def test_deadline_skips_late_rows_and_a_failing_row_does_not_stop_the_others(gc):
    now = [0.0]
    spent = {1: 30.0, 2: 100.0, 3: 200.0, 4: 130.0}
    called = []

    def runner(row, left):
        called.append((row, left))
        now[0] += spent.get(row, 10.0)
        if row == 2:
            raise RuntimeError("CUDA out of memory\nTried to allocate 2 GiB")
        if row == 3:
            return gc.RowResult(3, gc.ROW_NAMES[3], "fail", "2/20 steps")
        return gc.RowResult(row, gc.ROW_NAMES[row], "pass", "ok")

    lines = []
    results = gc.run_rows([1, 2, 3, 4, 5, 6], runner, budget_s=480.0, clock=lambda: now[0], say=lines.append)
    assert [r.row for r in results] == [1, 2, 3, 4, 5, 6]
    assert [row for row, _ in called] == [1, 2, 3, 4]
    assert [r.status for r in results] == ["pass", "fail", "fail", "pass", "skipped", "skipped"]
    assert results[1].result == "RuntimeError: CUDA out of memory" and results[1].seconds == 100.0
    assert called[3][1] == pytest.approx(150.0)  # the time left is handed to the row
    assert results[4].result == "skipped: time budget (20 s left, needs >= 30 s)"
    assert results[5].result == "skipped: time budget (20 s left, needs >= 120 s)"
    assert len(lines) == 6 and "row 2" in lines[1] and "fail" in lines[1]


def test_table_markdown_and_json(gc, tmp_path):
    rows = [gc.RowResult(1, gc.ROW_NAMES[1], "pass", "200 texts: cosine min 0.9999998", 12.34, {"min_cosine": 0.9999998}),
            gc.RowResult(4, gc.ROW_NAMES[4], "fail", "max |diff| 3.1e-04 (pass: <= 1e-05)", 101.0),
            gc.RowResult(6, gc.ROW_NAMES[6], "skipped", "skipped: vllm not importable", 0.0)]
    table = gc.format_table(rows, title="embedkit GPU check", total_s=113.4).splitlines()
    assert table[0] == "embedkit GPU check"
    assert table[1].split()[:3] == ["#", "check", "status"]
    assert set(table[2].replace(" ", "")) == {"-"}
    at = table[1].index("status")  # the columns are aligned
    assert [line[at:].split()[0] for line in table[3:6]] == ["pass", "fail", "skipped"]
    assert table[3].split("  ")[0] == "1" and "12.3" in table[3] and table[3].endswith("cosine min 0.9999998")
    assert "skipped" in table[5] and table[5].endswith("skipped: vllm not importable")
    assert table[-1] == "total 113.4 s: 1 pass, 1 fail, 1 skipped"
    paths = gc.write_report(tmp_path, rows, {"title": "embedkit GPU check", "total_s": 113.4})
    md = paths["md"].read_text()
    assert "| 4 | ZeRO-3 + QLoRA kill / resume | fail | 101.0 | max \\|diff\\| 3.1e-04 (pass: <= 1e-05) |" in md
    data = json.loads(paths["json"].read_text())
    assert [r["status"] for r in data["rows"]] == ["pass", "fail", "skipped"]
    assert data["rows"][0]["numbers"] == {"min_cosine": 0.9999998}


def test_helpers(gc, tmp_path):
    texts = gc.builtin_texts(200)
    assert len(texts) == 200 and len(set(texts)) > 150 and max(len(t.split()) for t in texts) > 256
    assert gc.vllm_skip_reason("cpu") == "skipped: vLLM needs CUDA (--device cpu)"
    assert gc.vllm_skip_reason("cuda", find_spec=lambda name: None) == "skipped: vllm not importable"
    assert gc.vllm_skip_reason("cuda", find_spec=lambda name: object()) is None
    assert gc.error_line("loading\nerror: recipe.yaml:3: field 'x': bad\nTraceback ...\n") == \
        "error: recipe.yaml:3: field 'x': bad"
    assert gc.one_line(ValueError("first\nsecond")) == "ValueError: first"
    beir = tmp_path / "beir"
    (beir / "qrels").mkdir(parents=True)
    (beir / "corpus.jsonl").write_text("".join(json.dumps({"_id": f"d{i}", "title": "", "text": f"doc {i}"}) + "\n"
                                               for i in range(50)))
    (beir / "queries.jsonl").write_text("".join(json.dumps({"_id": f"q{i}", "text": f"q {i}"}) + "\n"
                                                for i in range(10)))
    (beir / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n" +
                                             "".join(f"q{i}\td{40 + i}\t1\n" for i in range(10)))
    small = gc.scifact_subset(beir, tmp_path / "small", n_queries=3, n_docs=10)
    assert (small / "qrels" / "test.tsv").read_text().splitlines()[1:] == ["q0\td40\t1", "q1\td41\t1", "q2\td42\t1"]
    ids = [json.loads(line)["_id"] for line in (small / "corpus.jsonl").read_text().splitlines()]
    assert len(ids) == 10 and {"d40", "d41", "d42"} <= set(ids)
    assert len((small / "queries.jsonl").read_text().splitlines()) == 3


def test_row7_trains_the_qwen3_encoder_recipe_on_a_random_qwen3(gc, monkeypatch, tmp_path, shared_data,
                                                                 one_torch_thread):
    """Row 7's logic on the CPU at a tiny shape: the random Qwen3 folder, the recipe's MNTP warm-up and contrastive
    steps through `train`, the numbers, and the memory estimate (whose weight bytes match what was loaded)."""
    import time

    from conftest import _bytelevel_tokenizer

    monkeypatch.setattr(gc, "encoder_tokenizer", _bytelevel_tokenizer)  # SmolLM2's needs its 30 s conversion
    monkeypatch.setitem(gc.QWEN3_SHAPES, "quick", {"num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 128,
                                                   "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
                                                   "vocab_size": 0})
    settings = gc.Settings("cpu", True, tmp_path / "out", shared_data, time.time() + 600)
    result = gc.row_qwen3_encoder(settings)
    n = result.numbers
    assert result.status == "pass", result.result
    assert (n["steps"], n["mntp_steps"]) == (3, 2) == (n["max_steps"], n["mntp_max_steps"])
    assert n["attention"] == "bidirectional" and n["pooling"] == "mean"
    assert n["shape"]["num_hidden_layers"] == 2 and n["shape"]["vocab_size"] == 320  # 300 ids, rounded up to 64s
    assert result.result.startswith("random Qwen3 2 layers x 64: MNTP 2/2 steps loss ")
    assert "3/3 steps" in result.result and "peak RSS" in result.result
    estimate = n["estimate"]
    assert estimate is not None and estimate["peak_bytes"] > estimate["weights_bytes"] > 0
    assert abs(estimate["weights_bytes"] + estimate["lora_parameters"] * 4 - n["weights_bytes"]) \
        < 0.05 * n["weights_bytes"]
    # The folder is reused when the shape and tokenizer are the same.
    folder = settings.work / "qwen3-random-quick"
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    gc.build_random_qwen3(folder, _bytelevel_tokenizer(), gc.QWEN3_SHAPES["quick"])
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp


def test_row8_trains_the_qwen3_rerank_recipe_and_reloads_its_folder(gc, monkeypatch, tmp_path, shared_data,
                                                                   one_torch_thread):
    """Row 8's logic on the CPU at a tiny shape: the rerank recipe on the random Qwen3 with negatives mined by MiniLM
    on a slice of SciFact train, the reloaded folder's probe logits, the numbers and the memory estimate of the row's
    pairs. Bugs caught: the reranker's forwards not timed (no tokens), its attention counted as bidirectional, the
    estimate priced for the recipe as shipped instead of the row's batch, a reload that scores otherwise passing."""
    import time

    import yaml

    from conftest import _bytelevel_tokenizer
    from embedkit.models.reranker import RERANK_PROBES_NAME
    from test_rerank_llm import QWEN3_PREFIX, QWEN3_SUFFIX

    instruction = yaml.safe_load(gc.QWEN3_RERANK_RECIPE.read_text())["rerank"]["instruction"]
    prompt = f"{QWEN3_PREFIX}<Instruct>: {instruction}\n<Query>: \n<Document>: {QWEN3_SUFFIX}"
    # "yes" and "no" must be single tokens, and the prompt short enough for max length 192: its words learnt
    monkeypatch.setattr(gc, "encoder_tokenizer", lambda: _bytelevel_tokenizer(1000, extra_texts=(prompt,) * 3))
    monkeypatch.setitem(gc.QWEN3_SHAPES, "quick", {"num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 128,
                                                   "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
                                                   "vocab_size": 0})
    monkeypatch.setitem(gc.ROW8_PLAN, "quick", (3, 8, 60))  # 8 queries, a pool of 60 documents: seconds to mine
    settings = gc.Settings("cpu", True, tmp_path / "out", shared_data, time.time() + 600)
    result = gc.row_qwen3_rerank(settings)
    n = result.numbers
    assert result.status == "pass", result.result
    assert n["steps"] == n["max_steps"] == 3 and n["reranker"] == "yes-no" and 8 <= n["pool"] <= 60
    assert n["probes"]["ok"] and n["probes"]["n"] == 12 and n["probes"]["max_abs_diff"] <= n["probes"]["atol"]
    (side,) = n["throughput"]
    assert side["timed_steps"] == 2 and side["tokens"] > 0 and side["flops_config"]["causal"]
    assert side["samples_per_s"] == pytest.approx(side["timer"]["sequences"] / side["seconds"])  # a sample: a pair
    assert 0 < side["flops_config"]["trainable"] < side["flops_config"]["params"]
    estimate = n["estimate"]
    assert estimate["task"] == "rerank" and estimate["texts_at_once"] == n["pairs_per_step"] == 2 * 8
    assert estimate["max_length"] == n["max_length"] == 192 and estimate["peak_bytes"] > estimate["weights_bytes"] > 0
    assert result.result.startswith("random Qwen3 2 layers x 64, yes-no reranker: minilm mined 7 negatives a row")
    assert "3/3 steps" in result.result and "pairs/s" in result.result and "12 probe logits match" in result.result
    # The reload check the row passes on: a folder whose model no longer gives its recorded logits is caught.
    output = settings.work / "row8-qwen3-rerank"
    probes = json.loads((output / RERANK_PROBES_NAME).read_text())
    probes["logits"] = [x + 1e-3 for x in probes["logits"]]
    (output / RERANK_PROBES_NAME).write_text(json.dumps(probes))
    tampered = gc.reloaded_probes(output, "cpu")
    assert not tampered["ok"] and tampered["max_abs_diff"] == pytest.approx(1e-3, abs=n["probes"]["atol"])
