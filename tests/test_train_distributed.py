"""The training engine with 2 CPU processes (gloo): DDP, DeepSpeed ZeRO-3 and FSDP2, each with GradCache, dev evaluation
and checkpoints, and QLoRA under ZeRO-3. A 2-process run trains the same model as one process with the global batch; a
run killed with SIGKILL mid-epoch and resumed ends where the uninterrupted one does. ZeRO-3 runs partition every
parameter (PARTITION_ALL) and a probe in each process checks that they were.

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
from embedkit.train.contrastive import train
from embedkit.train.engine import work_dir

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

# Every 2-process contrastive run goes through this driver: `embedkit train` (embedkit.cli.main) in each process, with
# what a test asks for through the environment:
# - EMBEDKIT_TEST_ZERO: JSON merged into DeepSpeed's zero_optimization. DeepSpeed keeps a parameter smaller than
#   stage3_param_persistence_threshold (default 1e5 elements) whole on every rank, which is every tensor of the tiny
#   test models: without a threshold of 0 no parameter is ever partitioned, gathered or released.
# - EMBEDKIT_TEST_PROBE: a folder where each rank writes what ZeRO-3 did to its parameters (probe-RANK.json), seen
#   from forward pre-hooks registered after DeepSpeed's own (so they run once DeepSpeed has gathered the module).
# - EMBEDKIT_TEST_KILL_AT: rank 0 kills itself with SIGKILL after that optimizer step (of the last phase; of the MNTP
#   warm-up with EMBEDKIT_TEST_KILL_PHASE=mntp).
DRIVER = """
import json, os, signal, sys
import torch
from embedkit.train import backends, contrastive, mntp

ZERO = json.loads(os.environ.get("EMBEDKIT_TEST_ZERO") or "{}")
PROBE = os.environ.get("EMBEDKIT_TEST_PROBE")
KILL_AT = int(os.environ.get("EMBEDKIT_TEST_KILL_AT") or 0)
KILL_PHASE = os.environ.get("EMBEDKIT_TEST_KILL_PHASE") or "train"
RANK = int(os.environ["RANK"])
seen = {"shards": {}, "forwards": {"grad": 0, "no_grad": 0}, "gathered_in_use": 0, "not_gathered_in_use": [],
        "max_others_gathered": 0.0, "whole_after_step": [], "steps": 0}

base_config = backends.deepspeed_config
def deepspeed_config(engine):
    config = base_config(engine)
    config["zero_optimization"].update(ZERO)
    return config
backends.deepspeed_config = deepspeed_config

def install_probe(model):
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus
    named = dict(model.named_parameters())
    seen["shards"] = {n: [p.ds_numel, p.ds_tensor.numel(), bool(p.ds_persist)] for n, p in named.items()}
    def gathered(p):
        return p.ds_status == ZeroParamStatus.AVAILABLE and p.data.numel() == p.ds_numel
    def hook(name):
        def pre(module, args):
            own = list(module.parameters(recurse=False))
            seen["forwards"]["grad" if torch.is_grad_enabled() else "no_grad"] += 1
            # The module about to run is whole on this rank, while its own shard stays smaller than it.
            if all(gathered(p) and p.ds_tensor.numel() < p.ds_numel for p in own):
                seen["gathered_in_use"] += 1
            else:
                seen["not_gathered_in_use"].append(name)
            # The rest of the model: partitioned, not kept whole after its own use.
            others = [p for p in named.values() if not any(p is q for q in own)]
            live = sum(p.ds_numel for p in others if gathered(p)) / sum(p.ds_numel for p in others)
            seen["max_others_gathered"] = max(seen["max_others_gathered"], live)
        return pre
    for name, module in model.named_modules():
        if list(module.parameters(recurse=False)):
            module.register_forward_pre_hook(hook(name))
    seen["named"] = named

if ZERO or PROBE:
    base_wrap = backends.DeepSpeedBackend.wrap
    def wrap(self, model, *args, **kwargs):
        base_wrap(self, model, *args, **kwargs)
        if PROBE:
            install_probe(model)
    backends.DeepSpeedBackend.wrap = wrap

def on_step(step, record):
    if PROBE:
        seen["steps"] = step
        seen["whole_after_step"] += [n for n, p in seen["named"].items() if p.data.numel() == p.ds_numel]
        with open(os.path.join(PROBE, f"probe-{RANK}.json"), "w") as f:
            json.dump({k: v for k, v in seen.items() if k != "named"}, f)
    if KILL_PHASE == "train" and step == KILL_AT and RANK == 0:
        os.kill(os.getpid(), signal.SIGKILL)

def mntp_after_step(self, engine, step, total):
    if KILL_PHASE == "mntp" and step == KILL_AT and RANK == 0:
        os.kill(os.getpid(), signal.SIGKILL)
mntp.MNTPStep.after_step = mntp_after_step

base_train = contrastive.train
contrastive.train = lambda recipe, **kwargs: base_train(recipe, on_step=on_step, **kwargs)
from embedkit.cli import main
main(["train", *sys.argv[1:]])
"""

# Small enough that every parameter of the tiny models is partitioned, nothing is fetched ahead of its module and a
# module's weights are released as soon as it ran (DeepSpeed's defaults would keep all of them whole).
PARTITION_ALL = {"stage3_param_persistence_threshold": 0, "stage3_model_persistence_threshold": 0,
                 "stage3_prefetch_bucket_size": 0, "stage3_max_live_parameters": 0, "stage3_max_reuse_distance": 0}


def _launch(tmp_path: Path, args: list[str], *, zero: dict | None = None, probe: Path | None = None,
            kill_at: int | None = None, kill_phase: str = "train") -> subprocess.CompletedProcess:
    """`embedkit train ARGS` in 2 CPU processes through DRIVER."""
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1",
           "EMBEDKIT_TEST_ZERO": json.dumps(zero or {}), "EMBEDKIT_TEST_PROBE": str(probe or ""),
           "EMBEDKIT_TEST_KILL_AT": str(kill_at or 0), "EMBEDKIT_TEST_KILL_PHASE": kill_phase}
    if probe is not None:
        probe.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                           f"--master_port={free_port()}", str(driver), *args], env=env, capture_output=True,
                          text=True, timeout=600)
    if kill_at is None:
        assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def _assert_partitioned(probe: Path, steps: int) -> dict:
    """What both ranks saw: every parameter partitioned (its local shard smaller than the tensor), gathered whole
    for its module's forward and released again, in both GradCache passes (no-grad embedding, replay with grad)."""
    seen = [json.loads((probe / f"probe-{rank}.json").read_text()) for rank in (0, 1)]
    for s in seen:
        assert s["steps"] == steps
        assert s["shards"] and all(local < full and not persist for full, local, persist in s["shards"].values()), \
            [n for n, (full, local, persist) in s["shards"].items() if not local < full or persist]
        assert s["forwards"]["no_grad"] > 0 and s["forwards"]["grad"] > 0, s["forwards"]
        assert s["not_gathered_in_use"] == [] and s["gathered_in_use"] > 0
        assert s["max_others_gathered"] < 0.25, s["max_others_gathered"]  # released after use, not kept
        assert s["whole_after_step"] == []  # between steps nothing stays gathered
    return seen[0]


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
    """Catches a backend whose 2-process run (GradCache with 4 backward passes per step, dev evaluation, checkpoints)
    trains another model than one process with the global batch, or whose SIGKILL + --resume does not end where the
    uninterrupted run does. Under ZeRO-3 every parameter is really partitioned (PARTITION_ALL, checked by the probe):
    GradCache's no-grad pass and its replays gather and release each layer, and the replays' backwards accumulate
    into partitioned gradients; with DeepSpeed's default threshold none of that would run."""
    stage = "zero3" if backend == "zero3" else "none"
    zero = PARTITION_ALL if backend == "zero3" else None
    full = tmp_path / f"{backend}-full"
    sets = [f"deepspeed.stage={stage}", f"fsdp.enabled={'true' if backend == 'fsdp' else 'false'}"]
    argv = lambda out: [str(recipe_file), *[a for s in [*sets, f"training.output_dir={out}"] for a in ("--set", s)]]
    probe = tmp_path / "probe" if backend == "zero3" else None
    _launch(tmp_path, argv(full), zero=zero, probe=probe)
    if probe is not None:
        _assert_partitioned(probe, steps=9)
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
    proc = _launch(tmp_path, argv(killed), zero=zero, kill_at=5)
    assert proc.returncode != 0
    assert not killed.exists()  # nothing half-written where the model goes
    checkpoints = sorted(p.name for p in (work_dir(killed) / "checkpoints").iterdir())
    assert checkpoints == ["step-2", "step-4"], checkpoints
    _launch(tmp_path, [*argv(killed), "--resume"], zero=zero)
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


def test_qlora_under_zero3_trains_like_one_process_and_resumes_after_sigkill(tmp_path, tiny_llama64_dir):
    """Catches QLoRA under ZeRO-3 training another model than QLoRA in one process with the global batch (4-bit
    weights or their LoRA layers gathered or partitioned wrong, LoRA gradients lost or doubled across GradCache's
    replays into partitioned gradients), and a SIGKILL + --resume that does not end where the uninterrupted run does.
    Every tensor, the packed 4-bit weights included, is partitioned (PARTITION_ALL, checked by the probe): with
    DeepSpeed's default threshold none of the tiny model's would be, and the old test only checked that the weights
    moved."""
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"query": q, "positive": p}) + "\n" for q, p in PAIRS))
    recipe = tmp_path / "qlora.yaml"
    # No dropout (LoRA's included): the processes would draw other masks than one process does.
    recipe.write_text(
        f"model: {{name: {tiny_llama64_dir}, max_length: 32, pooling: mean}}\n"
        "adapter: {type: qlora, r: 4, alpha: 8, dropout: 0.0}\n"
        f"data: {{train: {pairs}}}\n"
        "loss: {temperature: 0.1}\n"
        f"training: {{output_dir: {tmp_path / 'out'}, batch_size: 2, lr: 1.0e-3, epochs: 2, seed: 3, threads: 1,"
        " progress: false, log_every: 1, checkpoint_every: 2, grad_cache: 1}\n"
        "deepspeed: {stage: zero3}\n")
    argv = lambda out: [str(recipe), "--set", f"training.output_dir={out}"]
    full, probe = tmp_path / "full", tmp_path / "probe"
    _launch(tmp_path, argv(full), zero=PARTITION_ALL, probe=probe)
    shards = _assert_partitioned(probe, steps=6)["shards"]
    assert any(".base_layer.weight" in name for name in shards)  # the 4-bit weights are among the partitioned
    manifest = json.loads((full / "embedkit_manifest.json").read_text())
    stats = manifest["training"]["stats"]
    assert stats["backend"] == "deepspeed-zero3" and stats["processes"] == 2 and stats["steps"] == 6
    from embedkit.models.probes import check_probes

    trained = load_model(full)
    assert check_probes(lambda t, kind: trained.encode(t, kind=kind), full).ok

    # One process, QLoRA with the global batch (4), no GradCache, no DeepSpeed: the same adapter. Both dequantise
    # the same NF4 codes (ZeRO-3 stores the packed bytes as float32, bnb_4bit_quant_storage, and gathers them back
    # bit for bit), so what is left is float reduction order, as in the test above: the same measure (the merged
    # weights' distance relative to how far training moved them) at the same tolerance, 1e-3, for the same reason
    # (a noise-level gradient whose sign flips moves an element by 2 x lr under Adam). Measured 5e-6 (embeddings
    # 4e-7 apart); lr x 1.1 gives 0.10, batch 2 per process without gathering 1.1.
    single = load_recipe(recipe, ["training.batch_size=4", "training.grad_cache=null", "deepspeed.stage=none",
                                  f"training.output_dir={tmp_path / 'single'}"])
    train(single)
    a, b = _weights(full), _weights(tmp_path / "single")
    base = {k.removeprefix("model."): v for k, v in _weights(Path(tiny_llama64_dir)).items()}  # a causal LM
    assert a.keys() == b.keys()
    gap = sum(((a[k] - b[k]) ** 2).sum().item() for k in a) ** 0.5
    moved = sum(((b[k] - base[k]) ** 2).sum().item() for k in a if k in base) ** 0.5
    assert moved > 0 and gap / moved < 1e-3, (gap, moved)
    texts = [q for q, _ in PAIRS]
    assert np.allclose(trained.encode(texts), load_model(tmp_path / "single").encode(texts), atol=1e-4)

    # Killed by SIGKILL on rank 0 after step 3, resumed from the step-2 checkpoint (mid-epoch: 3 steps an epoch).
    killed = tmp_path / "killed"
    proc = _launch(tmp_path, argv(killed), zero=PARTITION_ALL, kill_at=3)
    assert proc.returncode != 0 and not killed.exists()
    assert sorted(p.name for p in (work_dir(killed) / "checkpoints").iterdir()) == ["step-2"]
    _launch(tmp_path, [*argv(killed), "--resume"], zero=PARTITION_ALL)
    resumed = _weights(killed)
    assert resumed.keys() == a.keys()
    for key in a:
        assert torch.allclose(resumed[key], a[key], atol=1e-6, rtol=0), key
    steps = [json.loads(line)["step"] for line in (killed / "train_log.jsonl").read_text().splitlines()
             if json.loads(line)["event"] == "train"]
    assert steps[-4:] == [3, 4, 5, 6]  # the resumed run redid step 3


@pytest.mark.parametrize("backend", ["zero3", "fsdp"])
def test_mntp_then_contrastive_sharded_trains_like_one_process_and_resumes_mid_warm_up(tmp_path, tiny_llama_tied_dir,
                                                                                       backend):
    """Catches the MNTP warm-up not running as a phase of the one ZeRO-3 / FSDP engine (it used to be refused under
    DeepSpeed / FSDP: a second engine on a model ZeRO-3 had already partitioned), a tied LM head that is not gathered
    for its logits (the embedding is partitioned like every parameter: PARTITION_ALL, checked by the probe; an FSDP
    shard), masks or a loss that depend on how the batch is split over the processes, and (ZeRO-3) a SIGKILL during
    the warm-up whose resume does not go on with the warm-up and end where the uninterrupted run does. The 2-process
    run must train what one process (no DeepSpeed / FSDP) trains with the global batches of both phases, at the
    tolerance of the tests above."""
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"query": q, "positive": p}) + "\n" for q, p in PAIRS))
    recipe = tmp_path / "mntp.yaml"
    # No dropout: the processes would draw other masks than one process does.
    recipe.write_text(
        f"model: {{name: {tiny_llama_tied_dir}, max_length: 32, pooling: mean, attention: bidirectional}}\n"
        "adapter: {type: lora, r: 4, alpha: 8, dropout: 0.0}\n"
        f"data: {{train: {pairs}}}\n"
        "loss: {temperature: 0.1}\n"
        "mntp: {steps: 4, batch_size: 2, lr: 1.0e-2, max_length: 32}\n"
        f"training: {{output_dir: {tmp_path / 'out'}, batch_size: 2, lr: 1.0e-3, epochs: 1, seed: 3, threads: 1,"
        " progress: false, log_every: 1, checkpoint_every: 2, grad_cache: 1}\n"
        + ("deepspeed: {stage: zero3}\n" if backend == "zero3" else "fsdp: {enabled: true}\n"))
    argv = lambda out: [str(recipe), "--set", f"training.output_dir={out}"]
    zero = PARTITION_ALL if backend == "zero3" else None
    full, probe = tmp_path / "full", tmp_path / "probe" if backend == "zero3" else None
    _launch(tmp_path, argv(full), zero=zero, probe=probe)
    if probe is not None:
        _assert_partitioned(probe, steps=3)  # 12 pairs, global batch 4: the contrastive phase's 3 steps
    manifest = json.loads((full / "embedkit_manifest.json").read_text())
    stats = manifest["training"]["stats"]
    assert stats["backend"] == {"zero3": "deepspeed-zero3", "fsdp": "fsdp"}[backend]
    assert stats["processes"] == 2 and stats["steps"] == 3
    assert stats["memory"]["mntp"]["steps"] == 4
    mntp_log = [json.loads(line) for line in (full / "mntp_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in mntp_log if r["event"] == "train"] == [1, 2, 3, 4]
    assert all(np.isfinite(r["loss"]) and r["masked_tokens"] > 0 for r in mntp_log if r["event"] == "train")

    # One process, both phases with the global batch (MNTP 4, contrastive 4), no GradCache, no DeepSpeed.
    single = load_recipe(recipe, ["training.batch_size=4", "mntp.batch_size=4", "training.grad_cache=null",
                                  "deepspeed.stage=none", "fsdp.enabled=false",
                                  f"training.output_dir={tmp_path / 'single'}"])
    train(single)
    one_log = [json.loads(line) for line in (tmp_path / "single" / "mntp_log.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in mntp_log if r["event"] == "train"] == pytest.approx(
        [r["loss"] for r in one_log if r["event"] == "train"], rel=1e-5)  # measured 3e-8 apart
    a, b = _weights(full), _weights(tmp_path / "single")
    base = {k.removeprefix("model."): v for k, v in _weights(Path(tiny_llama_tied_dir)).items()}
    assert a.keys() == b.keys()
    gap = sum(((a[k] - b[k]) ** 2).sum().item() for k in a) ** 0.5
    moved = sum(((b[k] - base[k]) ** 2).sum().item() for k in a if k in base) ** 0.5
    # Measured 1e-6 (ZeRO-3), 5e-7 (FSDP); MNTP masks drawn per process (the old DDP warm-up's) give 0.9.
    assert moved > 0 and gap / moved < 1e-3, (gap, moved)
    texts = [q for q, _ in PAIRS]
    assert np.allclose(load_model(full).encode(texts), load_model(tmp_path / "single").encode(texts), atol=1e-4)

    if backend != "zero3":
        return
    # Killed by SIGKILL on rank 0 after MNTP step 3 (checkpoint mntp-step-2), resumed: MNTP goes on from step 2.
    killed = tmp_path / "killed"
    proc = _launch(tmp_path, argv(killed), zero=PARTITION_ALL, kill_at=3, kill_phase="mntp")
    assert proc.returncode != 0 and not killed.exists()
    assert sorted(p.name for p in (work_dir(killed) / "checkpoints").iterdir()) == ["mntp-step-2"]
    _launch(tmp_path, [*argv(killed), "--resume"], zero=PARTITION_ALL)
    resumed = _weights(killed)
    for key in a:
        assert torch.allclose(resumed[key], a[key], atol=1e-6, rtol=0), key
    steps = [json.loads(line)["step"] for line in (killed / "mntp_log.jsonl").read_text().splitlines()
             if json.loads(line)["event"] == "train"]
    assert steps[-3:] == [3, 3, 4]  # the resumed run redid MNTP step 3



def test_two_nodes_of_one_process_train_like_two_processes_on_one_node(recipe_file, tmp_path):
    """Catches `embedkit train --nnodes 2` (torchrun's rendezvous) or the DeepSpeed launcher with a hostfile of two
    nodes not training the model that `--nproc 2` trains (ranks, data shards or the rendezvous wrong), the DeepSpeed
    launcher's `--local_rank=N` argument refused, and two "rank 0"s: a process that decides who writes by its
    LOCAL_RANK (0 on every node) rather than its global RANK would write a second output. The two nodes are two
    launches on this machine, each in its own folder with a relative output folder, so a second writer would leave
    node1/out; the data paths are absolute (shared), as on a cluster. Without checkpoints and dev evaluation only rank
    0 writes, so the output may live on its node alone; with them every process reads what rank 0 writes beside
    the output, which other nodes must see: a one-line error says so before training."""
    import embedkit

    root = Path(embedkit.__file__).resolve().parents[1]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(root), *filter(None, [os.environ.get("PYTHONPATH")])])}
    train = ["train", str(recipe_file), "--set", "training.eval_every=null", "--set", "training.checkpoint_every=null"]
    embedkit_cli = [sys.executable, "-m", "embedkit.cli"]

    single = tmp_path / "single-node"
    proc = subprocess.run([*embedkit_cli, *train, "--nproc", "2", "--output", str(single)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]

    def on_two_nodes(launch: str, command) -> list[subprocess.CompletedProcess]:
        """command(rank) on node 0 and node 1 at once, each in its own folder (tmp_path/LAUNCH/nodeR)."""
        runs = []
        for rank in (0, 1):
            cwd = tmp_path / launch / f"node{rank}"
            cwd.mkdir(parents=True)
            runs.append(subprocess.Popen(command(rank), cwd=cwd, env=env, text=True, stdout=subprocess.PIPE,
                                         stderr=subprocess.PIPE))
        done = []
        for run in runs:
            out, err = run.communicate(timeout=600)
            done.append(subprocess.CompletedProcess(run.args, run.returncode, out, err))
        return done

    def assert_trained_like_single_node(launch: str) -> None:
        out = tmp_path / launch / "node0" / "out"
        assert (out / "model.safetensors").is_file()
        assert sorted((tmp_path / launch / "node1").iterdir()) == []  # nothing written on the other node
        stats = json.loads((out / "embedkit_manifest.json").read_text())["training"]["stats"]
        assert stats["processes"] == 2 and stats["steps"] == 9  # 12 pairs, global batch 2 x 2, 3 epochs
        # The same processes doing the same collectives: equal at the resume tests' tolerance.
        a, b = _weights(out), _weights(single)
        assert a.keys() == b.keys()
        for key in a:
            assert torch.allclose(a[key], b[key], atol=1e-6, rtol=0), (launch, key)
        losses = [[json.loads(line)["loss"] for line in (folder / "train_log.jsonl").read_text().splitlines()
                   if json.loads(line)["event"] == "train"] for folder in (out, single)]
        assert losses[0] == pytest.approx(losses[1], rel=1e-6)

    # torchrun: the same command on both nodes but for --node-rank.
    def torchrun(rank: int, endpoint: str, *more: str) -> list[str]:
        return [*embedkit_cli, *train, "--output", "out", "--nnodes", "2", "--node-rank", str(rank),
                "--rdzv-endpoint", endpoint, *more]

    endpoint = f"127.0.0.1:{free_port()}"
    node0, node1 = on_two_nodes("torchrun", lambda rank: torchrun(rank, endpoint))
    assert node0.returncode == 0 and node1.returncode == 0, (node0.stderr[-3000:], node1.stderr[-3000:])
    assert "written by global rank 0" in node0.stdout
    assert_trained_like_single_node("torchrun")

    # The DeepSpeed launcher with a hostfile of two nodes (two names for this machine), started on each node
    # (--no_ssh: what it would run there over ssh); it passes --local_rank=0 to embedkit.
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=1\n127.0.0.1 slots=1\n")
    port = str(free_port())
    node0, node1 = on_two_nodes("deepspeed", lambda rank: [
        sys.executable, "-m", "deepspeed.launcher.runner", "--hostfile", str(hostfile), "--no_ssh", "--node_rank",
        str(rank), "--master_addr", "127.0.0.1", "--master_port", port, "--module", "embedkit.cli", *train,
        "--output", "out"])
    assert node0.returncode == 0 and node1.returncode == 0, (node0.stderr[-3000:], node1.stderr[-3000:])
    assert_trained_like_single_node("deepspeed")

    # Checkpoints with the output on node 0's own disk: refused on every node before training.
    endpoint = f"127.0.0.1:{free_port()}"
    node0, node1 = on_two_nodes("checkpoints",
                                lambda rank: torchrun(rank, endpoint, "--set", "training.checkpoint_every=2"))
    for node in (node0, node1):
        assert node.returncode != 0
        assert "storage that every node shares" in node.stderr, node.stderr[-3000:]
    assert not (tmp_path / "checkpoints" / "node0" / "out").exists()
