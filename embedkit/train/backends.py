"""How the training engine holds a model across processes: one process / DDP, DeepSpeed ZeRO-2/3, torch FSDP2.

Each backend wraps the model and its optimizer and owns the few things that differ between them: the module to call
for trainable forwards, gradient synchronisation (`sync`), `backward`, the optimizer step (clipping included),
the full trainable weights on rank 0, and the model + optimizer part of a checkpoint. The model and optimizer are
wrapped once per run (`wrap`); each phase of the run (engine.py's `Phase`) then starts with `start_phase`: the
optimizer's state cleared and a new warmup + linear-decay schedule from the phase's lr (`restart_optimizer`). The
loop itself, the schedule, logging, evaluation and the rest of a checkpoint live in embedkit/train/engine.py.

Why not all through Accelerate: Accelerate (1.15) sets up the processes, devices, mixed precision and DDP here, and
its trackers log the runs, but it runs DeepSpeed and FSDP only on accelerators (`PartialState` turns a CPU
DeepSpeed launch into one process per rank, and FSDP needs a GPU distributed type), which would leave both untested
on the CPU machines this project is built on. So DeepSpeed is driven through `deepspeed.initialize` and FSDP through
torch's `fully_shard`, the same code on CPU (gloo) and GPU (nccl).

Loss parameters (a learned temperature) stay outside the wrapped module: every rank computes the full gathered
batch's loss, so their gradient is already the full-batch gradient on every rank, times the world size the loss was
multiplied by (embedkit/train/losses/batch.py); the engine divides it back (`fix_extra_grads`).

The backends are a registry (`register_backend`, `backend_class`): each class says which recipe setting selects it,
which recipe combinations it refuses, and what it can do (`TrainingBackend`'s capability flags). Recipe validation,
the engine and the steps ask the selected class instead of reading `deepspeed.stage` / `fsdp.enabled` themselves,
so a new backend is one class here (and its recipe section in embedkit/train/config.py when it has settings);
docs/extending.md walks through one.
"""

from __future__ import annotations

import contextlib
import logging
import os
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, ClassVar, Iterator

import torch
from torch import nn

from embedkit.errors import ConfigError

log = logging.getLogger(__name__)

STATE_FILE = "state.pt"


def param_groups(model: nn.Module, training) -> list[dict]:
    """AdamW's parameter groups, for every backend: decayed and not decayed (biases and norm weights, the usual
    BERT/HF rule) at `training.lr`. With `training.head_lr` (reranker recipes), the weights the model made new rather
    than loaded (its `new_parameter_names`: a cross-encoder's one-logit head) go in groups of their own at head_lr,
    after the others (the logged lr stays the first group's); their `lr_scale` (head_lr / lr) is what
    `restart_optimizer` keeps for every phase."""
    head_lr = getattr(training, "head_lr", None)  # an LLM recipe's training section has none
    new = set(getattr(model, "new_parameter_names", ())) if head_lr is not None else set()
    decay, no_decay, new_decay, new_no_decay = [], [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        decayed = not (p.ndim < 2 or "norm" in name.lower())
        if name in new:
            (new_decay if decayed else new_no_decay).append(p)
        else:
            (decay if decayed else no_decay).append(p)
    wd = training.weight_decay
    groups = [{"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0.0}]
    if new_decay or new_no_decay:
        head = {"lr": head_lr, "lr_scale": head_lr / training.lr}
        groups += [{"params": new_decay, "weight_decay": wd, **head},
                   {"params": new_no_decay, "weight_decay": 0.0, **head}]
    return [g for g in groups if g["params"]]


def linear_schedule(optimizer, warmup: int, total: int):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1) if warmup else 1.0
        return max(0.0, (total - step) / max(1, total - warmup))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def make_adamw(groups: list[dict], lr: float):
    params = [p for g in groups for p in g["params"]]
    fused = all(p.device.type in ("cpu", "cuda") and p.dtype in (torch.float32, torch.bfloat16, torch.float16)
                for p in params)
    return torch.optim.AdamW(groups, lr=lr, fused=fused or None)


def restart_optimizer(optimizer, lr: float, warmup: int, total: int):
    """The optimizer as a fresh one would start (AdamW's moments and step counts are made lazily on its next step, as
    for a new AdamW), at `lr`, under a new warmup + linear-decay schedule over `total` steps; returns the schedule.
    The parameter groups (and, under DeepSpeed, the partitioned fp32 master weights they hold) stay; a group with an
    `lr_scale` (param_groups' new head) starts at lr times it."""
    optimizer.state.clear()
    for group in optimizer.param_groups:
        # a scheduler only sets initial_lr where it is missing
        group["lr"] = group["initial_lr"] = lr * group.get("lr_scale", 1.0)
    return linear_schedule(optimizer, warmup, total)


def trainable_names(model: nn.Module) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]


TRAINING_BACKENDS: dict[str, type["TrainingBackend"]] = {}
DEFAULT_BACKEND = "ddp"  # what a recipe that selects no other backend runs with


def register_backend(cls: type["TrainingBackend"]) -> type["TrainingBackend"]:
    """Class decorator: make a backend selectable (by `cls.selected_by`) under `cls.kind`."""
    if cls.kind in TRAINING_BACKENDS:
        raise ValueError(f"a training backend {cls.kind!r} is already registered")
    TRAINING_BACKENDS[cls.kind] = cls
    return cls


def backend_class(recipe) -> type["TrainingBackend"]:
    """The backend a recipe selects: the one registered backend whose `selected_by` says so, else the default
    (one process, or DDP across processes). ValueError when several claim the recipe."""
    chosen = [cls for cls in TRAINING_BACKENDS.values() if cls.selected_by(recipe)]
    if len(chosen) > 1:
        raise ValueError(f"choose one sharding engine: {' or '.join(c.selected_with for c in chosen)}, not both")
    return chosen[0] if chosen else TRAINING_BACKENDS[DEFAULT_BACKEND]


class TrainingBackend(ABC):
    """What every training backend is: the calls the engine makes (below), the recipe checks, the capabilities.

    The capability flags and recipe hooks are class-level, so that recipe validation, the engine and the steps ask
    the selected class (`backend_class(recipe)`) instead of testing the recipe's deepspeed / fsdp sections."""

    kind: ClassVar[str]  # registry key
    selected_with: ClassVar[str | None] = None  # the recipe setting that selects it, for error messages
    # Weights and optimizer state are partitioned across the processes: the saved model is rebuilt whole on rank 0.
    shards_parameters: ClassVar[bool] = False
    # Wants a torch.distributed process group even in one process (DeepSpeed runs through its communication layer).
    needs_process_group: ClassVar[bool] = False
    # Refuses to run in one process (nothing to shard).
    needs_several_processes: ClassVar[bool] = False
    # Applies mixed precision itself; Accelerate's autocast stays off.
    applies_precision: ClassVar[bool] = False
    # Online hard-negative re-mining re-encodes the pool in one process: backends that shard cannot host it yet.
    supports_online_mining: ClassVar[bool] = True
    # (import name, install hint) of the package it needs, checked when a recipe is validated.
    requires: ClassVar[tuple[str, str] | None] = None

    # ------------------------------------------------------------------ the recipe side (class methods)
    @classmethod
    def selected_by(cls, recipe) -> bool:
        """Whether the recipe asks for this backend (the default backend is chosen when no other is)."""
        return False

    @classmethod
    def check_recipe(cls, recipe) -> None:
        """Recipe combinations this backend cannot honour: ValueError (recipe validation names the recipe)."""

    @classmethod
    def check_launch(cls, recipe, device: torch.device, world: int) -> None:
        """What only the launch shows (processes, devices): ConfigError."""
        if cls.needs_several_processes and world == 1:
            raise ConfigError(f"{cls.kind} shards a model across processes: launch with --nproc 2 or more",
                              field=cls.selected_with)

    @classmethod
    def prepare_process(cls, recipe, device: torch.device) -> None:
        """Before the process group is made (environment a library reads when it starts)."""

    @classmethod
    def flattens_parameters(cls, recipe) -> bool:
        """Whether the model's parameters are flattened into buffers of the compute dtype when partitioned
        (DeepSpeed ZeRO-3): 4-bit weights must then be stored in that dtype (`bnb_4bit_quant_storage`)."""
        return False

    # ------------------------------------------------------------------ the run side
    def __init__(self, engine) -> None:
        self.engine = engine
        self.name = self.kind  # what logs and run statistics call it (DDP and DeepSpeed refine it)
        self.model: nn.Module | None = None  # what trainable forwards call
        self.unwrapped: nn.Module | None = None
        self.optimizer = None
        self.scheduler = None
        self.extra: list[nn.Parameter] = []

    def model_init(self) -> contextlib.AbstractContextManager:
        """Context to build the model in (ZeRO-3 partitions it while loading)."""
        return contextlib.nullcontext()

    @abstractmethod
    def wrap(self, model: nn.Module, extra: list[nn.Parameter]) -> None:
        """Once per run: the model wrapped with its optimizer (`extra`: loss parameters); `start_phase` follows."""

    @abstractmethod
    def start_phase(self, lr: float, total_steps: int, warmup: int) -> None:
        """Before a phase's first step (and before a checkpoint of it is loaded): the optimizer as new, at `lr`, and
        the phase's warmup + linear-decay schedule (`restart_optimizer`)."""

    @abstractmethod
    def sync(self, enabled: bool) -> contextlib.AbstractContextManager:
        """Wrap forward + backward of a micro-batch: `enabled` False accumulates without synchronising gradients."""

    @abstractmethod
    def backward(self, loss: torch.Tensor) -> None: ...

    def backward_from(self, outputs: torch.Tensor, grads: torch.Tensor) -> None:
        """Backpropagate known output gradients (GradCache's replay); with fp16 they are already loss-scaled."""
        outputs.backward(grads)

    @abstractmethod
    def optimizer_step(self) -> float | None:
        """Clip, step the optimizer and the schedule, clear the gradients; returns the gradient norm (or None)."""

    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def end_training(self) -> None:
        """After the last step: whatever the model needs to compute in full precision again."""

    def whole_parameter(self, parameter: nn.Parameter) -> torch.Tensor:
        """One parameter, whole and detached, on every process (a collective where the backend shards it); the
        MNTP warm-up reads the tied LM head this way each step."""
        return parameter.detach()

    # ------------------------------------------------------------------ weights
    @abstractmethod
    def trainable_state(self) -> dict[str, torch.Tensor]:
        """Full trainable weights ("model.<name>", "extra.<i>"), on the CPU; complete on rank 0 (others may return
        {}). A collective where the backend shards them."""

    @abstractmethod
    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None: ...

    def full_model(self) -> nn.Module | None:
        """The trained model, whole, on rank 0 (None elsewhere): what the output folder is written from."""
        return self.unwrapped if self.engine.rank == 0 else None

    # ------------------------------------------------------------------ checkpoints
    @abstractmethod
    def save(self, folder: Path) -> None:
        """Model + optimizer + scheduler into `folder`."""

    @abstractmethod
    def load(self, folder: Path) -> None: ...

    # ------------------------------------------------------------------ loss parameters beside a sharded model
    # Sharding engines optimise only the parameters of the module they wrap; the loss parameters (see the module
    # doc) get a small AdamW of their own with the same settings and schedule.
    extra_optimizer = None
    extra_scheduler = None

    def _make_extra_optimizer(self) -> None:
        if self.extra:
            self.extra_optimizer = make_adamw([{"params": self.extra, "weight_decay": 0.0}], self.engine.training.lr)

    def _restart_extra(self, lr: float, total_steps: int, warmup: int) -> None:
        if self.extra_optimizer is not None:
            self.extra_scheduler = restart_optimizer(self.extra_optimizer, lr, warmup, total_steps)

    def _step_extra(self) -> None:
        if self.extra_optimizer is not None:
            if self.engine.training.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(self.extra, self.engine.training.max_grad_norm)
            self.extra_optimizer.step()
            self.extra_scheduler.step()
            self.extra_optimizer.zero_grad(set_to_none=True)

    def _save_extra(self, folder: Path) -> None:
        if self.engine.rank == 0 and self.extra_optimizer is not None:
            torch.save({"extra": [p.detach().cpu() for p in self.extra],
                        "optimizer": self.extra_optimizer.state_dict(),
                        "scheduler": self.extra_scheduler.state_dict()}, folder / "extra.pt")

    def _load_extra(self, folder: Path) -> None:
        if self.extra_optimizer is not None:
            payload = torch.load(folder / "extra.pt", weights_only=True, map_location="cpu")
            with torch.no_grad():
                for p, value in zip(self.extra, payload["extra"]):
                    p.copy_(value)
            self.extra_optimizer.load_state_dict(payload["optimizer"])
            self.extra_scheduler.load_state_dict(payload["scheduler"])


@register_backend
class DataParallelBackend(TrainingBackend):
    """One process, or DDP across processes (Accelerate's `prepare`): what a recipe runs with unless it selects
    another backend. Called "single" in one process, "ddp" in several."""

    kind = "ddp"

    def __init__(self, engine) -> None:
        super().__init__(engine)
        self.name = "ddp" if engine.world > 1 else "single"

    def wrap(self, model: nn.Module, extra: list[nn.Parameter]) -> None:
        t = self.engine.training
        self.unwrapped, self.extra = model, extra
        groups = param_groups(model, t)
        if extra:
            groups.append({"params": extra, "weight_decay": 0.0})
        if not groups:
            raise RuntimeError("the model has no trainable parameters")
        optimizer = make_adamw(groups, t.lr)
        # The scheduler is not given to `prepare`: Accelerate would step it once per process per step.
        self.model, self.optimizer = self.engine.accelerator.prepare(model, optimizer)

    def start_phase(self, lr: float, total_steps: int, warmup: int) -> None:
        self.scheduler = restart_optimizer(self.optimizer.optimizer, lr, warmup, total_steps)
        self._restart_extra(lr, total_steps, warmup)

    def sync(self, enabled: bool) -> contextlib.AbstractContextManager:
        if enabled or self.engine.world == 1:
            return contextlib.nullcontext()
        return self.engine.accelerator.no_sync(self.model)

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.accelerator.backward(loss)

    def optimizer_step(self) -> float | None:
        t = self.engine.training
        grad_norm = None
        if t.max_grad_norm:
            params = [p for g in self.optimizer.param_groups for p in g["params"]]
            grad_norm = float(self.engine.accelerator.clip_grad_norm_(params, t.max_grad_norm))
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm

    def end_training(self) -> None:
        """Accelerate's mixed precision patches the model's forward with autocast; left on, the final evaluation and
        the saved probe vectors would be bf16 numbers of an fp32 model (measured: probes 1.1e-3 off, which
        `embedkit serve` refuses)."""
        if self.engine.training.mixed_precision != "no":
            self.engine.accelerator.unwrap_model(self.model, keep_fp32_wrapper=False)

    def trainable_state(self) -> dict[str, torch.Tensor]:
        state = {f"model.{n}": p.detach().cpu().clone() for n, p in self.unwrapped.named_parameters()
                 if p.requires_grad}
        state.update({f"extra.{i}": p.detach().cpu().clone() for i, p in enumerate(self.extra)})
        return state

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        params = {f"model.{n}": p for n, p in self.unwrapped.named_parameters() if p.requires_grad}
        params.update({f"extra.{i}": p for i, p in enumerate(self.extra)})
        _check_names(params, state)
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(state[name].to(p.device))

    def save(self, folder: Path) -> None:
        """Rank 0 writes (DDP replicas are equal)."""
        if self.engine.rank == 0:
            torch.save({"model": self.trainable_state(), "optimizer": self.optimizer.optimizer.state_dict(),
                        "scheduler": self.scheduler.state_dict()}, folder / STATE_FILE)

    def load(self, folder: Path) -> None:
        payload = torch.load(folder / STATE_FILE, weights_only=True, map_location="cpu")
        self.load_trainable_state(payload["model"])
        self.optimizer.optimizer.load_state_dict(payload["optimizer"])
        self.scheduler.load_state_dict(payload["scheduler"])


class ShardedBackend(TrainingBackend):
    """What DeepSpeed and FSDP share: loss parameters beside the sharded model, precision applied by the engine
    itself, one process refused for online mining, and the final model rebuilt unsharded on rank 0 (the step's
    builder) with the gathered trainable weights loaded into it."""

    shards_parameters = True
    needs_process_group = True
    applies_precision = True  # the saved model is rebuilt in full precision
    supports_online_mining = False

    def full_model(self) -> nn.Module | None:
        state = self.trainable_state()  # collective: every rank takes part
        if self.engine.rank != 0:
            return None
        fresh = self.engine.build_model_for_saving()
        named = {f"model.{n}": p for n, p in fresh.named_parameters() if p.requires_grad}
        _check_names(named, {k: v for k, v in state.items() if k.startswith("model.")})
        with torch.no_grad():
            for name, p in named.items():
                p.copy_(state[name].to(dtype=p.dtype))
        return fresh


def _check_names(params: dict, state: dict) -> None:
    if set(params) != set(state):
        missing = sorted(set(params) - set(state))[:3]
        unexpected = sorted(set(state) - set(params))[:3]
        raise ConfigError("the checkpoint does not match this model (different trainable parameters: "
                          f"missing {missing}, unexpected {unexpected})")


# ---------------------------------------------------------------------------------------------------- DeepSpeed
def deepspeed_config(engine) -> dict:
    t, ds = engine.training, engine.recipe.deepspeed
    zero: dict[str, Any] = {"stage": 3 if ds.stage == "zero3" else 2}
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu"}
    if ds.offload_params:
        zero["offload_param"] = {"device": "cpu"}
    if ds.stage == "zero3":
        # Gathering 16-bit weights on save is what `save_16bit_model` needs; embedkit gathers itself, so keep off.
        zero["stage3_gather_16bit_weights_on_model_save"] = False
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": t.batch_size,
        # embedkit marks the accumulation boundary itself (GradCache runs several backwards per step).
        "gradient_accumulation_steps": 1,
        "train_batch_size": t.batch_size * engine.world,
        # torch_adam: DeepSpeed's own CPU Adam would be compiled first; torch's is exact and ready.
        "optimizer": {"type": "AdamW", "params": {"lr": t.lr, "weight_decay": t.weight_decay, "torch_adam": True}},
        "zero_optimization": zero,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if t.max_grad_norm:
        config["gradient_clipping"] = t.max_grad_norm
    precision = t.mixed_precision if t.mixed_precision != "no" else engine.recipe.model.dtype
    if precision == "bf16":
        config["bf16"] = {"enabled": True}
    elif precision == "fp16":
        config["fp16"] = {"enabled": True}
    return config


@register_backend
class DeepSpeedBackend(ShardedBackend):
    """ZeRO-2 or ZeRO-3 (optionally offloading optimizer state and parameters to CPU memory)."""

    kind = "deepspeed"
    selected_with = "deepspeed.stage"
    requires = ("deepspeed", "pip install 'embedkit[deepspeed]'")

    @classmethod
    def selected_by(cls, recipe) -> bool:
        return recipe.deepspeed.stage != "none"

    @classmethod
    def check_recipe(cls, recipe) -> None:
        t = recipe.training
        if recipe.adapter.type == "qlora" and t.mixed_precision != "no":
            # DeepSpeed casts every float parameter to its precision, the 4-bit weights' packed storage included
            # (stored in the compute dtype for ZeRO-3): they must already be in it.
            raise ValueError("qlora under deepspeed computes in model.dtype: set model.dtype: bf16 instead of "
                             "training.mixed_precision")
        if t.mixed_precision == "fp16" and getattr(t, "grad_cache", None):
            raise ValueError("grad_cache with deepspeed needs bf16 or fp32 (fp16 loss scaling would apply twice)")

    @classmethod
    def prepare_process(cls, recipe, device: torch.device) -> None:
        if device.type == "cpu":
            os.environ.setdefault("DS_ACCELERATOR", "cpu")

    @classmethod
    def flattens_parameters(cls, recipe) -> bool:
        return recipe.deepspeed.stage == "zero3"

    def __init__(self, engine) -> None:
        import deepspeed

        super().__init__(engine)
        self.name = f"deepspeed-{engine.recipe.deepspeed.stage}"
        # DeepSpeed's communication layer over the process group the engine set up (it does not look by itself).
        deepspeed.init_distributed(dist_backend=torch.distributed.get_backend())
        self.config = deepspeed_config(engine)
        self.ds_engine = None

    @property
    def zero3(self) -> bool:
        return self.engine.recipe.deepspeed.stage == "zero3"

    def model_init(self) -> contextlib.AbstractContextManager:
        """Under ZeRO-3, `from_pretrained` partitions every weight as it loads (transformers reads the live
        HfDeepSpeedConfig), so no process ever holds the whole model. Released afterwards: a later load (the final
        save on rank 0) must not be partitioned."""

        @contextlib.contextmanager
        def scope() -> Iterator[None]:
            if not self.zero3:
                yield
                return
            from transformers.integrations import HfDeepSpeedConfig

            holder = HfDeepSpeedConfig(self.config)  # transformers keeps a weak reference to it
            try:
                yield
            finally:
                del holder

        return scope()

    def wrap(self, model: nn.Module, extra: list[nn.Parameter]) -> None:
        """One DeepSpeed engine for the whole run: its ZeRO optimizer holds the partitioned fp32 master weights, so
        it is made once; each phase clears its AdamW's state and gives the engine the phase's schedule."""
        import deepspeed

        t = self.engine.training
        self.unwrapped, self.extra = model, extra
        self.ds_engine, _, _, _ = deepspeed.initialize(
            model=model, model_parameters=param_groups(model, t), config=self.config)
        self.model = self.ds_engine
        self.optimizer = self.ds_engine.optimizer
        self._make_extra_optimizer()

    def start_phase(self, lr: float, total_steps: int, warmup: int) -> None:
        # The torch AdamW inside ZeRO (its param groups are the flat fp32 partitions); the engine steps the schedule
        # it holds, and saves / loads it with the checkpoint.
        self.scheduler = restart_optimizer(self.ds_engine.basic_optimizer, lr, warmup, total_steps)
        self.ds_engine.lr_scheduler = self.scheduler
        self._restart_extra(lr, total_steps, warmup)

    def sync(self, enabled: bool) -> contextlib.AbstractContextManager:
        self.ds_engine.set_gradient_accumulation_boundary(enabled)
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        self.ds_engine.backward(loss, scale_wrt_gas=False)

    def backward_from(self, outputs: torch.Tensor, grads: torch.Tensor) -> None:
        self.ds_engine.backward((outputs * grads).sum(), scale_wrt_gas=False)

    def optimizer_step(self) -> float | None:
        self.ds_engine.set_gradient_accumulation_boundary(True)
        self.ds_engine.step()  # clips (config gradient_clipping), steps, zeroes, steps the scheduler
        self._step_extra()
        norm = self.ds_engine.get_global_grad_norm()
        return float(norm) if norm is not None else None

    def whole_parameter(self, parameter: nn.Parameter) -> torch.Tensor:
        """Under ZeRO-3 a partitioned parameter is gathered (every process takes part) and copied, since it is
        released again on leaving the gather."""
        if not hasattr(parameter, "ds_id"):
            return parameter.detach()
        import deepspeed

        with deepspeed.zero.GatheredParameters([parameter]):
            return parameter.detach().clone()

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """The fp32 master weights (DeepSpeed's optimizer holds them, partitioned under ZeRO); collective."""
        from deepspeed.utils import safe_get_full_fp32_param

        state: dict[str, torch.Tensor] = {}
        for name, p in self.unwrapped.named_parameters():
            if p.requires_grad:
                full = safe_get_full_fp32_param(p)  # every rank takes part (an all-reduce under ZeRO-3)
                if self.engine.rank == 0:
                    state[f"model.{name}"] = full.detach().cpu().clone()
        if self.engine.rank == 0:
            state.update({f"extra.{i}": p.detach().cpu().clone() for i, p in enumerate(self.extra)})
        return state

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        """Set the master weights and the module's weights from a full state every rank has read; collective."""
        import deepspeed
        from deepspeed.utils import safe_set_full_fp32_param

        named = {f"model.{n}": p for n, p in self.unwrapped.named_parameters() if p.requires_grad}
        extra = {f"extra.{i}": p for i, p in enumerate(self.extra)}
        _check_names({**named, **extra}, state)
        for name, p in named.items():
            safe_set_full_fp32_param(p, state[name].to(device=self.engine.device, dtype=torch.float32))
        gathered = (deepspeed.zero.GatheredParameters(list(named.values()), modifier_rank=0) if self.zero3
                    else contextlib.nullcontext())
        with gathered, torch.no_grad():
            if self.engine.rank == 0 or not self.zero3:  # ZeRO-3 re-partitions rank 0's values on exit
                for name, p in named.items():
                    p.data.copy_(state[name].to(device=p.device, dtype=p.dtype))
            for name, p in extra.items():
                p.copy_(state[name].to(p.device))

    def save(self, folder: Path) -> None:
        self.ds_engine.save_checkpoint(str(folder), tag="deepspeed", exclude_frozen_parameters=True)
        self._save_extra(folder)

    def load(self, folder: Path) -> None:
        self.ds_engine.load_checkpoint(str(folder), tag="deepspeed", load_module_strict=False,
                                       load_optimizer_states=True, load_lr_scheduler_states=True)
        self._load_extra(folder)



# ---------------------------------------------------------------------------------------------------- FSDP2
@register_backend
class FSDPBackend(ShardedBackend):
    """torch FSDP2: every transformer layer (and the root) sharded with `fully_shard` across the processes."""

    kind = "fsdp"
    selected_with = "fsdp.enabled"
    needs_several_processes = True

    @classmethod
    def selected_by(cls, recipe) -> bool:
        return recipe.fsdp.enabled

    @classmethod
    def check_recipe(cls, recipe) -> None:
        if recipe.adapter.type == "qlora":
            raise ValueError("fsdp with qlora is not supported (bitsandbytes' 4-bit weights cannot be sharded by "
                             "FSDP2 here); use deepspeed.stage: zero3 for QLoRA across processes")

    @classmethod
    def check_launch(cls, recipe, device: torch.device, world: int) -> None:
        super().check_launch(recipe, device, world)
        if recipe.fsdp.offload_params and device.type != "cuda":
            raise ConfigError("fsdp.offload_params keeps GPU shards in CPU memory between uses: it needs GPUs",
                              field="fsdp.offload_params")

    def whole_parameter(self, parameter: nn.Parameter) -> torch.Tensor:
        """A DTensor shard: all-gathered. (FSDP replaces the parameters when it wraps the model: look them up after
        `wrap`.)"""
        if hasattr(parameter, "full_tensor"):
            return parameter.full_tensor().detach()
        return parameter.detach()

    def wrap(self, model: nn.Module, extra: list[nn.Parameter]) -> None:
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

        t, f = self.engine.training, self.engine.recipe.fsdp
        self.unwrapped, self.extra = model, extra
        kwargs: dict[str, Any] = {"reshard_after_forward": f.reshard_after_forward}
        if f.offload_params:
            kwargs["offload_policy"] = CPUOffloadPolicy()
        if t.mixed_precision != "no":
            dtype = torch.bfloat16 if t.mixed_precision == "bf16" else torch.float16
            kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
        for layer in _transformer_layers(model):
            fully_shard(layer, **kwargs)
        fully_shard(model, **kwargs)
        self.model = model
        self.optimizer = torch.optim.AdamW(param_groups(model, t), lr=t.lr)  # no fused DTensor kernel
        self._make_extra_optimizer()

    def start_phase(self, lr: float, total_steps: int, warmup: int) -> None:
        self.scheduler = restart_optimizer(self.optimizer, lr, warmup, total_steps)
        self._restart_extra(lr, total_steps, warmup)

    def sync(self, enabled: bool) -> contextlib.AbstractContextManager:
        self.model.set_requires_gradient_sync(enabled)
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def optimizer_step(self) -> float | None:
        t = self.engine.training
        grad_norm = None
        if t.max_grad_norm:
            norm = torch.nn.utils.clip_grad_norm_([p for g in self.optimizer.param_groups for p in g["params"]],
                                                  t.max_grad_norm)
            grad_norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self._step_extra()
        return grad_norm

    def _options(self, **kwargs):
        from torch.distributed.checkpoint.state_dict import StateDictOptions

        return StateDictOptions(full_state_dict=True, cpu_offload=True, **kwargs)

    def trainable_state(self) -> dict[str, torch.Tensor]:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        names = set(trainable_names(self.unwrapped))
        full = get_model_state_dict(self.model, options=self._options())
        state = {f"model.{n}": v for n, v in full.items() if n in names} if self.engine.rank == 0 else {}
        if self.engine.rank == 0:
            state.update({f"extra.{i}": p.detach().cpu().clone() for i, p in enumerate(self.extra)})
        return state

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        from torch.distributed.checkpoint.state_dict import set_model_state_dict

        model_state = {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}
        set_model_state_dict(self.model, model_state, options=self._options(strict=False))
        with torch.no_grad():
            for i, p in enumerate(self.extra):
                p.copy_(state[f"extra.{i}"].to(p.device))

    def save(self, folder: Path) -> None:
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        model = self.trainable_state()
        optimizer = get_optimizer_state_dict(self.model, self.optimizer, options=self._options())
        if self.engine.rank == 0:
            torch.save({"model": model, "optimizer": optimizer, "scheduler": self.scheduler.state_dict()},
                       folder / STATE_FILE)
        self._save_extra(folder)

    def load(self, folder: Path) -> None:
        from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

        payload = torch.load(folder / STATE_FILE, weights_only=True, map_location="cpu")
        self.load_trainable_state(payload["model"])
        set_optimizer_state_dict(self.model, self.optimizer, payload["optimizer"], options=self._options())
        self.scheduler.load_state_dict(payload["scheduler"])
        self._load_extra(folder)



def _transformer_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks of a transformer (BERT's encoder.layer, a decoder's layers): FSDP's sharding units."""
    for module in model.modules():
        for name in ("layer", "layers", "h"):
            blocks = getattr(module, name, None)
            if isinstance(blocks, nn.ModuleList) and len(blocks) > 0:
                return list(blocks)
    return []



