"""Corpus encoding on Ray Data, written as resumable vector shards (`embedkit encode | rag index | mine --ray`).

Why Ray: `--nproc` (torch.distributed) needs every process up for the whole job, all on one launch; a lost
process fails the job and it starts again from nothing. Ray Data runs the same encoding as a stream of small
tasks over a pool of stateful model actors (`map_batches` with a callable class and an `ActorPoolStrategy` of N
actors, one GPU each when there are GPUs): an actor loads the model once and then encodes one shard per call; a
killed actor is restarted and its shard retried by Ray; workers may join from other machines (`--ray-address
ADDRESS`). Ray is an
optional extra (`pip install 'embedkit[ray]'`), imported only when `--ray` is given.

The output is a folder of shards:

    manifest.json                 what the shards hold: model fingerprint, kind, normalize, batch size, shard size,
                                  count, sha256 of the texts and of the ids (written once, first)
    shard-00000.ids.json          the ids of the shard's rows (a JSON list of strings), then
    shard-00000.npy               their vectors, float32 [rows, dim], rows in input order

Shard k holds texts [k * shard_size, (k + 1) * shard_size) of the input. The driver writes each shard atomically
(embedkit.atomic) as soon as its vectors arrive, ids first, vectors last, so a shard whose .npy exists is
finished. Resume: a re-run with the same model and input reads the manifest, checks that it matches (another
model, input, kind or shard size is a one-line error, never a silent mix) and encodes only the shards whose .npy
is missing or damaged. Actors get the shards' texts and return vectors; only the driver touches the folder, so a
cluster needs no shared file system.

Equality with single-process encoding: `Encoder.encode` length-sorts texts into batches within chunks of 16,384
texts. A shard size that is a multiple of it (the default is 16,384) gives every text exactly the
batch a single process gives it, so the vectors are bit-equal on the same device. A smaller shard size batches
texts differently, and only padding differs between the batches: the vectors then agree to float rounding (the
tests check max |diff| <= 1e-6).
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import os
import shutil
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from embedkit.atomic import atomic_path, write_json
from embedkit.errors import ConfigError, DataError

log = logging.getLogger(__name__)

FORMAT = "embedkit.vector-shards"
FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
DEFAULT_SHARD_SIZE = 16384  # = the encoder's sort chunk (embedkit.models.encoder), checked by the tests
INSTALL_HINT = "Ray is not installed: pip install 'embedkit[ray]'"
# Testing hook: "K:PATH" makes the actor that receives shard K exit (as if killed) when PATH does not exist yet,
# after creating PATH, so Ray must restart the actor and retry the shard once.
CRASH_ENV = "EMBEDKIT_RAY_CRASH_ONCE"
# Testing hook: "K" makes the actor raise on shard K, so the job fails part-way (an interrupted run).
FAIL_ENV = "EMBEDKIT_RAY_FAIL_ON"


@dataclass
class RaySettings:
    """How to run: `address` None = a local Ray started for the job (all the machine's CPUs), else a cluster's
    address ('auto', 'ray://host:10001', 'host:6379'). workers: model actors (default: one per GPU of the
    cluster, else 2). gpus: per actor (default: 1 when the cluster has GPUs, else 0)."""

    address: str | None = None
    workers: int | None = None
    shard_size: int = DEFAULT_SHARD_SIZE
    gpus: float | None = None


def ray_settings(ray: bool, address: str | None, workers: int | None, shard_size: int,
                 device: str = "auto") -> RaySettings | None:
    """The CLI's --ray / --ray-address / --ray-workers / --shard-size / --device; None when Ray is not asked for.
    --device cpu keeps the actors off the GPUs; any other device lets them take one GPU each when there are
    GPUs."""
    if not ray and address is None:
        return None
    return RaySettings(address=address, workers=workers, shard_size=shard_size,
                       gpus=0 if str(device).startswith("cpu") else None)


def check_ray_options(ray: bool, address: str | None, nproc: int) -> None:
    if (ray or address is not None) and nproc > 1:
        raise ConfigError("give --ray or --nproc, not both", field="ray")


def texts_digest(texts: Sequence[str]) -> str:
    h = hashlib.sha256()
    for text in texts:
        data = text.encode("utf-8")
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()


def shard_paths(folder: Path, k: int) -> tuple[Path, Path]:
    """(vectors .npy, ids .json) of shard k."""
    return folder / f"shard-{k:05d}.npy", folder / f"shard-{k:05d}.ids.json"


def _npy_rows(path: Path) -> tuple[int, int] | None:
    """(rows, dim) of a complete float32 [rows, dim] .npy, None when missing or damaged."""
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, fortran, dtype = read(f)
            offset = f.tell()
    except (OSError, ValueError):
        return None
    if len(shape) != 2 or fortran or dtype != np.dtype("<f4"):
        return None
    if path.stat().st_size < offset + shape[0] * shape[1] * 4:
        return None
    return int(shape[0]), int(shape[1])


@dataclass
class ShardPlan:
    folder: Path
    manifest: dict
    missing: list[int]

    @property
    def shards(self) -> int:
        return self.manifest["shards"]


def plan_shards(folder: str | Path, ids: Sequence[str], texts: Sequence[str], *, model: dict, kind: str,
                normalize: bool, batch_size: int, shard_size: int) -> ShardPlan:
    """Write (or check) the folder's manifest and list the shards still to encode."""
    folder = Path(folder)
    if len(ids) != len(texts):
        raise DataError(f"{len(ids)} ids for {len(texts)} texts")
    if not texts:
        raise DataError("no texts to encode")
    if shard_size < 1:
        raise ConfigError("the shard size must be at least 1", field="shard_size")
    shards = -(-len(texts) // shard_size)
    identity = {"format": FORMAT, "version": FORMAT_VERSION,
                "model": {"name": model.get("name"), "fingerprint": model["fingerprint"]},
                "kind": kind, "normalize": bool(normalize), "batch_size": int(batch_size),
                "shard_size": int(shard_size), "count": len(texts), "shards": shards,
                "texts_sha256": texts_digest(texts), "ids_sha256": texts_digest([str(i) for i in ids])}
    path = folder / MANIFEST_FILE
    if path.is_file():
        try:
            found = json.loads(path.read_text())
        except ValueError:
            raise DataError("the shard manifest is not JSON", path=path) from None
        differ = [key for key in identity if found.get(key) != identity[key]]
        if differ:
            what = ", ".join(f"{key} {_short(found.get(key))} here, {_short(identity[key])} now" for key in differ)
            raise ConfigError(f"the shards in this folder were made from another model or input ({what}): give "
                              "another output folder, or delete this one to start again", path=folder)
    elif folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise ConfigError("output exists and is not a folder of vector shards: refusing to write into it",
                          path=folder)
    else:
        folder.mkdir(parents=True, exist_ok=True)
        write_json(path, identity)
    missing = []
    for k in range(shards):
        npy, ids_file = shard_paths(folder, k)
        rows = min(shard_size, len(texts) - k * shard_size)
        got = _npy_rows(npy)
        if got is None or got[0] != rows or not ids_file.is_file():
            missing.append(k)
    return ShardPlan(folder, identity, missing)


def _short(value: Any) -> str:
    if isinstance(value, dict):
        value = value.get("fingerprint") or value
    text = str(value)
    return text[:12] if len(text) == 64 else text


def write_shard(folder: Path, k: int, ids: Sequence[str], vectors: np.ndarray) -> None:
    """Ids first, vectors last (the .npy marks the shard finished); each file atomically."""
    npy, ids_file = shard_paths(folder, k)
    write_json(ids_file, [str(i) for i in ids], indent=0)
    with atomic_path(npy) as tmp, open(tmp, "wb") as handle:
        np.save(handle, np.ascontiguousarray(vectors, dtype=np.float32))


class ShardEncoder:
    """The Ray Data callable class: one instance per actor loads (receives) the model once, then encodes one shard
    per call. On a GPU actor the model moves to that GPU."""

    def __init__(self, encoder: Any, kind: str, batch_size: int, normalize: bool, threads: int | None = None,
                 crash_once: str | None = None, fail_on: str | None = None, registry: Any = None) -> None:
        import ray
        import torch

        if registry is not None:  # so the driver can end this actor when the job is over (see encode_to_shards)
            context = ray.get_runtime_context()
            ray.get(registry.add.remote(context.get_actor_id(), context.current_actor))
        if isinstance(encoder, ray.ObjectRef):
            encoder = ray.get(encoder)
        if threads:
            torch.set_num_threads(threads)
        if ray.get_gpu_ids():
            encoder = encoder.to("cuda")
        self.encoder, self.kind, self.batch_size, self.normalize = encoder, kind, batch_size, normalize
        self.crash_once, self.fail_on = crash_once, fail_on

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        shards, vectors, seconds = [], [], []
        for k, texts in zip(batch["shard"], batch["texts"]):
            k = int(k)
            self._testing_hooks(k)
            started = time.perf_counter()
            out = self.encoder.encode([str(t) for t in texts], kind=self.kind, batch_size=self.batch_size,
                                      normalize=self.normalize, show_progress=False)
            out = np.ascontiguousarray(out, dtype="<f4")
            shards.append(k)
            vectors.append(out.tobytes())
            seconds.append(time.perf_counter() - started)
        return {"shard": np.array(shards, dtype=np.int64), "vectors": np.array(vectors, dtype=object),
                "dim": np.full(len(shards), self.encoder.dim, dtype=np.int64),
                "seconds": np.array(seconds, dtype=np.float64)}

    def _testing_hooks(self, k: int) -> None:
        if self.fail_on is not None and k == int(self.fail_on):
            raise RuntimeError(f"{FAIL_ENV}: failing on shard {k}")
        if self.crash_once:
            target, _, marker = self.crash_once.partition(":")
            if k == int(target) and not os.path.exists(marker):
                Path(marker).write_text(str(os.getpid()))
                os._exit(1)  # as if the actor's process were killed


def _import_ray():
    try:
        import ray
    except ImportError:
        raise ConfigError(INSTALL_HINT, field="ray") from None
    return ray


def _connect(ray, address: str | None) -> bool:
    """Connect (or start a local Ray); True when this call started it, so the caller shuts it down."""
    if ray.is_initialized():
        return False
    kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False}
    if address is None:
        kwargs["num_cpus"] = os.cpu_count() or 1
    try:
        ray.init(address=address, **kwargs)
    except ConnectionError as exc:
        raise ConfigError(f"cannot connect to the Ray cluster at {address!r}: {exc}".splitlines()[0],
                          field="ray") from None
    return True


class ActorRegistry:
    """A zero-CPU Ray actor that the job's model actors join when they start, so that the driver holds a handle to
    each and can end them (`ray.kill`) when the job is over: Ray Data gives no handle out."""

    def __init__(self) -> None:
        self.actors: dict[str, Any] = {}

    def add(self, actor_id: str, handle: Any) -> None:
        self.actors[actor_id] = handle  # a restarted actor joins again under the same id

    def handles(self) -> list[Any]:
        return list(self.actors.values())


def _end_actors(ray, registry: Any) -> None:
    """End the job's model actors and the registry (an actor already gone is fine)."""
    try:
        handles = ray.get(registry.handles.remote(), timeout=30)
    except Exception as exc:  # the registry itself lost: nothing to end by hand, the wait below still bounds
        log.debug("Ray actor registry unavailable: %s", exc)
        handles = []
    for handle in [*handles, registry]:
        try:
            ray.kill(handle)
        except Exception as exc:
            log.debug("ray.kill: %s", exc)


def _clear_frames(error: BaseException) -> None:
    """Clear the finished frames of an error and of the errors it came from (a log record may keep them)."""
    seen: set[int] = set()
    pending: list[BaseException | None] = [error]
    while pending:
        error = pending.pop()
        if error is None or id(error) in seen:
            continue
        seen.add(id(error))
        traceback.clear_frames(error.__traceback__)
        pending += [error.__cause__, error.__context__]


def _wait_for_cores(ray, free_before: float, wait_s: float = 30.0) -> None:
    """After a job: collect its leftovers, then wait (bounded) until the cores free before it are free again."""
    gc.collect()
    deadline = time.monotonic() + wait_s
    while ray.available_resources().get("CPU", 0.0) < free_before and time.monotonic() < deadline:
        time.sleep(0.2)


@dataclass
class EncodeReport:
    folder: Path
    shards: int
    encoded: list[int]  # the shards this call encoded (the others were there already)
    count: int
    encoded_texts: int
    seconds: float
    workers: int

    @property
    def texts_per_s(self) -> float:
        return self.encoded_texts / self.seconds if self.seconds > 0 else 0.0


def encode_to_shards(encoder: Any, ids: Sequence[str], texts: Sequence[str], folder: str | Path, *, kind: str,
                     batch_size: int, normalize: bool = True, settings: RaySettings | None = None,
                     progress: bool = True) -> EncodeReport:
    """Encode `texts` into the shard folder with Ray Data, resuming from the shards already there.

    `encoder` (an embedkit Encoder, on the CPU) is sent to every actor. Returns which shards this call encoded.
    """
    settings = settings or RaySettings()
    level = logging.INFO if progress else logging.DEBUG
    ids = [str(i) for i in ids]
    texts = list(texts)
    plan = plan_shards(folder, ids, texts, model={"name": getattr(encoder, "name", None),
                                                  "fingerprint": encoder.fingerprint},
                       kind=kind, normalize=normalize, batch_size=batch_size, shard_size=settings.shard_size)
    size = settings.shard_size
    if not plan.missing:
        log.log(level, "all %d shards already in %s", plan.shards, plan.folder)
        return EncodeReport(plan.folder, plan.shards, [], len(texts), 0, 0.0, 0)
    if plan.shards - len(plan.missing):
        log.log(level, "resuming: %d of %d shards already in %s", plan.shards - len(plan.missing), plan.shards,
                plan.folder)
    ray = _import_ray()
    started_ray = _connect(ray, settings.address)
    try:
        resources = ray.cluster_resources()
        cluster_gpus = int(resources.get("GPU", 0))
        gpus = settings.gpus if settings.gpus is not None else (1 if cluster_gpus else 0)
        workers = settings.workers or (max(1, int(cluster_gpus / gpus)) if gpus else 2)
        workers = max(1, min(workers, len(plan.missing)))
        # On the CPU the actors share the cores (no bigger than the largest node); on GPUs one core each.
        node_cpus = max((int(node["Resources"].get("CPU", 0)) for node in ray.nodes() if node.get("Alive")),
                        default=1)
        cpus = max(1, min(int(resources.get("CPU", 1)) // workers, node_cpus)) if not gpus else 1
        import ray.data

        free_before = ray.available_resources().get("CPU", 0.0)
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False
        # The model goes to the object store once (from the CPU; the driver's copy goes back where it was), and
        # every actor fetches it from there.
        where = encoder.device
        model_ref = ray.put(encoder.to("cpu"))
        encoder.to(where)
        registry = ray.remote(num_cpus=0)(ActorRegistry).remote()
        items = [{"shard": k, "texts": texts[k * size:(k + 1) * size]} for k in plan.missing]
        dataset = ray.data.from_items(items, override_num_blocks=len(items))
        encoded = dataset.map_batches(
            ShardEncoder, batch_size=1, batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=workers),
            num_cpus=cpus, num_gpus=gpus,
            fn_constructor_kwargs={"encoder": model_ref, "kind": kind, "batch_size": batch_size,
                                   "normalize": normalize, "threads": None if gpus else cpus,
                                   "crash_once": os.environ.get(CRASH_ENV), "fail_on": os.environ.get(FAIL_ENV),
                                   "registry": registry})
        log.log(level, "encoding %d shards of %d texts on %d Ray workers (%s each)", len(plan.missing), size,
                workers, f"{gpus:g} GPU" if gpus else f"{cpus} CPU")
        started = time.perf_counter()
        done: list[int] = []
        n_done = 0
        failure: RuntimeError | None = None
        try:
            for row in encoded.iter_rows():
                k, dim = int(row["shard"]), int(row["dim"])
                vectors = np.frombuffer(row["vectors"], dtype="<f4").reshape(-1, dim)
                if vectors.shape[0] != len(texts[k * size:(k + 1) * size]):
                    raise RuntimeError(f"shard {k}: {vectors.shape[0]} vectors for "
                                       f"{len(texts[k * size:(k + 1) * size])} texts")
                write_shard(plan.folder, k, ids[k * size:(k + 1) * size], vectors)
                done.append(k)
                n_done += vectors.shape[0]
                elapsed = time.perf_counter() - started
                log.log(level, "shard %d done: %d/%d shards, %s texts, %.1f texts/s", k,
                        plan.shards - len(plan.missing) + len(done), plan.shards, f"{n_done:,}",
                        n_done / elapsed if elapsed > 0 else 0.0)
        except Exception as exc:
            failure = RuntimeError(f"Ray encode failed: {exc}")
            _clear_frames(exc)
        seconds = time.perf_counter() - started
        # Ray Data lets a job's actors go by dropping its references (no `ray.kill`), and references outlive the
        # job until some later garbage collection, or longer: Ray's error and its traceback hold some (a log record
        # with exc_info keeps the error), the lineage of the blocks an actor made others. In a Ray session the
        # caller keeps (a notebook, a retry loop, a test) the next job then waits for cores a finished job still
        # holds: a resume after a failure hung 30 minutes (CI, stop 41), and with the references dropped and
        # collected, still found no core free (CI, stop 42). So the driver ends the job's actors itself (their
        # handles come from the registry they joined) and waits, bounded, for the cores before it returns or
        # raises (a plain error with Ray's text). The shards are written by then, so no lineage is needed.
        del encoded, dataset
        _end_actors(ray, registry)
        _wait_for_cores(ray, free_before)
        if failure is not None:
            raise failure
    finally:
        if started_ray:
            ray.shutdown()
    if sorted(done) != plan.missing:
        raise RuntimeError(f"Ray returned shards {sorted(done)}, expected {plan.missing}")
    return EncodeReport(plan.folder, plan.shards, sorted(done), len(texts), n_done, seconds, workers)


def shards_beside(target: str | Path) -> Path:
    """The shard folder of a result written at `target` (a .npy, a RAG index): `<target>.shards/`, kept until the
    result is complete so that an interrupted run resumes from it."""
    target = Path(target)
    return target.with_name(target.name + ".shards")


def encode_to_npy_on_ray(encoder: Any, ids: Sequence[str], texts: Sequence[str], target: str | Path, *, kind: str,
                         batch_size: int, normalize: bool = True, settings: RaySettings | None = None,
                         progress: bool = True) -> EncodeReport:
    """`encode_to_shards` into `shards_beside(target)`, joined into the .npy `target`, the shards removed once it
    is written (`embedkit encode -o X.npy --ray`, the mining cache's entries)."""
    folder = shards_beside(target)
    report = encode_to_shards(encoder, ids, texts, folder, kind=kind, batch_size=batch_size, normalize=normalize,
                              settings=settings, progress=progress)
    VectorShards(folder).write_npy(target)
    shutil.rmtree(folder)
    return report


class VectorShards:
    """A finished shard folder, read back: ids, and vectors in chunks (the VectorSource protocol of
    embedkit.mine.vectors), one shard in memory at a time."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        path = self.folder / MANIFEST_FILE
        if not path.is_file():
            raise DataError(f"not a folder of vector shards (no {MANIFEST_FILE})", path=self.folder)
        self.manifest = json.loads(path.read_text())
        if self.manifest.get("format") != FORMAT:
            raise DataError(f"not a folder of vector shards (format {self.manifest.get('format')!r})", path=path)
        self.n = int(self.manifest["count"])
        size, dims = int(self.manifest["shard_size"]), set()
        for k in range(int(self.manifest["shards"])):
            got = _npy_rows(shard_paths(self.folder, k)[0])
            if got is None or got[0] != min(size, self.n - k * size):
                raise DataError(f"shard {k} of {self.manifest['shards']} is missing or incomplete: run the encoding "
                                "again to finish it", path=self.folder)
            dims.add(got[1])
        if len(dims) != 1:
            raise DataError(f"the shards disagree on the dimension ({sorted(dims)})", path=self.folder)
        self.dim = dims.pop()

    @property
    def ids(self) -> list[str]:
        out: list[str] = []
        for k in range(int(self.manifest["shards"])):
            out.extend(json.loads(shard_paths(self.folder, k)[1].read_text()))
        if len(out) != self.n:
            raise DataError(f"{len(out)} ids for {self.n} vectors", path=self.folder)
        return out

    def shard_arrays(self) -> Iterator[np.ndarray]:
        for k in range(int(self.manifest["shards"])):
            yield np.load(shard_paths(self.folder, k)[0], allow_pickle=False)

    def chunks(self, rows: int) -> Iterator[tuple[int, np.ndarray]]:
        """(first row, float32 [m, dim]) covering every row in order; m = rows except for the last chunk."""
        buffer = np.empty((min(rows, self.n), self.dim), dtype=np.float32)
        filled, start = 0, 0
        for array in self.shard_arrays():
            offset = 0
            while offset < array.shape[0]:
                take = min(rows - filled, array.shape[0] - offset)
                buffer[filled:filled + take] = array[offset:offset + take]
                filled += take
                offset += take
                if filled == rows:
                    yield start, buffer
                    start += filled
                    filled = 0
        if filled:
            yield start, buffer[:filled]

    def to_array(self) -> np.ndarray:
        return np.ascontiguousarray(np.concatenate(list(self.shard_arrays())), dtype=np.float32)

    def write_npy(self, target: str | Path) -> Path:
        """All the vectors as one float32 .npy (written atomically, one shard in memory at a time)."""
        target = Path(target)
        with atomic_path(target) as tmp, open(tmp, "wb") as handle:
            header = {"descr": "<f4", "fortran_order": False, "shape": (self.n, self.dim)}
            np.lib.format.write_array_header_1_0(handle, header)
            for array in self.shard_arrays():
                handle.write(memoryview(np.ascontiguousarray(array, dtype="<f4")).cast("B"))
        return target
