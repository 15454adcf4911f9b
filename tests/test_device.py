"""Devices (`--device`) and encoding spread over processes (`--nproc`, `encoder.sharded()`).

The two multi-process tests launch real gloo process groups on the CPU (a few seconds of imports each).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from embedkit.device import resolve_device
from embedkit.errors import ConfigError

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without CUDA")

TEXTS = [f"{sentence} {'and more ' * (i % 7)}".strip() for i, sentence in enumerate([
    "the patient has a fever and a cough", "diabetes is a disease of high blood sugar",
    "insulin lowers the level of glucose in the blood", "a man is playing a guitar on the stage",
    "the court ruled that the contract was void", "interest rates rose by half a percent this quarter",
    "what causes high blood pressure in adults", "how is asthma treated in children",
    "the quick brown fox jumps over the lazy dog", "symptoms of flu include fever, aches and fatigue"] * 4)][:35]
# 35 texts in batches of 4: 9 batches, so rank 0 runs 5 and rank 1 runs 4 plus a dummy forward.


# ------------------------------------------------------------------------------------------------ resolve_device
@no_cuda
def test_auto_is_the_cpu_without_cuda():
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device(None) == torch.device("cpu")
    assert resolve_device(" CPU ") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")


@no_cuda
@pytest.mark.parametrize("spec", ["cuda", "cuda:0", "cuda:3"])
def test_cuda_without_cuda_is_a_one_line_error_naming_the_field(spec):
    with pytest.raises(ConfigError) as info:
        resolve_device(spec, field="model.device")
    line = info.value.one_line()
    assert "\n" not in line and "field 'model.device'" in line and "CUDA is not available" in line


@pytest.mark.parametrize("spec", ["gpu", "cuda:x", "cuda0", "cpu:0", "tpu"])
def test_malformed_device_is_an_error(spec):
    with pytest.raises(ConfigError, match="unknown device"):
        resolve_device(spec)


def test_nf4_loads_onto_the_gpu_it_is_asked_for():
    pytest.importorskip("bitsandbytes")
    from embedkit.models.encoder import backbone_load_kwargs

    gpu = backbone_load_kwargs(torch.float32, "nf4", torch.device("cuda", 1))
    assert gpu["device_map"] == {"": 1} and gpu["quantization_config"].load_in_4bit
    cpu = backbone_load_kwargs(torch.float32, "nf4", torch.device("cpu"))
    assert "device_map" not in cpu and cpu["quantization_config"].load_in_4bit
    assert backbone_load_kwargs(torch.float32, None, torch.device("cuda", 0)) == {"dtype": torch.float32}


# ------------------------------------------------------------------------------------------------ CLI
@no_cuda
def test_encode_device_cuda_fails_in_one_line(tmp_path, tiny_bert_dir):
    texts = tmp_path / "texts.txt"
    texts.write_text("one\ntwo\n")
    result = subprocess.run([sys.executable, "-m", "embedkit.cli", "encode", "--model", str(tiny_bert_dir), "--input",
                             str(texts), "--output", str(tmp_path / "v.npy"), "--device", "cuda"],
                            capture_output=True, text=True)
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: field '--device': device cuda asked for"), result.stderr
    assert not (tmp_path / "v.npy").exists()


@no_cuda
@pytest.mark.parametrize("args", [
    ["eval", "-m", "minilm", "-t", "stsb"],
    ["serve", "--model", "minilm"],
    ["rag", "query", "no-such-index", "a question"],
    ["rag", "eval", "no-such-index", "--beir", "x"],
    ["rag", "web", "no-such-index"],
    ["mine", "-m", "minilm", "-d", "PAIRS", "-o", "mined.jsonl", "--nproc", "2"],
])
def test_every_stage_refuses_cuda_without_it_before_loading_anything(args, tmp_path):
    from embedkit.cli import app

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text('{"query": "q", "positive": "p"}\n')
    args = [str(pairs) if a == "PAIRS" else a for a in args]
    result = CliRunner().invoke(app, [*args, "--device", "cuda"])
    assert result.exit_code != 0
    error = result.exception if isinstance(result.exception, ConfigError) else None
    line = error.one_line() if error else result.stderr.strip()
    assert "field '--device'" in line and "CUDA is not available" in line and "\n" not in line, result.output


def test_nproc_relaunches_the_command_as_typed(tmp_path, monkeypatch, tiny_bert_dir):
    import embedkit.launch
    from embedkit.cli import app

    seen = {}

    def fake_relaunch(argv, nproc, **kwargs):
        seen.update(argv=argv, nproc=nproc, **kwargs)
        return 3

    monkeypatch.setattr(embedkit.launch, "relaunch", fake_relaunch)
    texts = tmp_path / "texts.txt"
    texts.write_text("one\n")
    args = ["encode", "-m", str(tiny_bert_dir), "--input", str(texts), "-o", str(tmp_path / "v.npy"), "--no-normalize",
            "--batch-size", "8", "--nproc", "2", "--device", "cpu"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 3, result.output
    assert seen["nproc"] == 2 and seen["cpu"] is True
    assert seen["argv"] == ["encode", "--model", str(tiny_bert_dir), "--input", str(texts), "--output",
                            str(tmp_path / "v.npy"), "--batch-size", "8", "--no-normalize",
                            "--device", "cpu"]
    assert not (tmp_path / "v.npy").exists()


def test_node_options_relaunch_this_nodes_part_and_are_not_passed_on(tmp_path, monkeypatch, tiny_bert_dir):
    """Catches `--nnodes` without its rendezvous reaching torchrun (every node would start a world of its own), a node
    option left in the relaunched command (torchrun's processes would launch again), and a single process per node
    (`--nproc 1 --nnodes 2`) that runs alone instead of joining the others."""
    import embedkit.launch
    from embedkit.cli import app
    from embedkit.launch import Nodes

    seen = {}
    monkeypatch.setattr(embedkit.launch, "relaunch", lambda argv, nproc, **kwargs: seen.update(
        argv=argv, nproc=nproc, **kwargs) or 0)
    texts = tmp_path / "texts.txt"
    texts.write_text("one\n")
    args = ["encode", "-m", str(tiny_bert_dir), "--input", str(texts), "-o", str(tmp_path / "v.npy"), "--device", "cpu",
            "--nnodes", "2", "--node-rank", "1", "--rdzv-endpoint", "node0:29500"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert seen["nproc"] == 1 and seen["nodes"] == Nodes(2, 1, "node0:29500")
    assert seen["argv"] == ["encode", "--model", str(tiny_bert_dir), "--input", str(texts), "--output",
                            str(tmp_path / "v.npy"), "--device", "cpu"]
    assert seen["nodes"].torchrun_args() == ["--nnodes=2", "--rdzv-backend=static", "--rdzv-endpoint=node0:29500",
                                             "--node-rank=1"]
    assert Nodes(2, 1, "node0:29500", "c10d", "job7").torchrun_args() == [
        "--nnodes=2", "--rdzv-backend=c10d", "--rdzv-endpoint=node0:29500", "--rdzv-id=job7"]
    for wrong, field in [(dict(nnodes=2), "--rdzv-endpoint"),
                         (dict(nnodes=2, rdzv_endpoint="node0"), "--rdzv-endpoint"),
                         (dict(nnodes=2, node_rank=2, rdzv_endpoint="n:1"), "--node-rank"),
                         (dict(rdzv_backend="etcd"), "--rdzv-backend")]:
        with pytest.raises(ConfigError) as caught:
            Nodes(**wrong)
        assert caught.value.field == field, wrong


# ------------------------------------------------------------------------------------------------ 2 processes
_PROBE = '''
import json, sys
from pathlib import Path

import numpy as np

from embedkit.launch import end_launched_process, processes
from embedkit.models import load_model
from embedkit.models.distributed import all_agree, is_main_process

model_dir, texts_path, out = sys.argv[1:4]
texts = json.loads(Path(texts_path).read_text())
with processes(1, "cpu") as procs:  # launched by torch.distributed.run: joins the gloo group
    encoder = load_model(model_dir)
    forwards = []
    plain_forward = encoder.forward
    encoder.forward = lambda features, normalize=None: (forwards.append(len(features["input_ids"])),
                                                        plain_forward(features, normalize=normalize))[1]
    if procs.rank == 0:
        encoder.encode(texts[:3])  # outside the block: a plain encode, no collective, nobody waits
    forwards.clear()
    with encoder.sharded():
        vectors = encoder.encode(texts, batch_size=4)
        try:
            encoder.encode(texts[:5 + procs.rank])  # different texts per rank: every rank must fail, none hang
            mismatch = "no error"
        except RuntimeError as exc:
            mismatch = str(exc)
    np.save(Path(out) / f"rank{procs.rank}.npy", vectors)
    (Path(out) / f"rank{procs.rank}.json").write_text(json.dumps({
        "forwards": forwards, "world": procs.world, "main": is_main_process(), "mismatch": mismatch,
        "agree_true": all_agree(True), "agree_rank0": all_agree(procs.rank == 0)}))
end_launched_process(0)  # as the CLI ends a launched process
'''


def test_sharded_encode_in_two_processes_equals_one(tmp_path, tiny_bert_dir):
    from embedkit.launch import relaunch
    from embedkit.models import load_model

    (tmp_path / "shard_probe.py").write_text(_PROBE)
    (tmp_path / "texts.json").write_text(json.dumps(TEXTS))
    out = tmp_path / "out"
    out.mkdir()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    code = relaunch([str(tiny_bert_dir), str(tmp_path / "texts.json"), str(out)], 2, module="shard_probe", cpu=True,
                    env=env)
    assert code == 0
    expected = load_model(tiny_bert_dir).encode(TEXTS, batch_size=4)
    reports = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    for rank, report in enumerate(reports):
        vectors = np.load(out / f"rank{rank}.npy")
        assert vectors.shape == expected.shape and vectors.dtype == np.float32
        assert np.abs(vectors - expected).max() < 1e-5
        assert report["world"] == 2 and report["main"] == (rank == 0)
        assert "different numbers of texts (5 to 6)" in report["mismatch"]
        assert report["agree_true"] is True and report["agree_rank0"] is False
    # Same number of forward calls on both ranks (ZeRO-3 needs it): rank 1's share is a batch short, padded with
    # a one-text dummy. Then the mismatch check fails before any forward.
    assert [len(r["forwards"]) for r in reports] == [5, 5]
    assert sum(reports[0]["forwards"]) + sum(reports[1]["forwards"][:-1]) == len(TEXTS)
    assert reports[1]["forwards"][-1] == 1


def _write_beir(folder: Path) -> Path:
    """A tiny BEIR folder in the tiny BERT's vocabulary, with the same judgments as test and dev splits (the dev
    task then finds the corpus embeddings the test task cached: all processes must agree on that)."""
    sentences = sorted({t for t in TEXTS})
    corpus = [{"_id": f"d{i}", "title": "", "text": text} for i, text in enumerate(sentences)]
    queries = [{"_id": f"q{i}", "text": " ".join(text.split()[:4])} for i, text in enumerate(sentences[::3])]
    qrels = ["query-id\tcorpus-id\tscore"] + [f"q{i}\td{3 * i}\t1" for i in range(len(queries))]
    (folder / "qrels").mkdir(parents=True)
    (folder / "corpus.jsonl").write_text("".join(json.dumps(r) + "\n" for r in corpus))
    (folder / "queries.jsonl").write_text("".join(json.dumps(r) + "\n" for r in queries))
    for split in ("test", "dev"):
        (folder / "qrels" / f"{split}.tsv").write_text("\n".join(qrels) + "\n")
    return folder


def test_eval_nproc_2_equals_nproc_1(tmp_path, st_bert):
    from embedkit.cli import app

    beir = _write_beir(tmp_path / "tiny")
    runner = CliRunner()
    reports = {}
    for nproc in (2, 1):
        out = tmp_path / f"r{nproc}.json"
        args = ["eval", "-m", str(st_bert), "-t", f"beir:{beir}:test", "-t", f"beir:{beir}:dev", "-o", str(out),
                "-q", "--nproc", str(nproc), "--cache-dir", str(tmp_path / f"cache{nproc}"), "--batch-size", "4"]
        result = runner.invoke(app, args)
        assert result.exit_code == 0, result.output
        reports[nproc] = json.loads(out.read_text())
    two, one = reports[2], reports[1]
    assert two["manifest"]["processes"] == 2 and "processes" not in one["manifest"]
    assert two["manifest"]["device"].startswith("cpu") and one["manifest"]["device"].startswith("cpu")
    assert list(two["results"]) == list(one["results"]) == ["tiny-test", "tiny-dev"]
    for task in one["results"]:
        for metric, value in one["results"][task]["metrics"].items():
            assert two["results"][task]["metrics"][metric] == pytest.approx(value, abs=1e-6), (task, metric)
    # Rank 0 alone wrote the report and one corpus-embedding cache entry; the dev task read it on both ranks.
    assert len(list((tmp_path / "cache2" / "embeddings").glob("*.npy"))) == 1
    assert two["timings"]["tasks"]["tiny-dev"]["documents_from_cache"] is True
    assert not list(tmp_path.glob(".r2.json.*"))


# ------------------------------------------------------------------------------------------------ small pieces
def test_launched_processes_leave_their_error_to_the_launcher(tmp_path, monkeypatch, capsys):
    from embedkit.launch import ERRORS_ENV, report_error

    report_error("error: plain")
    assert capsys.readouterr().err == "error: plain\n"
    monkeypatch.setenv(ERRORS_ENV, str(tmp_path))
    monkeypatch.setenv("RANK", "1")
    report_error("error: from rank 1")
    assert capsys.readouterr().err == "" and (tmp_path / "rank1.txt").read_text() == "error: from rank 1\n"


def test_onnx_uses_the_cuda_provider_only_when_onnxruntime_has_it():
    ort = pytest.importorskip("onnxruntime")
    from embedkit.export.onnx import onnx_providers

    assert onnx_providers("cpu") == ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" in ort.get_available_providers():
        assert onnx_providers(torch.device("cuda", 1))[0] == ("CUDAExecutionProvider", {"device_id": 1})
    else:
        assert onnx_providers("cuda:1") == ["CPUExecutionProvider"]


def test_rag_build_index_write_false_encodes_and_writes_nothing(tmp_path):
    from test_eval_support import FakeEncoder

    from embedkit.rag.index import build_index

    encoder = FakeEncoder()
    docs = {f"d{i}": {"title": "", "text": text} for i, text in enumerate(TEXTS[:10])}
    assert build_index(encoder, docs, tmp_path / "index", write=False, bm25=False) is None
    assert encoder.calls == [("document", 10)] and not (tmp_path / "index").exists()
