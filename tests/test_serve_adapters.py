"""Many LoRA adapters on one served base (`embedkit serve --model base=... --adapter legal=DIR`): vectors equal the
merged model's, requests never get another adapter's vectors, /v1/models, run-time add/remove behind the key,
foreign-base adapters refused, unknown names 404, memory of 8 adapters."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from embedkit.errors import ModelError
from embedkit.manifest import MANIFEST_NAME, base_manifest
from embedkit.models import load_model
from embedkit.models.adapters import attach_lora, merge_adapter
from embedkit.models.probes import write_probes
from embedkit.serve.app import ServeSettings, create_app
from embedkit.serve.server import load_adapters, load_backends

TEXTS = ["what causes high blood pressure", "fever", "the court ruled that the contract was void",
         "insulin lowers the level of glucose in the blood", "a man is playing a guitar on the stage tonight"]
KEY = "sekret"


def make_adapter(base: Path, out: Path, *, seed: int, r: int = 4, dora: bool = False) -> Path:
    """An adapter folder laid out as `embedkit train` writes one with adapter.save: adapter (adapter/, a manifest
    recording the base's fingerprint, probe vectors), its LoRA B matrices made non-zero so it changes the vectors."""
    encoder = load_model(base)
    base_record = {"name": str(base), "fingerprint": encoder.fingerprint}
    attach_lora(encoder, r=r, alpha=2 * r, dora=dora)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in encoder.backbone.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
    encoder.invalidate_fingerprint()
    encoder.save_adapter(out / "adapter")
    (out / MANIFEST_NAME).write_text(json.dumps(base_manifest("adapter", base_model=base_record,
                                                              adapter={"path": "adapter", "base": base_record})))
    write_probes(encoder.eval(), out, created_by="train")
    return out


def merged_vectors(base: Path, adapter: Path, kind: str = "document") -> np.ndarray:
    return merge_adapter(load_model(base, adapter=adapter / "adapter")).encode(TEXTS, kind=kind)


@pytest.fixture(scope="module")
def bert_adapters(tmp_path_factory, st_bert):
    root = tmp_path_factory.mktemp("bert_adapters")
    return {name: make_adapter(st_bert, root / name, seed=seed) for seed, name in enumerate(("legal", "med"))}


@pytest.fixture(scope="module")
def llama_adapters(tmp_path_factory, tiny_llama_dir):
    root = tmp_path_factory.mktemp("llama_adapters")
    return {name: make_adapter(tiny_llama_dir, root / name, seed=10 + seed) for seed, name in enumerate(("legal", "med"))}


def _app(base: Path, adapters: dict[str, Path], *, keys=(KEY,)):
    backends = load_backends([f"base={base}"])
    hosts = load_adapters([f"{name}={path}" for name, path in adapters.items()], backends)
    return create_app(backends, ServeSettings(api_keys=tuple(keys)), adapter_hosts=hosts)


def _embed(client, model, texts=TEXTS, kind="document", key=KEY):
    response = client.post("/v1/embeddings", json={"model": model, "input": texts, "input_type": kind},
                           headers={"Authorization": f"Bearer {key}"})
    assert response.status_code == 200, response.text
    return np.array([row["embedding"] for row in response.json()["data"]], dtype=np.float32)


@pytest.mark.parametrize("which", ["bert", "llama"])
def test_each_adapter_serves_its_merged_models_vectors(which, st_bert, tiny_llama_dir, bert_adapters, llama_adapters,
                                                       one_torch_thread):
    """Bug caught: the served adapter is not the one the request named (set_adapter not applied, or the LoRA
    scaling lost), the base runs with an adapter still active, or a causal encoder's adapter differs from its merged
    model (padding/positions under PEFT): each name must give its merged model's vectors within 1e-5."""
    from fastapi.testclient import TestClient

    base, adapters = (st_bert, bert_adapters) if which == "bert" else (tiny_llama_dir, llama_adapters)
    with TestClient(_app(base, adapters)) as client:
        for kind in ("query", "document"):
            for name, folder in adapters.items():
                expected = merged_vectors(base, folder, kind)
                assert np.abs(_embed(client, name, kind=kind) - expected).max() < 1e-5, (name, kind)
            assert np.abs(_embed(client, "base", kind=kind) - load_model(base).encode(TEXTS, kind=kind)).max() < 1e-5
        # the adapters really differ from each other and from the base (else the test above proves nothing)
        legal, med, plain = (_embed(client, name) for name in ("legal", "med", "base"))
        assert np.abs(legal - med).max() > 1e-2 and np.abs(legal - plain).max() > 1e-2


def test_a_served_adapter_call_adds_its_low_rank_product_in_place(st_bert, bert_adapters, monkeypatch):
    """Bug caught: served calls through PEFT's own LoRA forward, whose two output-sized temporaries made 8 adapters
    serve at 0.62x a merged model (bench/records/serve/adapters-minilm.json); the in-place sum must give the merged
    model's vectors, and the base alone must get none of any adapter's product."""
    from fastapi.testclient import TestClient
    from peft.tuners.lora.layer import Linear as LoraLinear

    peft_calls = []
    peft_forward = LoraLinear.forward
    monkeypatch.setattr(LoraLinear, "forward", lambda self, *a, **k: peft_calls.append(1) or peft_forward(self, *a, **k))
    with TestClient(_app(st_bert, bert_adapters)) as client:
        peft_calls.clear()  # start-up's probe checks included
        got = _embed(client, "legal")
        assert np.abs(got - merged_vectors(st_bert, bert_adapters["legal"])).max() < 1e-5
        plain = _embed(client, "base")
        assert not peft_calls
        assert np.abs(plain - load_model(st_bert).encode(TEXTS)).max() < 1e-5


def _host_and_lanes(base: Path, adapters: dict[str, Path], calls: list):
    """A host with `adapters` loaded, one MicroBatcher over its embed_rows (recording each call's adapters in
    `calls`) and a lane per adapter and for the base, as create_app builds them."""
    from embedkit.serve.batcher import BatcherLane, MicroBatcher

    backends = load_backends([f"base={base}"])
    host = load_adapters([f"{name}={path}" for name, path in adapters.items()], backends)["base"]

    def recorded(rows):
        calls.append(sorted({str(row.tag) for row in rows}))
        return host.embed_rows(rows)

    shared = MicroBatcher(recorded, name="base", max_batch_tokens=1 << 20, max_batch_size=1024, max_padding=1.0,
                          min_call_tokens=1 << 20)
    return host, {name: BatcherLane(shared, None if name == "base" else name) for name in ["base", *adapters]}


async def _queued_together(lanes: dict, order: list[str], tokens) -> list[np.ndarray]:
    """One request per name of `order`, all queued before the batcher's first call; the lanes stopped after."""
    for lane in lanes.values():
        await lane.start()
    got = await asyncio.gather(*(lanes[name].embed(tokens) for name in order))
    for lane in lanes.values():
        await lane.stop()
    return got


def test_requests_for_several_adapters_share_one_model_call(st_bert, bert_adapters):
    """Bug caught: a batcher (and a model call) per adapter, which ran 8 adapters at 0.57x a merged model's
    throughput at concurrency 8 (bench/records/serve/adapters-minilm-inplace.json), or a mixed call that gives a
    row another adapter's product: requests for base, legal and med queued together go in one call, and each gets
    its own model's vectors."""
    calls: list = []
    _, lanes = _host_and_lanes(st_bert, bert_adapters, calls)
    expected = {"base": load_model(st_bert).encode(TEXTS),
                **{name: merged_vectors(st_bert, folder) for name, folder in bert_adapters.items()}}
    tokens = load_backends([f"base={st_bert}"])["base"].token_ids(TEXTS, "document")
    order = ["med", "base", "legal", "med"]
    got = asyncio.run(_queued_together(lanes, order, tokens))
    assert calls == [["None", "legal", "med"]]
    for name, vectors in zip(order, got):
        assert np.abs(vectors - expected[name]).max() < 1e-5, name


def test_a_dora_adapter_runs_apart_through_peft_and_keeps_its_vectors(st_bert, bert_adapters, tmp_path):
    """Bug caught: an adapter the in-place sum cannot compute (DoRA's learned magnitudes) summed as plain LoRA: in a
    call queued with a plain adapter and the base, it runs apart through PEFT, and each gets its merged model's
    vectors."""
    from embedkit.serve.batcher import BatcherLane

    dora = make_adapter(st_bert, tmp_path / "dora", seed=7, dora=True)
    calls: list = []
    host, lanes = _host_and_lanes(st_bert, {"legal": bert_adapters["legal"], "dora": dora}, calls)
    assert host.plain == {"legal": True, "dora": False}
    tokens = load_backends([f"base={st_bert}"])["base"].token_ids(TEXTS, "document")
    order = ["dora", "legal", "base", "dora"]
    got = asyncio.run(_queued_together(lanes, order, tokens))
    assert isinstance(lanes["dora"], BatcherLane) and calls == [["None", "dora", "legal"]]
    expected = {"base": load_model(st_bert).encode(TEXTS), "legal": merged_vectors(st_bert, bert_adapters["legal"]),
                "dora": merged_vectors(st_bert, dora)}
    assert np.abs(expected["dora"] - expected["base"]).max() > 1e-2
    for name, vectors in zip(order, got):
        assert np.abs(vectors - expected[name]).max() < 1e-5, name


def test_a_removed_adapter_leaves_no_served_factors_and_a_readded_name_serves_its_new_weights(st_bert, bert_adapters):
    """Bug caught: the layers' served factors (`served_lora`, views of the LoRA weights) outliving `remove`, which
    keeps every removed adapter's weights in memory on a server that adds and removes them, or a name re-added with
    other weights serving the old ones."""
    host = load_adapters([f"{name}={path}" for name, path in bert_adapters.items()],
                         load_backends([f"base={st_bert}"]))["base"]
    tokens = host.base.token_ids(TEXTS, "document")
    host.remove("med")
    holders = [module for module in host.encoder.backbone.modules() if hasattr(module, "served_lora")]
    assert holders and all("med" not in module.served_lora and "legal" in module.served_lora for module in holders)
    assert np.abs(host.embed("legal", tokens) - merged_vectors(st_bert, bert_adapters["legal"])).max() < 1e-5
    host.add("med", bert_adapters["legal"])  # the name again, another adapter's weights
    assert np.abs(host.embed("med", tokens) - merged_vectors(st_bert, bert_adapters["legal"])).max() < 1e-5


def test_a_mixed_request_stream_gets_each_requests_own_adapter(st_bert, bert_adapters):
    """Bug caught: a model call mixing adapters (one batcher for all, or two batchers switching the active adapter
    under each other's forward): concurrent requests for base, legal and med must each get their own vectors."""
    from embedkit.serve.server import BackgroundServer

    expected = {"base": load_model(st_bert).encode(TEXTS),
                **{name: merged_vectors(st_bert, folder) for name, folder in bert_adapters.items()}}
    order = ["legal", "med", "base"] * 8

    async def stream(url):
        async with httpx.AsyncClient(base_url=url, timeout=60,
                                     headers={"Authorization": f"Bearer {KEY}"}) as client:
            responses = await asyncio.gather(*(client.post("/v1/embeddings", json={"model": name, "input": TEXTS})
                                               for name in order))
        return responses

    with BackgroundServer(_app(st_bert, bert_adapters)) as server:
        responses = asyncio.run(stream(server.url))
    for name, response in zip(order, responses):
        assert response.status_code == 200, response.text
        got = np.array([row["embedding"] for row in response.json()["data"]], dtype=np.float32)
        assert np.abs(got - expected[name]).max() < 1e-5, name


def test_models_lists_the_base_and_each_adapter(st_bert, bert_adapters):
    """Bug caught: adapters served but missing from /v1/models (clients cannot discover them), or listed without
    the base they run on."""
    from fastapi.testclient import TestClient

    with TestClient(_app(st_bert, bert_adapters)) as client:
        cards = {card["id"]: card for card in client.get("/v1/models", headers={"Authorization": f"Bearer {KEY}"})
                 .json()["data"]}
    assert set(cards) == {"base", "legal", "med"}
    assert cards["legal"]["parent"] == "base" and cards["med"]["adapter"] is True and "parent" not in cards["base"]
    assert cards["legal"]["dim"] == cards["base"]["dim"]


def test_adapters_are_added_and_removed_at_run_time_behind_the_key(st_bert, bert_adapters, tmp_path):
    """Bug caught: anyone can change what a server answers (no key, or no key configured), a removed adapter still
    answers, or an added one gives other vectors than its merged model."""
    from fastapi.testclient import TestClient

    legal = bert_adapters["legal"]
    with TestClient(_app(st_bert, {}, keys=())) as client:  # no key configured: run-time changes are off
        response = client.post("/v1/adapters", json={"name": "legal", "path": str(legal)})
        assert response.status_code == 403 and response.json()["error"]["code"] == "adapters_need_api_key"
    with TestClient(_app(st_bert, {})) as client:
        assert client.post("/v1/adapters", json={"name": "legal", "path": str(legal)}).status_code == 401
        wrong = client.post("/v1/adapters", json={"name": "legal", "path": str(legal)},
                            headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401
        auth = {"Authorization": f"Bearer {KEY}"}
        added = client.post("/v1/adapters", json={"name": "legal", "path": str(legal)}, headers=auth)
        assert added.status_code == 200, added.text
        assert added.json()["parent"] == "base"
        assert np.abs(_embed(client, "legal") - merged_vectors(st_bert, legal)).max() < 1e-5
        again = client.post("/v1/adapters", json={"name": "legal", "path": str(legal)}, headers=auth)
        assert again.status_code == 409
        assert client.delete("/v1/adapters/legal").status_code == 401
        assert client.delete("/v1/adapters/legal", headers=auth).json()["deleted"] is True
        gone = client.post("/v1/embeddings", json={"model": "legal", "input": "x"}, headers=auth)
        assert gone.status_code == 404
        assert np.abs(_embed(client, "base") - load_model(st_bert).encode(TEXTS)).max() < 1e-5  # unwrapped base
        assert client.delete("/v1/adapters/base", headers=auth).status_code == 404  # a base is not an adapter
        dotted = client.post("/v1/adapters", json={"name": "le.gal", "path": str(legal)}, headers=auth)
        assert dotted.status_code == 400  # PEFT would fail half-way through injecting a dotted name


def test_an_adapter_of_another_base_is_refused_naming_both_fingerprints(st_bert, tiny_bert_dir, bert_adapters,
                                                                         tmp_path):
    """Bug caught: an adapter trained on another base loads silently (same shapes, wrong vectors). At start-up it is
    a one-line ModelError (exit code), at run time a 400; both name the recorded and the served fingerprint."""
    from fastapi.testclient import TestClient

    other = load_model(tiny_bert_dir)  # same architecture and shapes, other settings: another fingerprint
    served = load_model(st_bert).fingerprint
    recorded = json.loads((bert_adapters["legal"] / MANIFEST_NAME).read_text())["adapter"]["base"]["fingerprint"]
    assert recorded == served and other.fingerprint != served
    foreign = make_adapter(tiny_bert_dir, tmp_path / "foreign", seed=3)
    backends = load_backends([f"base={st_bert}"])
    with pytest.raises(ModelError) as info:
        load_adapters([f"foreign={foreign}"], backends)
    message = info.value.one_line()
    assert "\n" not in message and other.fingerprint[:12] in message and served[:12] in message
    assert info.value.exit_code != 0
    # the command itself: one line on stderr, a non-zero exit, before it listens
    result = subprocess.run([sys.executable, "-m", "embedkit.cli", "serve", "--model", f"base={st_bert}",
                             "--adapter", f"foreign={foreign}", "--port", "0"], capture_output=True, text=True,
                            timeout=300)
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode != 0 and len(lines) == 1, result.stderr
    assert other.fingerprint[:12] in lines[0] and served[:12] in lines[0]
    with TestClient(_app(st_bert, {})) as client:
        response = client.post("/v1/adapters", json={"name": "foreign", "path": str(foreign)},
                               headers={"Authorization": f"Bearer {KEY}"})
        assert response.status_code == 400 and response.json()["error"]["code"] == "invalid_adapter"
        assert other.fingerprint[:12] in response.json()["error"]["message"]
        assert served[:12] in response.json()["error"]["message"]
        models = client.get("/v1/models", headers={"Authorization": f"Bearer {KEY}"}).json()["data"]
        assert [card["id"] for card in models] == ["base"]  # nothing was left behind


def test_an_unknown_model_is_a_404_listing_the_served_ones(st_bert, bert_adapters):
    """Bug caught: a typo in `model` falls back to the base (wrong vectors, no error) or answers without saying what
    is served."""
    from fastapi.testclient import TestClient

    with TestClient(_app(st_bert, bert_adapters)) as client:
        response = client.post("/v1/embeddings", json={"model": "legl", "input": "x"},
                               headers={"Authorization": f"Bearer {KEY}"})
    assert response.status_code == 404
    error = response.json()["error"]
    assert error["code"] == "model_not_found" and error["param"] == "model"
    assert all(name in error["message"] for name in ("base", "legal", "med"))


def test_eight_adapters_add_only_their_own_weights(st_bert, tmp_path):
    """Bug caught: each adapter loads its own copy of the base (N adapters = N models of memory). Eight adapters on
    one base hold the base's weights once plus eight adapters' LoRA matrices."""
    from embedkit.serve.adapters import AdapterHost

    backends = load_backends([f"base={st_bert}"])
    host = AdapterHost(backends["base"])
    base_bytes = host.parameter_bytes()["base"]
    for i in range(8):
        host.add(f"a{i}", make_adapter(st_bert, tmp_path / f"a{i}", seed=i, r=1))
    sizes = host.parameter_bytes()
    adapter_bytes = [sizes[f"a{i}"] for i in range(8)]
    one_adapter = sum(p.numel() * 4 for name, p in load_model(st_bert, adapter=tmp_path / "a0" / "adapter")
                      .backbone.named_parameters() if "lora_" in name)
    assert sizes["base"] == base_bytes  # the base is held once, unchanged
    assert adapter_bytes == [one_adapter] * 8
    total = sum(sizes.values())
    assert total == base_bytes + 8 * one_adapter  # nothing else is held per adapter
    # r=1 on the 32-d toy: about the share of the model r=16 LoRA on all linears is of MiniLM (384-d)
    print(f"base {base_bytes} B, 8 adapters {sum(adapter_bytes)} B: {total / base_bytes:.3f}x one model")
    assert total < 1.5 * base_bytes


def test_a_trained_lora_run_is_served_on_its_base(st_bert, tmp_path):
    """Bug caught: `embedkit train` with adapter.save adapter records no usable base (its manifest names the
    lineage's first base, or nothing), so its own output is refused by, or silently mis-served on, its base."""
    from fastapi.testclient import TestClient

    from embedkit.train.config import parse_recipe
    from embedkit.train.contrastive import train

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"query": q, "positive": p}) + "\n"
                             for q, p in zip(TEXTS, TEXTS[1:] + TEXTS[:1])))
    out = tmp_path / "legal"
    train(parse_recipe({"model": {"name": str(st_bert), "max_length": 128}, "data": {"train": str(pairs)},
                        "adapter": {"type": "lora", "r": 4, "alpha": 8, "save": "adapter"},
                        "training": {"output_dir": str(out), "batch_size": 4, "lr": 1e-2, "epochs": 2, "seed": 7,
                                     "progress": False, "threads": 1}}))
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert manifest["adapter"]["base"]["fingerprint"] == load_model(st_bert).fingerprint
    with TestClient(_app(st_bert, {"legal": out})) as client:
        got = _embed(client, "legal", kind="query")
    assert np.abs(got - merged_vectors(st_bert, out, "query")).max() < 1e-5
    assert np.abs(got - load_model(st_bert).encode(TEXTS, kind="query")).max() > 1e-3  # training changed it
