"""Many LoRA adapters on one served base (`embedkit serve --model base=minilm --adapter legal=DIR`).

One `AdapterHost` per served torch base: its encoder's backbone is wrapped once in a PEFT `PeftModel`, each adapter
folder is added with `load_adapter(name)`, and a model call picks its adapter with `set_adapter(name)` (the base
runs with no adapter active). The base's weights are in memory once; each adapter adds only its LoRA matrices.

Each adapter is served under its own name with its own MicroBatcher, so a model call never mixes adapters, and
every batcher of one host takes the host's lock for its call: switching the active adapter and the forward that uses
it are one step no other call can interleave with. (peft's mixed-batch forward, `adapter_names=[...]` per row, gives
the same vectors for BERT in eval mode, but it runs every LoRA layer once per adapter present in the batch, on
gathered sub-batches; per-adapter calls keep one adapter a call (`lora_inference_forward`) and the batcher's
length-sorted, budgeted calls. One mixed call of 256 texts over 8 adapters ran at 149.7 texts/s, 8 calls of 32 at
197.4 (MiniLM, r=16, 2 threads; a development measurement).)

An adapter folder is an `embedkit train` output with `adapter: {type: lora, save: adapter | both}` (its PEFT adapter
in `adapter/`, the run's manifest and probe vectors beside it), or a bare PEFT folder (`Encoder.save_adapter`). The
manifest records the fingerprint of the model the adapter was trained on; an adapter whose recorded base is not the
served base is refused, naming both fingerprints. Its probe vectors are re-embedded through the served adapter, as
for any model folder (`verify_probes`).
"""

from __future__ import annotations

import json
import logging
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from embedkit.errors import ModelError
from embedkit.manifest import MANIFEST_NAME
from embedkit.models.probes import has_probes
from embedkit.serve.backends import FingerprintCheck, ServeBackend, TorchBackend

log = logging.getLogger(__name__)

PEFT_CONFIG = "adapter_config.json"


def lora_inference_forward(layer, x, *args, **kwargs):
    """PEFT's LoRA `Linear.forward` for a served call, the same sum with fewer passes over the activations:
    `base(x) + B(A(x)) * scaling` makes two temporaries the size of the layer's output and adds them; here the
    low-rank product is added into the base's output in place (`addmm_`, the scaling as its alpha). On MiniLM, 2
    threads, 8 rank-16 adapters, 320 questions in calls of 32: PEFT's forward 215.9 texts/s, this one 277.9, the
    merged model 278.5, vectors equal to the merged model's within 1.5e-7 either way (a development measurement
    behind bench/records/serve/adapters-minilm.json, which is PEFT's forward). Anything else (training, adapters
    disabled or merged, a mixed batch, several active adapters, a LoRA variant such as DoRA, a LoRA bias, another
    dtype) goes to PEFT's own forward."""
    import torch

    active = layer.active_adapters
    name = active[0] if len(active) == 1 else None
    if (name is None or name not in layer.lora_A or torch.is_grad_enabled() or layer.training
            or layer.disable_adapters or layer.merged or kwargs.get("adapter_names") is not None
            or name in getattr(layer, "lora_variant", {}) or layer.lora_B[name].bias is not None
            or x.dtype != layer.lora_A[name].weight.dtype):
        return type(layer).forward(layer, x, *args, **kwargs)
    result = layer.base_layer(x, *args, **kwargs)
    low_rank = x.reshape(-1, x.shape[-1]) @ layer.lora_A[name].weight.t()
    result.view(-1, result.shape[-1]).addmm_(low_rank, layer.lora_B[name].weight.t(), alpha=layer.scaling[name])
    return result


def use_inference_forward(model) -> None:
    """Give every LoRA Linear layer of `model` (a PeftModel) `lora_inference_forward`, once (an instance attribute:
    `peft.unload()` replaces these layers, and the training code never sees it)."""
    from peft.tuners.lora.layer import Linear as LoraLinear

    for module in model.modules():
        if isinstance(module, LoraLinear) and "forward" not in vars(module):
            module.forward = lambda x, *args, _layer=module, **kwargs: lora_inference_forward(_layer, x, *args,
                                                                                              **kwargs)


@dataclass
class AdapterSpec:
    """One `--adapter NAME=DIR` argument (or a `POST /v1/adapters` body): the served name and the folder."""

    name: str
    path: str

    @classmethod
    def parse(cls, text: str) -> "AdapterSpec":
        name, sep, path = text.partition("=")
        if not sep or not name or not path:
            raise ModelError(f"--adapter {text!r}: expected NAME=DIR")
        check_adapter_name(name)
        return cls(name, path)


ADAPTER_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")


def check_adapter_name(name: str) -> None:
    """PEFT keys each adapter's modules by its name inside the model: a '.' (or anything but a plain identifier)
    would fail half-way through injecting them, so names are checked before anything is loaded."""
    if not ADAPTER_NAME.fullmatch(name):
        raise ModelError(f"adapter name {name!r}: use letters, digits, '-' and '_' (at most 64)")


@dataclass
class AdapterFolder:
    """What an adapter folder holds: the PEFT adapter's folder, the folder with the run's manifest and probes, and
    the fingerprint of the model the adapter was trained on (None: not recorded, a bare PEFT folder)."""

    peft_dir: Path
    folder: Path
    base_fingerprint: str | None
    base_name: str | None
    source: Path  # the file the base fingerprint comes from

    @classmethod
    def read(cls, path: str | Path) -> "AdapterFolder":
        folder = Path(path)
        if (folder / "adapter" / PEFT_CONFIG).is_file():  # an `embedkit train` output (adapter.save: adapter/both)
            peft_dir = folder / "adapter"
        elif (folder / PEFT_CONFIG).is_file():
            peft_dir = folder
        elif folder.is_dir():
            raise ModelError("not a LoRA adapter folder (no adapter/adapter_config.json): train with adapter: "
                             "{type: lora, save: adapter} (or both) to keep the adapter unmerged", path=folder)
        else:
            raise ModelError("no such adapter folder", path=folder)
        if not (peft_dir / "adapter_model.safetensors").is_file():  # a .bin adapter would be unpickled: refused
            raise ModelError("the adapter has no adapter_model.safetensors (pickled .bin adapters are not loaded)",
                             path=peft_dir)
        manifest_path = folder / MANIFEST_NAME
        try:
            manifest = json.loads(manifest_path.read_text(encoding="utf-8")) if manifest_path.is_file() else {}
        except (OSError, ValueError) as exc:
            raise ModelError(f"unreadable manifest: {exc}", path=manifest_path) from None
        # The model the adapter was attached to (attach_lora records it); older runs record only their lineage's
        # first base (base_model), which is the same model when training started from it.
        base = (manifest.get("adapter") or {}).get("base") or manifest.get("base_model") or {}
        fingerprint = base.get("fingerprint") if isinstance(base, dict) else None
        return cls(peft_dir, folder, fingerprint if isinstance(fingerprint, str) and fingerprint else None,
                   base.get("name") if isinstance(base, dict) else None, manifest_path)


class AdapterHost:
    """The served base and the LoRA adapters loaded onto it. Every model call of the base or of an adapter holds
    `lock` (re-entrant: the MicroBatcher takes it before timing its call, then `embed` takes it again)."""

    def __init__(self, base: TorchBackend) -> None:
        self.base = base
        self.encoder = base.encoder
        if self.encoder.has_adapter:
            raise ModelError(f"{base.name} already carries an adapter: serve a merged model or a plain base as "
                             "the base of --adapter")
        self._base_fingerprint: str | None = None
        self.lock = threading.RLock()
        self.adapters: dict[str, "AdapterBackend"] = {}
        self._plain_backbone = self.encoder.backbone

    @property
    def base_fingerprint(self) -> str:
        """The served base's Encoder.fingerprint, computed (hashing every weight) the first time an adapter is
        checked, before any adapter wraps the backbone."""
        if self._base_fingerprint is None:
            with self.lock:
                if self.adapters:
                    raise RuntimeError("the base fingerprint is taken before the first adapter is loaded")
                self._base_fingerprint = self.encoder.fingerprint
        return self._base_fingerprint

    @property
    def peft(self):
        return self.encoder.backbone if self.adapters else None

    def embed(self, adapter: str | None, id_lists: Sequence[Sequence[int]]) -> np.ndarray:
        """One model call with `adapter` active (None: the base alone)."""
        import torch

        with self.lock:
            peft = self.peft
            if peft is None:  # no adapter loaded: the base backend's own call, unchanged
                if adapter is not None:
                    raise ModelError(f"adapter {adapter!r} has been removed")
                return self.base.embed_ids(id_lists)
            with torch.inference_mode():
                if adapter is None:
                    with peft.disable_adapter():
                        return self.encoder.forward(self.encoder.collate(id_lists)).cpu().numpy()
                if peft.active_adapter != adapter:
                    peft.set_adapter(adapter)
                return self.encoder.forward(self.encoder.collate(id_lists)).cpu().numpy()

    def base_check(self, adapter: AdapterFolder) -> FingerprintCheck | None:
        if adapter.base_fingerprint is None:
            return None
        return FingerprintCheck(adapter.base_fingerprint == self.base_fingerprint, "base weights fingerprint",
                                adapter.base_fingerprint, self.base_fingerprint, str(adapter.source))

    def add(self, name: str, path: str | Path) -> "AdapterBackend":
        """Load the adapter folder onto the base as `name`. A folder trained on another base is a one-line
        ModelError naming both fingerprints (nothing is loaded)."""
        from peft import PeftModel

        check_adapter_name(name)
        if name in self.adapters:
            raise ModelError(f"an adapter named {name!r} is already loaded on {self.base.name}")
        folder = AdapterFolder.read(path)
        self.base_fingerprint  # noqa: B018 - taken now, while the backbone is still the plain base
        check = self.base_check(folder)
        if check is not None and not check.ok:
            raise ModelError(
                f"adapter {name!r} was trained on base fingerprint {check.recorded[:12]}"
                f"{f' ({folder.base_name})' if folder.base_name else ''}, but the served base {self.base.name!r} has "
                f"fingerprint {check.actual[:12]} (weights, tokenizer and embedding settings): serve it on the base "
                "it was trained on", path=folder.source)
        if check is None:
            log.warning(f"[{name}] {folder.folder} records no base fingerprint: its base is not checked")
        with self.lock:
            try:
                if not self.adapters:
                    self.encoder.backbone = PeftModel.from_pretrained(self._plain_backbone, str(folder.peft_dir),
                                                                      adapter_name=name, is_trainable=False)
                else:
                    self.encoder.backbone.load_adapter(str(folder.peft_dir), adapter_name=name, is_trainable=False)
            except (ValueError, RuntimeError, KeyError, OSError) as exc:
                if not self.adapters:
                    self.encoder.backbone = self._plain_backbone
                raise ModelError(f"cannot load adapter {name!r} onto {self.base.name}: "
                                 f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}",
                                 path=folder.peft_dir) from None
            self.encoder.backbone.eval()
            use_inference_forward(self.encoder.backbone)
            backend = AdapterBackend(self, name, folder, check)
            self.adapters[name] = backend
        return backend

    def remove(self, name: str) -> None:
        """Drop the adapter's LoRA weights. The last one removed unwraps the backbone again (peft cannot run a
        PeftModel whose every adapter was deleted)."""
        with self.lock:
            if name not in self.adapters:
                raise ModelError(f"no adapter {name!r} on {self.base.name}")
            peft = self.encoder.backbone
            del self.adapters[name]
            if self.adapters:
                peft.delete_adapter(name)
            else:
                self._plain_backbone = self.encoder.backbone = peft.unload()  # the base, LoRA layers removed

    def parameter_bytes(self) -> dict[str, int]:
        """Bytes of the base's weights and of each adapter's LoRA weights, as held in memory now."""
        out = {"base": 0, **{name: 0 for name in self.adapters}}
        for key, tensor in self.encoder.backbone.state_dict(keep_vars=True).items():
            owner = next((name for name in self.adapters if f".{name}." in key or key.endswith(f".{name}")),
                         "base")
            out[owner] += tensor.numel() * tensor.element_size()
        return out


class AdapterBackend(ServeBackend):
    """One adapter served under its own name: the base's tokenizer and settings, its calls through the host."""

    kind = "torch"
    help = "a LoRA adapter on a served torch base (--adapter)"

    @classmethod
    def load(cls, spec, *, threads, device):  # made by AdapterHost.add, never from --model
        raise ModelError("an adapter is served with --adapter NAME=DIR on a --model base")

    def __init__(self, host: AdapterHost, name: str, folder: AdapterFolder, check: FingerprintCheck | None) -> None:
        base = host.base
        self.host, self.name, self.adapter = host, name, folder
        self.dim, self.max_length, self.normalize = base.dim, base.max_length, base.normalize
        self.folder = folder.folder if has_probes(folder.folder) else None
        self._check = check

    def token_ids(self, texts: Sequence[str], kind: str, *, max_length: int | None = None) -> list[list[int]]:
        return self.host.base.token_ids(texts, kind, max_length=max_length)

    def embed_ids(self, id_lists: Sequence[Sequence[int]]) -> np.ndarray:
        return self.host.embed(self.name, id_lists)

    def describe(self) -> dict[str, Any]:
        info = self.host.encoder.describe()
        return {**{k: info[k] for k in ("pooling", "prompts", "max_length", "normalize", "dim")},
                "backend": "torch", "parent": self.host.base.name, "path": str(self.adapter.folder),
                "base_fingerprint": self.host.base_fingerprint}

    def fingerprint_check(self) -> FingerprintCheck | None:
        """The base fingerprint the adapter records against the served base's (exact)."""
        return self._check


class HostedBaseBackend(ServeBackend):
    """The base model itself while adapters are loaded onto it: its calls run with no adapter active."""

    kind = "torch"
    help = "a torch base serving LoRA adapters"
    serves_chat = True

    @classmethod
    def load(cls, spec, *, threads, device):
        raise ModelError("made by the server for a --model that serves --adapter")

    def __init__(self, host: AdapterHost) -> None:
        base = host.base
        self.host, self.name = host, base.name
        self.dim, self.max_length, self.normalize, self.folder = base.dim, base.max_length, base.normalize, base.folder
        self.encoder = base.encoder

    def token_ids(self, texts: Sequence[str], kind: str, *, max_length: int | None = None) -> list[list[int]]:
        return self.host.base.token_ids(texts, kind, max_length=max_length)

    def embed_ids(self, id_lists: Sequence[Sequence[int]]) -> np.ndarray:
        return self.host.embed(None, id_lists)

    def describe(self) -> dict[str, Any]:
        info = self.host.base.describe()
        return {**info, "fingerprint": self.host._base_fingerprint or info["fingerprint"], "adapter": False}

    def __getattr__(self, name: str) -> Any:  # anything else a caller reads of the base backend
        return getattr(self.host.base, name)


def host_for(hosts: dict[str, AdapterHost], folder: AdapterFolder, base: str | None) -> AdapterHost:
    """The host an adapter goes on: `base` when named, else the only one, else the one whose base fingerprint the
    adapter records."""
    if not hosts:
        raise ModelError("no model served here takes adapters: they go on a torch --model (not an ONNX or OpenVINO "
                         "export, not a model that already carries an adapter)")
    if base is not None:
        if base not in hosts:
            raise ModelError(f"base {base!r} cannot take adapters; bases served here: {', '.join(hosts) or 'none'} "
                             "(a torch --model)")
        return hosts[base]
    if len(hosts) == 1:
        return next(iter(hosts.values()))
    matching = [host for host in hosts.values() if host.base_fingerprint == folder.base_fingerprint]
    if len(matching) == 1:
        return matching[0]
    raise ModelError(f"say which base the adapter goes on ({', '.join(hosts)}): its recorded base fingerprint "
                     f"{(folder.base_fingerprint or 'none')[:12]} matches {len(matching)} of them", path=folder.folder)
