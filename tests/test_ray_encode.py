"""Corpus encoding on Ray Data (embedkit.models.ray_encode, issue #33 item 1): vector shards equal to one process's
vectors, resumed after a killed worker or an interrupted run, and a clear error for shards of another model or
input.

One local Ray (2 CPUs) serves every test of the module: starting one takes ~20 s on a 2-core machine.
"""

from __future__ import annotations

import json
import random
import sys

import numpy as np
import pytest
from typer.testing import CliRunner

from embedkit.errors import ConfigError, DataError
from embedkit.models import ray_encode
from embedkit.models.ray_encode import RaySettings, VectorShards, encode_to_shards, plan_shards, shard_paths

WORDS = ("fever cough insulin glucose blood sugar court contract guitar stage rates quarter asthma children fox "
         "dog flu aches fatigue pressure adults").split()
SHARD = 48  # texts per shard in these tests: 5 shards of 48 and one of 20


def _texts(n: int = 260, seed: int = 0) -> list[str]:
    """n different texts of 1 to 60 words (different, so that a misplaced row cannot match by chance)."""
    rng = random.Random(seed)
    texts: dict[str, None] = {}
    while len(texts) < n:
        texts[" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 60)))] = None
    return list(texts)


@pytest.fixture(scope="module")
def ray_session():
    import ray  # the [ray] extra, in [all]: a test dependency
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    import ray.data

    # A job here takes seconds: one that waits 5 minutes for a core is stuck, and fails then, not at Ray's 30. Not
    # less: on a 2-core machine loaded by another job, two workers' start (each imports torch) took over 2 minutes.
    ray.data.DataContext.get_current().execution_no_progress_timeout_s = 300
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def tiny_encoder(tiny_bert_dir):
    from embedkit.models import load_model

    return load_model(str(tiny_bert_dir), device="cpu")


@pytest.fixture(scope="module")
def corpus(tiny_encoder):
    texts = _texts()
    ids = [f"doc-{i}" for i in range(len(texts))]
    reference = tiny_encoder.encode(texts, kind="document", batch_size=8, normalize=True)
    return ids, texts, reference


def _encode(encoder, ids, texts, folder):
    return encode_to_shards(encoder, ids, texts, folder, kind="document", batch_size=8, normalize=True,
                            settings=RaySettings(workers=2, shard_size=SHARD))


def _check_equal(folder, ids, reference):
    shards = VectorShards(folder)
    assert shards.ids == ids
    vectors = shards.to_array()
    assert vectors.shape == reference.shape
    assert float(np.abs(vectors - reference).max()) <= 1e-6
    # Row by row against the nearest reference row: a misordered shard or row would point elsewhere.
    assert (np.argmax(vectors @ reference.T, axis=1) == np.arange(len(ids))).all()
    return shards


def test_default_shard_size_is_the_encoders_sort_chunk():
    """A default shard is exactly one of encode()'s length-sorting chunks: bit-equal batches to one process."""
    from embedkit.models import encoder

    assert ray_encode.DEFAULT_SHARD_SIZE == encoder._SORT_CHUNK


def test_two_workers_equal_one_process_and_survive_a_killed_worker(ray_session, tiny_encoder, corpus, tmp_path,
                                                                     monkeypatch):
    ids, texts, reference = corpus
    marker = tmp_path / "killed"
    monkeypatch.setenv(ray_encode.CRASH_ENV, f"2:{marker}")  # the actor that gets shard 2 dies once
    folder = tmp_path / "shards"
    report = _encode(tiny_encoder, ids, texts, folder)
    assert marker.exists(), "the worker was not killed: the test proves nothing"
    assert report.encoded == list(range(6)) and report.shards == 6 and report.workers == 2
    shards = _check_equal(folder, ids, reference)
    # Every shard holds its own rows in input order (ids and vectors alike).
    for k in range(6):
        npy, ids_file = shard_paths(folder, k)
        assert json.loads(ids_file.read_text()) == ids[k * SHARD:(k + 1) * SHARD]
        assert np.abs(np.load(npy) - reference[k * SHARD:(k + 1) * SHARD]).max() <= 1e-6
    # Chunks of any size cross the shard borders in order (the mining VectorSource protocol).
    got = np.concatenate([chunk.copy() for _start, chunk in shards.chunks(100)])
    assert [start for start, _ in shards.chunks(100)] == [0, 100, 200]
    assert np.array_equal(got, shards.to_array())

    # A run that lost shards 1 and 4 (deleted, or half-written: a truncated .npy) encodes only those again.
    shard_paths(folder, 1)[0].unlink()
    npy4 = shard_paths(folder, 4)[0]
    npy4.write_bytes(npy4.read_bytes()[:200])
    monkeypatch.delenv(ray_encode.CRASH_ENV)
    again = _encode(tiny_encoder, ids, texts, folder)
    assert again.encoded == [1, 4]
    _check_equal(folder, ids, reference)
    # Nothing missing: nothing encoded, and Ray not even needed.
    assert _encode(tiny_encoder, ids, texts, folder).encoded == []


def test_an_interrupted_run_resumes_from_its_finished_shards(ray_session, tiny_encoder, corpus, tmp_path,
                                                            monkeypatch):
    ids, texts, reference = corpus
    folder = tmp_path / "shards"
    monkeypatch.setenv(ray_encode.FAIL_ENV, "3")  # shard 3 raises: the job fails part-way
    with pytest.raises(RuntimeError, match="failing on shard 3"):
        _encode(tiny_encoder, ids, texts, folder)
    monkeypatch.delenv(ray_encode.FAIL_ENV)
    # The failed job's actors gave their cores back: Ray's error held one actor alive, so the resume below waited
    # 30 minutes for a core (CI, stop 41) whenever no garbage collection happened to run in between.
    assert ray_session.available_resources().get("CPU", 0.0) == 2.0
    finished = {k for k in range(6) if shard_paths(folder, k)[0].exists()}
    assert 3 not in finished
    with pytest.raises(DataError, match="missing or incomplete"):
        VectorShards(folder)  # an unfinished folder is never read as if it were whole
    report = _encode(tiny_encoder, ids, texts, folder)
    assert report.encoded == sorted(set(range(6)) - finished)
    _check_equal(folder, ids, reference)


def test_a_failed_job_gives_its_cores_back_even_while_its_error_is_kept(ray_session, tiny_encoder, corpus,
                                                                          tmp_path, monkeypatch):
    """CI (stop 42): with Ray's error kept (a log handler that stores records, a notebook's last exception) and no
    garbage collection in between, dropping references freed no core (0 of 2): the resume then waited for ever.
    The driver must end the job's actors itself."""
    ids, texts, _ = corpus
    kept: list[BaseException] = []
    monkeypatch.setattr(ray_encode, "_clear_frames", kept.append)  # Ray's error and its frames stay referenced
    monkeypatch.setattr(ray_encode.gc, "collect", lambda *args: 0)
    monkeypatch.setenv(ray_encode.FAIL_ENV, "3")
    with pytest.raises(RuntimeError, match="failing on shard 3"):
        _encode(tiny_encoder, ids, texts, tmp_path / "shards")
    assert kept  # the error really was kept
    assert ray_session.available_resources().get("CPU", 0.0) == 2.0
    kept.clear()


def test_cli_encode_ray_equals_encode(ray_session, tiny_bert_dir, tmp_path):
    from embedkit.cli import app

    texts = _texts(120, seed=1)
    source = tmp_path / "texts.jsonl"
    source.write_text("".join(json.dumps({"id": f"x{i}", "text": t}) + "\n" for i, t in enumerate(texts)))
    runner = CliRunner()
    plain = tmp_path / "plain.npy"
    result = runner.invoke(app, ["encode", "-m", str(tiny_bert_dir), "-i", str(source), "-o", str(plain),
                                 "--batch-size", "8"])
    assert result.exit_code == 0, result.output
    on_ray = tmp_path / "ray.npy"
    args = ["encode", "-m", str(tiny_bert_dir), "-i", str(source), "--batch-size", "8", "--ray",
            "--ray-workers", "2", "--shard-size", "50"]
    result = runner.invoke(app, [*args, "-o", str(on_ray)])
    assert result.exit_code == 0, result.output
    assert "3 of 3 shards encoded on 2 Ray workers" in result.output
    assert not (tmp_path / "ray.npy.shards").exists()  # joined into the .npy, then removed
    assert np.abs(np.load(on_ray) - np.load(plain)).max() <= 1e-6
    # A folder output keeps the shards, with the ids of --id-field.
    result = runner.invoke(app, [*args, "-o", str(tmp_path / "folder"), "--id-field", "id"])
    assert result.exit_code == 0, result.output
    shards = VectorShards(tmp_path / "folder")
    assert shards.ids == [f"x{i}" for i in range(120)]
    assert np.abs(shards.to_array() - np.load(plain)).max() <= 1e-6
    # --ray and --nproc together: one line.
    result = runner.invoke(app, [*args, "-o", str(tmp_path / "x"), "--nproc", "2"])
    assert result.exit_code != 0 and "give --ray or --nproc, not both" in str(result.exception)


def test_shards_of_another_model_or_input_are_refused(tmp_path):
    ids, texts = ["a", "b", "c"], ["one", "two", "three"]
    model = {"name": "m", "fingerprint": "f" * 64}
    folder = tmp_path / "shards"
    plan = plan_shards(folder, ids, texts, model=model, kind="document", normalize=True, batch_size=8, shard_size=2)
    assert plan.missing == [0, 1] and plan.shards == 2
    for changed, match in [({"texts": ["one", "two", "four"]}, "texts_sha256"),
                           ({"model": {"name": "m", "fingerprint": "e" * 64}}, "model"),
                           ({"kind": "query"}, "kind"),
                           ({"shard_size": 3}, "shard_size")]:
        args = {"texts": texts, "model": model, "kind": "document", "shard_size": 2, **changed}
        with pytest.raises(ConfigError, match=match) as info:
            plan_shards(folder, ids, args["texts"], model=args["model"], kind=args["kind"], normalize=True,
                        batch_size=8, shard_size=args["shard_size"])
        assert "another model or input" in str(info.value) and "\n" not in str(info.value)
    # A folder that holds something else is not written into.
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not a folder of vector shards"):
        plan_shards(other, ids, texts, model=model, kind="document", normalize=True, batch_size=8, shard_size=2)


def test_without_ray_the_error_is_one_line(monkeypatch, tiny_encoder, tmp_path):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now fails as if it were not installed
    with pytest.raises(ConfigError, match=r"pip install 'embedkit\[ray\]'"):
        _encode(tiny_encoder, ["a"], ["one text"], tmp_path / "shards")


def _beir(root, texts):
    """A BEIR folder over `texts` (ids d0..), with 6 train queries whose positives are d0, d7, d14, ..."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "corpus.jsonl").write_text("".join(json.dumps({"_id": f"d{i}", "title": "", "text": t}) + "\n"
                                               for i, t in enumerate(texts)))
    queries = {f"q{j}": " ".join(texts[7 * j].split()[:4]) for j in range(6)}
    (root / "queries.jsonl").write_text("".join(json.dumps({"_id": k, "text": v}) + "\n" for k, v in queries.items()))
    (root / "qrels").mkdir(exist_ok=True)
    (root / "qrels" / "train.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join(
        f"q{j}\td{7 * j}\t1\n" for j in range(6)))
    return root


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_mine_on_ray_and_from_shards_equals_mine(ray_session, tiny_bert_dir, tmp_path):
    from embedkit.cli import app

    beir = _beir(tmp_path / "beir", _texts(90, seed=2))
    runner = CliRunner()
    mine = ["mine", "-m", str(tiny_bert_dir), "-d", str(beir), "--split", "train", "--range", "0:40", "-n", "4",
            "--sampling", "top", "--no-relative-margin"]
    result = runner.invoke(app, [*mine, "-o", str(tmp_path / "plain.jsonl"), "--no-cache"])
    assert result.exit_code == 0, result.output
    plain = _rows(tmp_path / "plain.jsonl")
    assert len(plain) == 6 and all(len(row["negatives"]) == 4 for row in plain)

    def same(rows):
        assert ([(r["positive_id"], r["negative_ids"]) for r in rows]
                == [(r["positive_id"], r["negative_ids"]) for r in plain])
        assert np.abs(np.array([r["scores"] for r in rows]) - np.array([r["scores"] for r in plain])).max() <= 1e-6

    # --ray: the pool is encoded on Ray into the cache (the shards are joined into it, then removed).
    cache = tmp_path / "cache"
    result = runner.invoke(app, [*mine, "-o", str(tmp_path / "ray.jsonl"), "--cache-dir", str(cache), "--ray",
                                 "--ray-workers", "2", "--shard-size", "25"])
    assert result.exit_code == 0, result.output
    same(_rows(tmp_path / "ray.jsonl"))
    assert len(list(cache.rglob("*.npy"))) == 1 and not list(cache.rglob("*.shards"))
    # Shards from `embedkit encode --ray` (ids from the corpus) are read by --corpus-embeddings alone.
    shards = tmp_path / "shards"
    result = runner.invoke(app, ["encode", "-m", str(tiny_bert_dir), "-i", str(beir / "corpus.jsonl"), "-o",
                                 str(shards), "--id-field", "_id", "--ray", "--ray-workers", "2", "--shard-size", "25"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, [*mine, "-o", str(tmp_path / "shards.jsonl"), "--corpus-embeddings", str(shards)])
    assert result.exit_code == 0, result.output
    same(_rows(tmp_path / "shards.jsonl"))
    result = runner.invoke(app, [*mine, "-o", str(tmp_path / "x.jsonl"), "--corpus-embeddings", str(shards),
                                 "--corpus-ids", str(beir / "corpus.jsonl")])
    assert result.exit_code != 0 and "holds its own ids" in str(result.exception)


def test_rag_index_on_ray_equals_rag_index(ray_session, tiny_bert_dir, tmp_path):
    from embedkit.cli import app
    from embedkit.rag.index import RagIndex

    beir = _beir(tmp_path / "beir", _texts(70, seed=3))
    runner = CliRunner()
    index = ["rag", "index", "-m", str(tiny_bert_dir), "-c", str(beir), "--index-type", "flat", "--no-bm25"]
    result = runner.invoke(app, [*index, "-o", str(tmp_path / "plain")])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, [*index, "-o", str(tmp_path / "ray"), "--ray", "--ray-workers", "2",
                                 "--shard-size", "20"])
    assert result.exit_code == 0, result.output
    assert not (tmp_path / "ray.shards").exists()
    plain, on_ray = RagIndex.load(tmp_path / "plain"), RagIndex.load(tmp_path / "ray")
    assert on_ray.manifest["build"]["ray"] == {"workers": 2, "shard_size": 20, "shards": 4, "resumed_shards": 0}
    queries = np.random.default_rng(0).standard_normal((5, plain.dim)).astype(np.float32)
    for (ids_a, scores_a), (ids_b, scores_b) in zip(plain.search_vectors(queries, 70),
                                                    on_ray.search_vectors(queries, 70)):
        assert np.abs(np.sort(scores_a) - np.sort(scores_b)).max() <= 1e-5
        assert ids_a[:10].tolist() == ids_b[:10].tolist()
