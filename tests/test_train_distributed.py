"""The training engine with 2 CPU processes (gloo): DDP, DeepSpeed ZeRO-3 and FSDP2, each with GradCache, dev evaluation
and checkpoints. A 2-process run trains the same model as one process with the global batch; a run killed with SIGKILL
mid-epoch and resumed ends where the uninterrupted one does.

Needs deepspeed (pip install 'embedkit[deepspeed]'); its first run JIT-compiles a small comm op (cached after).
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

from embedkit.launch import free_port, relaunch
from embedkit.models.encoder import load_model
from embedkit.train.config import load_recipe
from embedkit.train.contrastive import train, work_dir

PAIRS = [("what causes a fever", "the patient has a fever and a cough"),
         ("what is diabetes", "diabetes is a disease of high blood sugar"),
         ("what does insulin do", "insulin lowers the level of glucose in the blood"),
         ("who plays a guitar", "a man is playing a guitar on the stage"),
         ("what did the court rule", "the court ruled that the contract was void"),
         ("did interest rates rise", "interest rates rose by half a percent this quarter"),
         ("asthma in children", "how is asthma treated in children"),
         ("flu symptoms", "symptoms of flu include fever, aches and fatigue"),
         ("blood pressure causes", "what causes high blood pressure in adults"),
         ("the fox and the dog", "the quick brown fox jumps over the lazy dog"),
         ("a guitar on stage", "a man is playing a guitar on the stage tonight"),
         ("glucose and insulin", "insulin lowers the level of glucose")]

KILLER = """
import os, signal, sys
from embedkit.train.config import load_recipe
from embedkit.train.contrastive import train

def kill(step, record):
    if step == 5 and os.environ["RANK"] == "0":  # after the step-4 checkpoint, mid-epoch 1
        os.kill(os.getpid(), signal.SIGKILL)

train(load_recipe(sys.argv[1], sys.argv[2:]), on_step=kill)
"""


@pytest.fixture
def recipe_file(tmp_path, tiny_bert_dir) -> Path:
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"query": q, "positive": p}) + "\n" for q, p in PAIRS))
    dev = tmp_path / "dev"
    (dev / "qrels").mkdir(parents=True)
    (dev / "corpus.jsonl").write_text("".join(json.dumps({"_id": f"d{i}", "text": p}) + "\n"
                                              for i, (_, p) in enumerate(PAIRS)))
    (dev / "queries.jsonl").write_text("".join(json.dumps({"_id": f"q{i}", "text": q}) + "\n"
                                               for i, (q, _) in enumerate(PAIRS)))
    (dev / "qrels" / "dev.tsv").write_text("query-id\tcorpus-id\tscore\n" +
                                           "".join(f"q{i}\td{i}\t1\n" for i in range(len(PAIRS))))
    path = tmp_path / "recipe.yaml"
    # No dropout: the processes draw different masks than one process would, and the comparison must be exact.
    path.write_text(
        f"model: {{name: {tiny_bert_dir}, max_length: 32, attention_dropout: 0.0, hidden_dropout: 0.0}}\n"
        f"data: {{train: {pairs}, dev: 'beir:{dev}:dev'}}\n"
        "loss: {temperature: 0.1, symmetric: true}\n"
        f"training: {{output_dir: {tmp_path / 'out'}, batch_size: 2, lr: 1.0e-3, epochs: 3, seed: 3, threads: 1,"
        " progress: false, log_every: 1, eval_every: 2, checkpoint_every: 2, grad_cache: 1}\n")
    return path


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


@pytest.mark.parametrize("backend", ["ddp", "zero3", "fsdp"])
def test_two_processes_train_like_one_and_resume_after_sigkill(recipe_file, tmp_path, backend, tiny_bert_dir):
    stage = "zero3" if backend == "zero3" else "none"
    full = tmp_path / f"{backend}-full"
    sets = [f"deepspeed.stage={stage}", f"fsdp.enabled={'true' if backend == 'fsdp' else 'false'}"]
    argv = lambda out: [str(recipe_file), *[a for s in [*sets, f"training.output_dir={out}"] for a in ("--set", s)]]
    assert relaunch(["train", *argv(full)], 2) == 0
    manifest = json.loads((full / "embedkit_manifest.json").read_text())
    stats = manifest["training"]["stats"]
    assert stats["processes"] == 2 and stats["backend"] == {"ddp": "ddp", "zero3": "deepspeed-zero3",
                                                            "fsdp": "fsdp"}[backend]
    assert stats["steps"] == 9  # 12 pairs, global batch 2 x 2, 3 epochs
    log = [json.loads(line) for line in (full / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if r["event"] == "eval"] == [2, 4, 6, 8, 9]
    assert manifest["dev_eval"]["metrics"]["ndcg_at_10"] > 0
    assert list((full / "tensorboard").rglob("events.out.tfevents.*"))

    # One process with the global batch (4) trains the same model: gathering, GradCache and sharding change
    # nothing but memory. Compared as a norm relative to how far training moved the weights: Adam's first step
    # moves every weight by ~lr whatever its gradient's size, so a gradient that is float noise can flip sign
    # between reduction orders and move one element by up to 2 x lr. Measured ~1e-4; a real difference (batch 2
    # without gathering, lr x 1.1, temperature 0.1 -> 0.11) gives 0.05 to 0.7.
    single = load_recipe(recipe_file, ["training.batch_size=4", "training.grad_cache=null",
                                       f"training.output_dir={tmp_path / 'single'}"])
    result = train(single)
    assert result.best_step == stats["best_step"]
    a, b, base = _weights(full), _weights(tmp_path / "single"), _weights(Path(tiny_bert_dir))
    gap = sum(((a[k] - b[k]) ** 2).sum().item() for k in a) ** 0.5
    moved = sum(((b[k] - base[k]) ** 2).sum().item() for k in a if k in base) ** 0.5
    assert gap / moved < 1e-3, (gap, moved)
    texts = [q for q, _ in PAIRS]
    assert np.allclose(load_model(full).encode(texts), load_model(tmp_path / "single").encode(texts), atol=1e-4)

    # Killed by SIGKILL on rank 0 after step 5 (checkpoint at step 4, mid-epoch), then resumed with --resume.
    killed = tmp_path / f"{backend}-killed"
    driver = tmp_path / "killer.py"
    driver.write_text(KILLER)
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                           f"--master_port={free_port()}", str(driver), *argv(killed)[:1],
                           *argv(killed)[1:][1::2]], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0
    assert not killed.exists()  # nothing half-written where the model goes
    checkpoints = sorted(p.name for p in (work_dir(killed) / "checkpoints").iterdir())
    assert checkpoints == ["step-2", "step-4"], checkpoints
    assert relaunch(["train", *argv(killed), "--resume"], 2) == 0
    resumed, uninterrupted = _weights(killed), _weights(full)
    for key in uninterrupted:
        assert torch.allclose(resumed[key], uninterrupted[key], atol=1e-6, rtol=0), key
    steps = [json.loads(line)["step"] for line in (killed / "train_log.jsonl").read_text().splitlines()
             if json.loads(line)["event"] == "train"]
    assert steps[-5:] == [5, 6, 7, 8, 9]  # the resumed run redid step 5


SFT_KILLER = """
import os, signal, sys
from embedkit.llm.config import load_llm_recipe
from embedkit.llm.sft import train_sft

def kill(step, record):
    if step == 3 and os.environ["RANK"] == "0":  # after the step-2 checkpoint, mid-epoch
        os.kill(os.getpid(), signal.SIGKILL)

train_sft(load_llm_recipe(sys.argv[1], sys.argv[2:], mode="sft"), on_step=kill)
"""


def test_sft_under_ddp_resumes_after_sigkill_where_it_would_have_ended(tmp_path, tiny_llama_dir):
    rows = [{"query": f"what is {t}?", "positive": f"{t} is a condition of the {o}", "focus": t}
            for t, o in [("gout", "joints"), ("asthma", "lungs"), ("flu", "airways"), ("acne", "skin"),
                         ("anemia", "blood"), ("otitis", "ear"), ("colitis", "colon"), ("angina", "heart")]]
    qa = tmp_path / "qa.jsonl"
    qa.write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = tmp_path / "sft.yaml"
    recipe.write_text(
        f"model: {{name: {tiny_llama_dir}, max_length: 64}}\n"
        "adapter: {type: lora, r: 4, alpha: 8, dropout: 0.1}\n"  # dropout: the RNG streams must resume too
        f"data: {{train: {qa}, heldout: {qa}, heldout_examples: 4}}\n"
        f"training: {{output_dir: {tmp_path / 'sft'}, batch_size: 2, micro_batch_size: 1, lr: 1.0e-3, epochs: 2,"
        " seed: 5, threads: 1, progress: false, checkpoint_every: 2, eval_every: 2}\n")
    full, killed = tmp_path / "full", tmp_path / "killed"
    assert relaunch(["llm", "sft", str(recipe), "-o", str(full)], 2) == 0
    manifest = json.loads((full / "embedkit_manifest.json").read_text())
    assert manifest["llm"]["stats"]["processes"] == 2 and manifest["llm"]["stats"]["steps"] == 4
    driver = tmp_path / "killer.py"
    driver.write_text(SFT_KILLER)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                           f"--master_port={free_port()}", str(driver), str(recipe),
                           f"training.output_dir={killed}"], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0 and not killed.exists()
    assert (work_dir(killed) / "checkpoints" / "step-2" / "engine.pt").is_file()
    assert relaunch(["llm", "sft", str(recipe), "-o", str(killed), "--resume"], 2) == 0
    resumed, uninterrupted = _weights(killed), _weights(full)
    assert resumed.keys() == uninterrupted.keys()
    for key in uninterrupted:
        assert torch.allclose(resumed[key], uninterrupted[key], atol=1e-6, rtol=0), key


def test_qlora_under_zero3_trains_a_tiny_llama_on_two_processes(tmp_path, tiny_llama64_dir):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"query": q, "positive": p}) + "\n" for q, p in PAIRS))
    recipe = tmp_path / "qlora.yaml"
    recipe.write_text(
        f"model: {{name: {tiny_llama64_dir}, max_length: 32, pooling: mean}}\n"
        "adapter: {type: qlora, r: 4, alpha: 8}\n"
        f"data: {{train: {pairs}}}\n"
        "loss: {temperature: 0.1}\n"
        f"training: {{output_dir: {tmp_path / 'out'}, batch_size: 2, lr: 1.0e-3, max_steps: 3, threads: 1,"
        " progress: false, checkpoint_every: 2, grad_cache: 1}\n"
        "deepspeed: {stage: zero3}\n")
    assert relaunch(["train", str(recipe)], 2) == 0
    out = tmp_path / "out"
    manifest = json.loads((out / "embedkit_manifest.json").read_text())
    assert manifest["training"]["stats"]["backend"] == "deepspeed-zero3" and manifest["training"]["stats"]["steps"] == 3
    trained, base = load_model(out), load_model(tiny_llama64_dir, pooling="mean")
    texts = [q for q, _ in PAIRS]
    assert not np.allclose(trained.encode(texts), base.encode(texts), atol=1e-4)  # the merged adapter changed it
    from embedkit.export.probes import check_probes

    assert check_probes(lambda t, kind: trained.encode(t, kind=kind), out).ok
