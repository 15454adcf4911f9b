"""The one training engine: every `embedkit train` and `embedkit llm sft|dpo|joint` run goes through `Engine.fit`.

A kind of training plugs in as a `Step` (contrastive: embedkit/train/contrastive.py; SFT, DPO, joint:
embedkit/llm/). The step owns its data, its forward and its loss; the engine owns everything around them:

- processes and devices: one process, or several under torchrun (`embedkit train RECIPE --nproc N`), each on its
  own GPU or on the CPU (gloo); `model.device` resolved by embedkit.device;
- how the model is held (embedkit/train/backends.py): DDP, DeepSpeed ZeRO-2/3 with optimizer / parameter offload,
  or FSDP2; mixed precision (bf16 / fp16 autocast with fp32 master weights); gradient accumulation;
- the schedule (AdamW, warmup + linear decay), clipping, the seeded batch order split across processes;
- phases: one `fit` may run several `Phase`s in order on the same wrapped model (the MNTP warm-up, then the
  contrastive step: embedkit/train/mntp.py), each with its own batch size, learning rate, length, schedule and log;
- checkpoints and exact resume (weights, optimizer, scheduler, every process's RNG, the phase, the data position and
  the step's own state), written atomically into `.<output>.train/checkpoints/step-N/`;
- dev evaluation every `eval_every` steps on every process (encoding shared between them), the dev-best weights
  kept and restored at the end;
- logging: stdlib `logging` (under "embedkit.train"), a JSONL log, a progress bar (embedkit.logs.progress: a line
  every half minute off a terminal), and experiment trackers through
  Accelerate (TensorBoard by default where installed; W&B / MLflow with `training.report_to`).

The loop stays lean on purpose (measured against sentence-transformers' trainer in bench/bench_train.py): texts
are tokenized once before it, batches are index lists, gradients are set to None between steps, and only floats
are kept from the graph for logging.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import os
import random
import resource
import shutil
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

import numpy as np
import torch
from torch import nn

from embedkit import logs
from embedkit.atomic import atomic_path, fsync_dir
from embedkit.device import resolve_device
from embedkit.errors import ConfigError, DataError
from embedkit.models.distributed import all_agree
from embedkit.train.backends import TrainingBackend, backend_class
from embedkit.train.schedule import count_steps
from embedkit.train.config import BaseRecipe

log = logging.getLogger(__name__)

ENGINE_FILE = "engine.pt"
LOG_FILE = "train_log.jsonl"
MNTP_LOG_FILE = "mntp_log.jsonl"  # the MNTP warm-up's log (embedkit/train/mntp.py), beside the main one
TRACKING_DIR = "tensorboard"
_FITTING: list["Engine"] = []  # the engine whose fit is running in this process (at most one)


# ---------------------------------------------------------------------------------------------------- the step API
class Step(Protocol):
    """What a kind of training supplies. Every method runs on every process."""

    name: str

    def batches(self, epoch: int, batch_size: int) -> list[list[int]]:
        """The epoch's batches of example indices, `batch_size` (global: per process x processes) each, seeded."""

    def run(self, rows: list[int], engine: "Engine", weight: float) -> dict[str, float]:
        """Forward and backward of this process's `rows` through `engine` (loss multiplied by `weight`)."""

    def evaluate(self, engine: "Engine") -> dict[str, Any] | None:
        """Dev evaluation: {"task", "metric", "score", "metrics"[, "greater_is_better": False]} or None when there
        is no dev set. The best step is the one with the best score."""

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint must hold beyond weights and position (e.g. the mined negatives in use)."""

    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    def start(self, engine: "Engine", resumed: bool) -> None:
        """Once the model is wrapped (and a checkpoint loaded), before the first step of this run."""

    def before_epoch(self, engine: "Engine", step: int, epoch: int) -> dict | None:
        """A hook at the start of every epoch (before its batches are drawn); a record to log, or None."""

    def after_step(self, engine: "Engine", step: int, total: int) -> dict | None:
        """A hook after every optimizer step; a record to log, or None."""


class StepBase:
    """Defaults for the optional parts of `Step`."""

    name = "train"

    def evaluate(self, engine: "Engine") -> dict[str, Any] | None:
        return None

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def start(self, engine: "Engine", resumed: bool) -> None:
        pass

    def before_epoch(self, engine: "Engine", step: int, epoch: int) -> dict | None:
        return None

    def after_step(self, engine: "Engine", step: int, total: int) -> dict | None:
        return None


@dataclass
class FitResult:
    steps: int
    samples: int
    train_seconds: float
    samples_per_second: float
    peak_rss_gb: float
    final_loss: float | None
    first_loss: float | None
    best_step: int | None
    dev: dict[str, Any] | None
    history: list[dict] = field(default_factory=list)
    resumed_from: int | None = None

    phases: dict[str, dict[str, Any]] = field(default_factory=dict)  # earlier phases' stats (no history)

    def stats(self) -> dict[str, Any]:
        return {"steps": self.steps, "samples": self.samples, "train_seconds": round(self.train_seconds, 3),
                "samples_per_second": round(self.samples_per_second, 4), "peak_rss_gb": round(self.peak_rss_gb, 3),
                "final_loss": self.final_loss, "first_loss": self.first_loss, "best_step": self.best_step,
                "history": self.history}


@dataclass
class Phase:
    """One stage of a run's `Engine.fit`: a step trained for its own number of optimizer steps.

    Settings left None are the recipe's `training` ones. The phases of one fit share everything the engine holds:
    the process group, the Accelerator, the wrapped model (DDP / DeepSpeed engine / FSDP shards, built once) and
    the optimizer object with its parameter groups. What is new per phase is the optimizer's *state* (AdamW's moments
    and step count are cleared, as a fresh optimizer would start) and the learning-rate schedule (warmup + linear
    decay over the phase's own steps, from its own lr): a phase starts as if its optimizer were made for it, which
    keeps a one-process run the same as when the MNTP warm-up had its own engine, while DeepSpeed's engine (whose
    optimizer owns the partitioned fp32 master weights) is initialised only once.

    Only the last phase evaluates on the dev set (and keeps dev-best weights) and its step numbers are the run's:
    `on_step` / `on_eval` see it alone, `FitResult` is its result (the earlier phases' stats are in
    `FitResult.phases`). Every phase logs to its own JSONL file in the work folder (`log_file`); trackers get the
    earlier phases' values under "<phase>/". Checkpoints record the phase they were written in: a resumed run goes
    on in that phase (a checkpoint of a later phase means the earlier ones are done and are not run again).
    """

    name: str
    step: Step
    n_examples: int
    log_file: str = LOG_FILE
    batch_size: int | None = None  # per process
    lr: float | None = None
    epochs: int | None = None
    max_steps: int | None = None
    gradient_accumulation: int | None = None
    evaluate: bool = True  # dev evaluation per the recipe (eval_every / eval_at_end); the last phase only


@dataclass
class _Plan:
    """A phase's settings, resolved against the recipe, and its length."""

    batch_size: int
    lr: float
    accumulation: int
    total: int
    warmup: int
    eval_every: int | None
    eval_at_end: bool


# ---------------------------------------------------------------------------------------------------- helpers
def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # Linux reports KiB


def rss_gb() -> float:
    """Resident memory now (GB), from /proc (0.0 where there is none)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1e6  # kB
    except OSError:
        pass
    return 0.0


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def get_rng() -> dict[str, Any]:
    """This process's RNG states as plain tensors and lists (loadable with weights_only=True)."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": [x.tolist() if isinstance(x, np.ndarray) else x for x in np.random.get_state()]}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def recipe_hash(recipe: BaseRecipe) -> str:
    """What must not change between a run and its resume (progress, logging and device settings may)."""
    dump = recipe.model_dump(mode="json")
    for volatile in ("progress", "log_every", "checkpoint_every", "keep_checkpoints", "threads", "report_to"):
        dump["training"].pop(volatile, None)
    dump["model"].pop("device", None)
    return hashlib.sha256(json.dumps(dump, sort_keys=True).encode()).hexdigest()[:16]


def work_dir(output_dir: Path) -> Path:
    """The hidden sibling where checkpoints, the log and the trackers live while a run is going."""
    return output_dir.parent / f".{output_dir.name}.train"


def ensure_process_group(backend: str) -> None:
    """A process group for DeepSpeed / FSDP: torchrun's when launched, else a one-process group."""
    if torch.distributed.is_initialized():
        return
    if "RANK" not in os.environ:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group(backend=backend)


class _JsonlLog:
    def __init__(self, path: Path, append: bool, enabled: bool) -> None:
        self.file = open(path, "a" if append else "w", encoding="utf-8") if enabled else None

    def write(self, record: dict[str, Any]) -> None:
        if self.file is not None:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


def _trackers(report_to: list[str] | None) -> list[str]:
    """What to log to: the recipe's list, or TensorBoard where it is installed."""
    if report_to is not None:
        return list(report_to)
    has_tb = importlib.util.find_spec("tensorboard") or importlib.util.find_spec("tensorboardX")
    return ["tensorboard"] if has_tb else []


def _flat_config(recipe: BaseRecipe) -> dict[str, Any]:
    """The recipe as flat scalars, for trackers' hyper-parameter tables."""
    flat: dict[str, Any] = {}

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                walk(f"{prefix}.{key}" if prefix else key, value)
        elif isinstance(node, (int, float, str, bool)):
            flat[prefix] = node
        elif node is not None:
            flat[prefix] = json.dumps(node)

    walk("", recipe.model_dump(mode="json"))
    return flat


# ---------------------------------------------------------------------------------------------------- the engine
class Engine:
    """Set up once per run: `Engine(recipe, output)`, build the model inside `engine.model_init()`, then `fit`.

    `recipe`: any recipe kind (embedkit/train/config.py's `BaseRecipe`); the engine reads its model (device, dtype),
    adapter, training, deepspeed and fsdp sections, and hashes the whole recipe for resume."""

    def __init__(self, recipe: BaseRecipe, output_dir: str | Path, *, kind: str = "train") -> None:
        self.recipe = recipe
        self.training = recipe.training
        self.kind = kind
        self.output_dir = Path(output_dir)
        self.work = work_dir(self.output_dir)
        t = self.training
        launched = int(os.environ.get("WORLD_SIZE", "1")) > 1
        self.device = resolve_device(recipe.model.device, field="model.device")
        if t.mixed_precision == "fp16" and self.device.type != "cuda":
            raise ConfigError("training.mixed_precision fp16 needs a CUDA device (use bf16 on the CPU)",
                              field="training.mixed_precision")
        backend = backend_class(recipe)
        if (backend.needs_process_group or launched) and not torch.distributed.is_initialized():
            backend.prepare_process(recipe, self.device)
            if self.device.type == "cuda":
                torch.cuda.set_device(self.device)
            ensure_process_group("nccl" if self.device.type == "cuda" else "gloo")
        self.rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        self.world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
        backend.check_launch(recipe, self.device, self.world)
        self.accelerator = self._make_accelerator(backend)
        self.backend = backend(self)
        self.sync_gradients = True  # False while accumulating the micro-batches before the last of a step
        self._build_for_saving: Callable[[], nn.Module] | None = None
        self._model: nn.Module | None = None
        self._extra: list[nn.Parameter] = []
        self.position: dict[str, Any] = {}  # step, epoch, batch, ... of the phase in progress (steps may read it)
        self.phase: Phase | None = None  # the phase in progress
        self.batch_rows: list[int] = []  # the global rows of the micro-batch in progress (step.run gets its own part)
        self._phases: list[Phase] = []
        self._phase_index = 0
        self._track_prefix = ""  # trackers' key prefix of the phase in progress
        self._done_phases: dict[str, dict[str, Any]] = {}  # stats of the phases finished, kept in checkpoints

    # ------------------------------------------------------------------ set-up
    def _make_accelerator(self, backend: type[TrainingBackend]):
        from accelerate import Accelerator
        from accelerate.state import AcceleratorState

        # One Engine, hence one Accelerator, per run: the phases of a run (MNTP warm-up, contrastive) share it, and
        # no engine is made while another one is training (`fit` refuses to start then). Accelerate's state is
        # process-wide and fixed once made (precision, device), so a process that trains several runs one after the
        # other (tests, `embedkit tune`'s trials) clears the previous run's before making this one's.
        if _FITTING:
            raise RuntimeError("an Engine is training in this process: one engine per run (run stages as its phases)")
        AcceleratorState._reset_state(reset_partial_state=not torch.distributed.is_initialized())
        t = self.training
        mixed = "no" if backend.applies_precision else t.mixed_precision
        trackers = _trackers(t.report_to) if self.rank == 0 else []
        self.trackers = trackers
        return Accelerator(cpu=self.device.type == "cpu", mixed_precision=mixed, log_with=trackers or None,
                           project_dir=str(self.work / TRACKING_DIR))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def model_init(self) -> contextlib.AbstractContextManager:
        """Build the model inside this (ZeRO-3 partitions it while it loads)."""
        return self.backend.model_init()

    def set_model_builder(self, build: Callable[[], nn.Module]) -> None:
        """How rank 0 rebuilds the model unsharded for the final save (backends that shard the parameters)."""
        self._build_for_saving = build

    def build_model_for_saving(self) -> nn.Module:
        if self._build_for_saving is None:
            raise RuntimeError("the step did not register a model builder (Engine.set_model_builder)")
        return self._build_for_saving()

    # ------------------------------------------------------------------ what steps call
    @property
    def model(self) -> nn.Module:
        """The module to call for trainable forwards (DDP / DeepSpeed / FSDP wrapper, or the model itself)."""
        return self.backend.model

    @property
    def unwrapped(self) -> nn.Module:
        return self.backend.unwrapped

    def autocast(self) -> contextlib.AbstractContextManager:
        return self.accelerator.autocast()

    def sync(self, last: bool = True) -> contextlib.AbstractContextManager:
        """Wrap each forward + backward of a micro-batch: gradients are all-reduced only on the step's last one
        (`last` and this is the last micro-batch of the optimizer step)."""
        return self.backend.sync(last and self.sync_gradients)

    def backward(self, loss: torch.Tensor) -> None:
        """Backward of a loss computed through `engine.model`'s forward."""
        self.backend.backward(loss)

    def backward_detached(self, loss: torch.Tensor) -> None:
        """Backward of a loss over detached embeddings (GradCache's first pass): no model weights in its graph."""
        scaler = getattr(self.accelerator, "scaler", None)
        (scaler.scale(loss) if scaler is not None else loss).backward()

    def backward_from(self, outputs: torch.Tensor, grads: torch.Tensor) -> None:
        """Backpropagate known gradients of `outputs` (GradCache's replay) into the model."""
        self.backend.backward_from(outputs, grads)

    # ------------------------------------------------------------------ the loop
    def fit(self, phases: Step | list[Phase], model: nn.Module, *, extra: list[nn.Parameter] | None = None,
            n_examples: int | None = None, resume: bool = False, on_step: Callable[[int, dict], None] | None = None,
            on_eval: Callable[[int, dict, int], None] | None = None) -> FitResult:
        """Train `model` (and `extra` loss parameters) through `phases` in order (a single `step` with `n_examples`
        is one phase); returns what was measured in the last phase, on every rank (see `Phase`).

        `on_step(step, record)` runs after every optimizer step of the last phase; `on_eval(step, result,
        total_steps)` after every dev evaluation (`embedkit tune` reports it to its pruner). An exception raised by
        either ends the run: the log is closed and nothing is saved (checkpoints stay, as after a crash).
        """
        if not isinstance(phases, (list, tuple)):
            if n_examples is None:
                raise TypeError("fit(step, ...) needs n_examples")
            phases = [Phase(phases.name, phases, n_examples)]
        phases = list(phases)
        if not phases or len({p.name for p in phases}) != len(phases):
            raise ValueError(f"fit needs phases with distinct names, not {[p.name for p in phases]}")
        if any(p.evaluate and (self.training.eval_every or self.training.eval_at_end) for p in phases[:-1]):
            raise ValueError("only the last phase evaluates on the dev set: set evaluate=False on the others")
        if _FITTING:
            raise RuntimeError("an Engine is already training in this process")
        self._phases = phases
        self._on_eval = on_eval
        self._model, self._extra = model, list(extra or [])
        plans = [self._plan(p) for p in phases]  # every phase's data checked before anything trains
        self._check_work_shared(resume)
        if self.backend.shards_parameters and self._build_for_saving is None:  # else found only at the final save
            raise RuntimeError(f"{self.backend.name} rebuilds the model whole to save it: the step must register a "
                               "model builder first (Engine.set_model_builder)")
        self.backend.wrap(model, self._extra)

        checkpoint = self._latest_checkpoint() if resume else None
        if resume and checkpoint is None:
            log.info("no checkpoint in %s; starting from the beginning", self.work)
        payload = self._read_checkpoint(checkpoint) if checkpoint is not None else None
        first = 0
        if payload is not None:
            phase = payload.get("phase", phases[-1].name)  # a checkpoint from before phases: the only phase
            names = [p.name for p in phases]
            if phase not in names:
                raise ConfigError(f"the checkpoint was written in phase {phase!r}, which this run does not have",
                                  path=checkpoint)
            first = names.index(phase)
        elif self.is_main:
            shutil.rmtree(self.work / "checkpoints", ignore_errors=True)
            shutil.rmtree(self.work / TRACKING_DIR, ignore_errors=True)
            for stale in {LOG_FILE, MNTP_LOG_FILE} - {p.log_file for p in phases}:  # an earlier run's, not this one's
                (self.work / stale).unlink(missing_ok=True)
        self._barrier()
        if self.is_main:
            self.work.mkdir(parents=True, exist_ok=True)
        self._barrier()
        if self.trackers:
            self.accelerator.init_trackers(self.kind, config=_flat_config(self.recipe))

        done: dict[str, dict[str, Any]] = dict(payload.get("phases", {})) if payload is not None else {}
        _FITTING.append(self)
        try:
            for index in range(first, len(phases)):
                resumed = (checkpoint, payload) if index == first and payload is not None else None
                result = self._run_phase(index, plans[index], resumed, done,
                                         on_step if index == len(phases) - 1 else None)
                if index < len(phases) - 1:
                    done[phases[index].name] = {k: v for k, v in result.stats().items() if k != "history"}
        finally:
            _FITTING.remove(self)
        for tracker in self.accelerator.trackers:  # not end_training(): it also destroys the process group
            tracker.finish()
        model.eval()
        result.phases = done
        return result

    def _plan(self, phase: Phase) -> _Plan:
        t = self.training
        pick = lambda value, default: default if value is None else value  # noqa: E731
        batch_size = pick(phase.batch_size, t.batch_size)
        accumulation = pick(phase.gradient_accumulation, t.gradient_accumulation)
        global_batch = batch_size * self.world
        n_batches = len(self._epoch_batches(phase.step, 0, global_batch))
        if n_batches == 0:
            raise DataError(f"no complete batch: {phase.n_examples} examples for a batch of {global_batch}"
                            + (" with drop_last" if getattr(t, "drop_last", False) else ""),
                            field="training.batch_size")
        # training.min_steps stretches the recipe's epochs only: a phase that sets its own keeps them.
        min_steps = getattr(t, "min_steps", None) if phase.epochs is None else None
        total = count_steps(n_batches, accumulation, pick(phase.epochs, t.epochs), pick(phase.max_steps, t.max_steps),
                            min_steps)
        return _Plan(batch_size=batch_size, lr=pick(phase.lr, t.lr), accumulation=accumulation, total=total,
                     warmup=int(np.ceil(total * t.warmup_ratio)), eval_every=t.eval_every if phase.evaluate else None,
                     eval_at_end=bool(t.eval_at_end) and phase.evaluate)

    def _run_phase(self, index: int, plan: _Plan, resumed: tuple[Path, dict] | None, done: dict,
                   on_step: Callable[[int, dict], None] | None) -> FitResult:
        """One phase from its start (or from the checkpoint in `resumed`) to its end; its result."""
        phase = self._phases[index]
        step = phase.step
        last = index == len(self._phases) - 1
        self.phase, self._phase_index = phase, index
        self._track_prefix = "" if last else f"{phase.name}/"
        self._done_phases = done
        self.backend.start_phase(plan.lr, plan.total, plan.warmup)
        self.total_steps = plan.total

        state = {"step": 0, "epoch": 0, "batch": 0, "best_score": None, "best_step": None, "samples": 0,
                 "train_seconds": 0.0, "history": [], "first_loss": None}
        self.position = state
        if resumed is not None:
            folder, payload = resumed
            self._load_checkpoint(folder, payload, state, step)
            log.info("resumed from %s (%s step %d)", folder.name, phase.name, state["step"])
        resumed_from = state["step"] if resumed is not None else None
        jsonl = _JsonlLog(self.work / phase.log_file, append=resumed is not None, enabled=self.is_main)
        global_batch = plan.batch_size * self.world
        log.info("%s: %d steps on %s (%s, %d process%s), %d examples", step.name, plan.total, self.device,
                 self.backend.name, self.world, "es" if self.world > 1 else "", phase.n_examples)

        step.start(self, resumed=resumed is not None)
        progress = logs.progress(total=plan.total, initial=state["step"], desc=step.name, unit="step", logger=log,
                                 enabled=self.training.progress and self.is_main)
        self._model.train()
        try:
            last_loss = self._loop(step, state, plan, global_batch, jsonl, progress, on_step)
        except BaseException:
            jsonl.close()
            raise
        finally:
            progress.close()

        if last:
            self.backend.end_training()
        if plan.eval_every and state["best_step"] is not None:
            if state["step"] % plan.eval_every:  # the final weights were not evaluated yet
                self._dev_eval(step, state, jsonl)
            if state["best_step"] != state["step"]:
                best = torch.load(self.work / "best.pt", weights_only=True, map_location="cpu")
                self.backend.load_trainable_state(best)
                log.info("using the dev-best weights of step %d", state["best_step"])
        # Evaluated again after training (not the result seen mid-training): mixed precision has ended by now, so the
        # recorded dev score is the fp32 model's, as the saved model will be served.
        dev = step.evaluate(self) if (plan.eval_at_end or plan.eval_every) else None
        if dev is not None:
            self._log(jsonl, {"event": "final_eval", "step": state["step"], "task": dev["task"],
                              "metric": dev["metric"], "score": dev["score"]})
        result = FitResult(state["step"], state["samples"], state["train_seconds"],
                           state["samples"] / max(state["train_seconds"], 1e-9), peak_rss_gb(), last_loss,
                           state["first_loss"], state["best_step"], dev, state["history"], resumed_from)
        self._log(jsonl, {"event": "done", **{k: v for k, v in result.stats().items() if k != "history"}})
        jsonl.close()
        return result

    def _loop(self, step: Step, state: dict, plan: _Plan, global_batch: int, jsonl: "_JsonlLog", progress,
              on_step) -> float | None:
        """The optimizer steps from state["step"] to the phase's total; returns the last step's loss."""
        t = self.training
        total, accumulation = plan.total, plan.accumulation
        last_loss = None
        while state["step"] < total:
            if state["batch"] == 0:
                record = step.before_epoch(self, state["step"], state["epoch"])
                if record:
                    self._log(jsonl, record)
            batches = self._epoch_batches(step, state["epoch"], global_batch)
            while state["batch"] < len(batches) and state["step"] < total:
                group = batches[state["batch"]:state["batch"] + accumulation]
                started = time.perf_counter()
                outs = []
                for i, rows in enumerate(group):
                    self.sync_gradients = i == len(group) - 1
                    self.batch_rows = rows
                    local = self._local_rows(rows)
                    outs.append(step.run(local, self, 1.0 / len(group)))
                self.sync_gradients = True
                self._fix_extra_grads()
                grad_norm = self.backend.optimizer_step()
                elapsed = time.perf_counter() - started
                state["step"] += 1
                state["batch"] += len(group)
                state["samples"] += sum(len(rows) for rows in group)
                state["train_seconds"] += elapsed
                record = _merge_records(outs)
                last_loss = record.get("loss")
                if state["first_loss"] is None:
                    state["first_loss"] = last_loss
                record = {"event": "train", "step": state["step"], "epoch": state["epoch"], **record,
                          "lr": self.backend.lr(), "grad_norm": grad_norm,
                          "samples_per_s": sum(len(r) for r in group) / elapsed}
                progress.update(1)
                if last_loss is not None:
                    progress.set_postfix(loss=f"{last_loss:.4f}",
                                         sps=f"{state['samples'] / max(state['train_seconds'], 1e-9):.2f}")
                if state["step"] % t.log_every == 0 or state["step"] == total:
                    self._log(jsonl, record)
                hooked = step.after_step(self, state["step"], total)
                if hooked:
                    self._log(jsonl, hooked)
                if plan.eval_every and state["step"] % plan.eval_every == 0:
                    self._dev_eval(step, state, jsonl)
                if t.checkpoint_every and state["step"] % t.checkpoint_every == 0 and state["step"] < total:
                    self._save_checkpoint(state, step)
                if on_step is not None:
                    on_step(state["step"], record)
            if state["batch"] >= len(batches):
                state["epoch"] += 1
                state["batch"] = 0
        return last_loss

    def _epoch_batches(self, step: Step, epoch: int, global_batch: int) -> list[list[int]]:
        """The step's batches, cut so that every process gets the same number of rows (collectives need equal
        shapes): a batch smaller than the number of processes is skipped, the remainder of others dropped."""
        batches = step.batches(epoch, global_batch)
        if self.world == 1:
            return batches
        return [b[: len(b) // self.world * self.world] for b in batches if len(b) >= self.world]

    def _local_rows(self, rows: list[int]) -> list[int]:
        per = len(rows) // self.world
        return rows[self.rank * per:(self.rank + 1) * per]

    def _fix_extra_grads(self) -> None:
        """Loss parameters got the full-batch gradient times the world size on every rank (see backends.py)."""
        if self.world > 1:
            for p in self._extra:
                if p.grad is not None:
                    p.grad.div_(self.world)

    def _log(self, jsonl: _JsonlLog, record: dict[str, Any]) -> None:
        jsonl.write(record)
        if self.trackers and "step" in record:
            event = record.get("event", "train")
            prefix = self._track_prefix  # earlier phases (the MNTP warm-up): "mntp/train/loss"
            values = {f"{prefix}{event}/{k}": v for k, v in record.items()
                      if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("step", "epoch")}
            if event == "train" and "scale" in record and record["scale"]:
                values[f"{prefix}train/temperature"] = 1.0 / record["scale"]
            if values:
                self.accelerator.log(values, step=record["step"])
        if record.get("event") in ("eval", "final_eval"):
            log.info("step %d: dev %s = %.4f", record["step"], record["metric"], record["score"])

    def _barrier(self) -> None:
        if torch.distributed.is_initialized():
            torch.distributed.barrier()

    def _check_work_shared(self, resume: bool) -> None:
        """Across nodes, every process must see the work folder rank 0 writes when the run uses it from all of them:
        checkpoints (every process writes its part into the folder rank 0 made, and reads it on --resume) and the
        dev-best weights (every process loads them). Without those only rank 0 writes, and the output may live on
        its node alone. A one-line error on every process, before the model is wrapped, instead of a missing file
        mid-run."""
        t = self.training
        if self.world == 1 or not (t.checkpoint_every or t.eval_every or resume):
            return
        token = [None]
        if self.is_main:
            self.work.mkdir(parents=True, exist_ok=True)
            token[0] = f".shared-{os.getpid()}-{time.time_ns()}"
            (self.work / token[0]).touch()
        torch.distributed.broadcast_object_list(token, src=0)
        seen = all_agree((self.work / token[0]).is_file())
        self._barrier()
        if self.is_main:
            (self.work / token[0]).unlink(missing_ok=True)
        if not seen:
            raise ConfigError(f"the processes of other nodes do not see {self.work.resolve()}, which rank 0 "
                              "writes beside the output: checkpoints (training.checkpoint_every, --resume) and the "
                              "dev-best weights (training.eval_every) need training.output_dir on storage that every "
                              "node shares",
                              field="training.output_dir")

    # ------------------------------------------------------------------ dev evaluation
    def _dev_eval(self, step: Step, state: dict, jsonl: _JsonlLog) -> None:
        result = step.evaluate(self)
        if result is None:
            return
        state["history"].append({"step": state["step"], "score": result["score"]})
        self._log(jsonl, {"event": "eval", "step": state["step"], "task": result["task"], "metric": result["metric"],
                          "score": result["score"]})
        higher = result.get("greater_is_better", True)
        best = state["best_score"]
        if best is None or (result["score"] > best if higher else result["score"] < best):
            state["best_score"], state["best_step"] = result["score"], state["step"]
            weights = self.backend.trainable_state()
            if self.is_main:
                with atomic_path(self.work / "best.pt") as tmp:
                    torch.save(weights, tmp)
            self._barrier()
        self._model.train()
        if getattr(self, "_on_eval", None) is not None:
            self._on_eval(state["step"], result, self.total_steps)

    # ------------------------------------------------------------------ checkpoints
    def has_checkpoint(self) -> bool:
        return bool(self._checkpoints())

    def _checkpoint_name(self, step: int) -> str:
        """step-N in the last phase (a run's own steps), PHASE-step-N in an earlier one (the MNTP warm-up's)."""
        last = self._phase_index == len(self._phases) - 1
        return f"step-{step}" if last else f"{self.phase.name}-step-{step}"

    def _checkpoints(self) -> list[Path]:
        """The complete checkpoints, oldest first: by phase (in this fit's order), then step."""
        folder = self.work / "checkpoints"
        if not folder.is_dir():
            return []
        names = [p.name for p in self._phases[:-1]]  # the phases whose checkpoints carry their name
        found = []
        for path in folder.iterdir():
            phase, _, number = path.name.rpartition("step-")
            phase = phase.removesuffix("-")
            if not number.isdigit() or not (path / ENGINE_FILE).is_file():
                continue
            order = len(names) if not phase else names.index(phase) if phase in names else -1
            found.append(((order, int(number)), path))
        return [path for _, path in sorted(found)]

    def _latest_checkpoint(self) -> Path | None:
        done = self._checkpoints()
        return done[-1] if done else None

    def _save_checkpoint(self, state: dict, step: Step) -> Path:
        """Every process writes its part into step-N.tmp; rank 0 renames it once all are done (atomic)."""
        target = self.work / "checkpoints" / self._checkpoint_name(state["step"])
        tmp = target.with_name(target.name + ".tmp")
        if self.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        self._barrier()
        self.backend.save(tmp)
        torch.save(get_rng(), tmp / f"rng-{self.rank}.pt")
        if self.is_main:
            torch.save({"position": dict(state), "phase": self.phase.name, "phases": self._done_phases,
                        "recipe_hash": recipe_hash(self.recipe), "world": self.world,
                        "step_state": step.state_dict()}, tmp / ENGINE_FILE)
        self._barrier()
        if self.is_main:
            shutil.rmtree(target, ignore_errors=True)
            os.replace(tmp, target)
            fsync_dir(target.parent)
            for stale in self._checkpoints()[: -self.training.keep_checkpoints]:
                shutil.rmtree(stale, ignore_errors=True)
        self._barrier()
        return target

    def _read_checkpoint(self, folder: Path) -> dict[str, Any]:
        payload = torch.load(folder / ENGINE_FILE, weights_only=True, map_location="cpu")
        if payload["recipe_hash"] != recipe_hash(self.recipe):
            raise ConfigError("the recipe changed since the checkpoint was written; resume needs the same recipe "
                              f"(or delete {self.work} to start again)", path=folder)
        if payload["world"] != self.world:
            raise ConfigError(f"the checkpoint was written by {payload['world']} process(es), this run has "
                              f"{self.world}; resume with the same --nproc", path=folder)
        return payload

    def _load_checkpoint(self, folder: Path, payload: dict, state: dict, step: Step) -> None:
        """The phase's step state, then weights + optimizer + schedule (the phase's, already started), RNG, position."""
        step.load_state_dict(payload["step_state"])  # before the weights: it may re-tokenize with the model
        self.backend.load(folder)
        set_rng(torch.load(folder / f"rng-{self.rank}.pt", weights_only=True))
        state.update(payload["position"])

    # ------------------------------------------------------------------ the result
    def full_model(self) -> nn.Module | None:
        """The trained model, whole and unwrapped, on rank 0 (None on the others). Collective."""
        return self.backend.full_model()

    def finish(self) -> None:
        """After the output is written: copy logs into it (rank 0), drop checkpoints, wait for everyone."""
        if self.is_main:
            shutil.rmtree(self.work / "checkpoints", ignore_errors=True)
        self._barrier()


def _merge_records(outs: list[dict[str, float]]) -> dict[str, float]:
    """Micro-batch records of one optimizer step: losses averaged, counts summed."""
    if len(outs) == 1:
        return dict(outs[0])
    merged: dict[str, float] = {}
    for key in outs[0]:
        values = [o[key] for o in outs if isinstance(o.get(key), (int, float))]
        if not values:
            continue
        merged[key] = sum(values) if key in ("masked", "padded") else sum(values) / len(values)
    return merged


def copy_run_logs(work: Path, target: Path) -> None:
    """The JSONL log and the tracker files of a run, into its output folder."""
    if (work / LOG_FILE).is_file():
        shutil.copyfile(work / LOG_FILE, target / LOG_FILE)
    if (work / MNTP_LOG_FILE).is_file():
        shutil.copyfile(work / MNTP_LOG_FILE, target / MNTP_LOG_FILE)
    if (work / TRACKING_DIR).is_dir():
        shutil.copytree(work / TRACKING_DIR, target / TRACKING_DIR, dirs_exist_ok=True)
