"""Many LoRA adapters on one served base (`embedkit serve --model base=minilm --adapter legal=DIR`).

One `AdapterHost` per served torch base: its encoder's backbone is wrapped once in a PEFT `PeftModel` and each
adapter folder is added with `load_adapter(name)`. The base's weights are in memory once; each adapter adds only
its LoRA matrices.

The base and its adapters are one model, so the server gives them one MicroBatcher (each served name a
`BatcherLane` into it) and a model call holds rows of several adapters: `embed_rows` puts each adapter's rows side
by side and `lora_inference_forward` runs the base's weights over all of them, adding each segment's own low-rank
product, under the host's lock (adding or removing an adapter never interleaves with a call). No `set_adapter` per
call. Written here, not taken from PEFT: peft's mixed-batch forward (`adapter_names=[...]` per row) gives the same
vectors for BERT in eval mode, but makes output-sized temporaries per adapter on gathered sub-batches; one mixed
call of 256 texts over 8 adapters ran at 149.7 texts/s through it, 8 calls of 32 at 197.4 (MiniLM, r=16, 2 threads;
a development measurement). An adapter that is not plain LoRA (DoRA, a LoRA bias, LoRA on embeddings) runs in calls
of its own through PEFT's forward.

An adapter folder is an `embedkit train` output with `adapter: {type: lora, save: adapter | both}` (its PEFT adapter
in `adapter/`, the run's manifest and probe vectors beside it), or a bare PEFT folder (`Encoder.save_adapter`). The
manifest records the fingerprint of the model the adapter was trained on; an adapter whose recorded base is not the
served base is refused, naming both fingerprints. Its probe vectors are re-embedded through the served adapter, as
for any model folder (`verify_probes`).
"""

from __future__ import annotations

import contextlib
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
from embedkit.serve.batcher import TaggedRow

log = logging.getLogger(__name__)

PEFT_CONFIG = "adapter_config.json"


class CallPlan:
    """Which rows of the model call in progress take which adapter: `segments` of (adapter or None for the base
    alone, first row, row after the last), rows of one adapter side by side; None outside the host's calls."""

    __slots__ = ("segments",)

    def __init__(self) -> None:
        self.segments: list[tuple[str | None, int, int]] | None = None


def lora_inference_forward(layer, x, plan: CallPlan, *args, **kwargs):
    """PEFT's LoRA `Linear.forward` for a served call, the same sum with fewer passes over the activations and
    several adapters in one call. PEFT's `base(x) + B(A(x)) * scaling` makes two temporaries the size of the
    layer's output and adds them; here each segment's low-rank product is added into its rows of the base's output
    in place (`addmm_`, the scaling as its alpha), and rows of the base alone get none. The base's weights, the
    bulk of the work, run once over every row of the call, as in a merged model. Served, 8 rank-16 adapters on
    MiniLM went from 0.62x / 0.49x a merged model's throughput through PEFT's forward (concurrency 1 / 8,
    bench/records/serve/adapters-minilm.json) to 0.72x / 0.57x with this sum in calls of one adapter
    (adapters-minilm-inplace.json) and 0.83x / 0.78x with calls mixing adapters (adapters-minilm-shared-batcher.json).
    Served calls are small (the batcher sizes them to ~0.1 s: 13 to 23 short texts), so what runs per layer and
    segment besides the two products counts as well: it reads the factors `store_for_inference` laid out
    (`served_lora`: no ModuleDict, Parameter or PEFT property lookups), calls the base Linear's kernel directly and
    slices flat token rows (one-text calls: 10.9 -> 9.1 ms against a merged model's 8.3, a development measurement;
    served, 0.78x / 0.77x in adapters-minilm-served-factors.json, within the bench's run-to-run spread).
    Outside a served call (training, no plan) and in the layer states PEFT handles otherwise (merged, an
    `adapter_names` mixed batch) PEFT's own forward runs; adapters this forward cannot sum (a LoRA variant such as
    DoRA, a LoRA bias, another dtype, LoRA outside Linear layers) never reach it (`AdapterHost.plain`), and PEFT's
    disabled state does not apply here: the host disables PEFT's adapters around a planned call so that such an
    adapter's other layers stay out of it, while the segments say what each Linear layer adds."""
    import torch

    segments = plan.segments
    if (segments is None or torch.is_grad_enabled() or layer.training or layer.merged
            or kwargs.get("adapter_names") is not None):
        return type(layer).forward(layer, x, *args, **kwargs)
    base = layer.base_layer
    result = (torch.nn.functional.linear(x, base.weight, base.bias) if type(base) is torch.nn.Linear and not args
              and not kwargs else base(x, *args, **kwargs))
    rows = segments[-1][2]
    if x.dim() < 2 or x.shape[0] != rows:  # rows are sliced by segment below
        raise RuntimeError("a served adapter call needs the rows first in every LoRA layer's input: got "
                           f"{tuple(x.shape)}")
    factors = layer.served_lora
    flat_in, flat_out = x.reshape(-1, x.shape[-1]), result.view(-1, result.shape[-1])
    per_row = flat_in.shape[0] // rows  # token rows per text (1 for pooled inputs)
    for name, first, end in segments:
        if name not in factors:  # the base alone, or an adapter that skips this layer
            continue
        a_t, b_t, scaling = factors[name]
        span = slice(first * per_row, end * per_row)  # the rows of one adapter are side by side
        flat_out[span].addmm_(flat_in[span] @ a_t, b_t, alpha=scaling)
    return result


def use_inference_forward(model, plan: CallPlan) -> None:
    """Give every LoRA Linear layer of `model` (a PeftModel) `lora_inference_forward` reading `plan`, once (an
    instance attribute: `peft.unload()` replaces these layers, and the training code never sees it)."""
    from peft.tuners.lora.layer import Linear as LoraLinear

    for module in model.modules():
        if isinstance(module, LoraLinear) and "forward" not in vars(module):
            module.served_lora = {}
            module.forward = lambda x, *args, _layer=module, **kwargs: lora_inference_forward(_layer, x, plan, *args,
                                                                                              **kwargs)


def store_for_inference(model, name: str) -> None:
    """Lay adapter `name`'s LoRA matrices out transposed in memory (the parameters keep their shapes and values, as
    views) and list them in each layer's `served_lora` as (A.T, B.T, scaling), what `lora_inference_forward`
    multiplies by: a contiguous right-hand operand made those skinny products several times faster (MiniLM's
    layers, 360 token rows, 2 threads: x @ A.T 150 -> 40 us for the 1536-wide input; a development measurement).
    No copy is kept: served memory stays one set of LoRA weights."""
    import torch
    from peft.tuners.lora.layer import Linear as LoraLinear

    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, LoraLinear) and name in module.lora_A:
                a, b = module.lora_A[name].weight, module.lora_B[name].weight
                for weight in (a, b):
                    weight.data = weight.data.t().contiguous().t()
                module.served_lora[name] = (a.detach().t(), b.detach().t(), float(module.scaling[name]))


def forget_for_inference(model, name: str) -> None:
    """Drop adapter `name` from every layer's `served_lora` (before PEFT deletes its weights)."""
    for module in model.modules():
        getattr(module, "served_lora", {}).pop(name, None)


def plain_lora(model, name: str) -> bool:
    """Whether adapter `name` is only plain LoRA on Linear layers in the model's dtype, which
    `lora_inference_forward` sums (no DoRA or other variant, no LoRA bias, no LoRA on embeddings or convolutions)."""
    from peft.tuners.lora.layer import Linear as LoraLinear
    from peft.tuners.lora.layer import LoraLayer

    for module in model.modules():
        if not isinstance(module, LoraLayer):
            continue
        holds = name in module.lora_A or name in getattr(module, "lora_embedding_A", {})
        if not holds:
            continue
        if (not isinstance(module, LoraLinear) or name not in module.lora_A
                or name in getattr(module, "lora_variant", {}) or module.lora_B[name].bias is not None
                or module.lora_A[name].weight.dtype != module.base_layer.weight.dtype):
            return False
    return True


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
    """The served base and the LoRA adapters loaded onto it. Every model call (`embed_rows`) holds `lock`, and so
    do adding and removing an adapter: a call never sees the model half changed."""

    def __init__(self, base: TorchBackend) -> None:
        self.base = base
        self.encoder = base.encoder
        if self.encoder.has_adapter:
            raise ModelError(f"{base.name} already carries an adapter: serve a merged model or a plain base as "
                             "the base of --adapter")
        self._base_fingerprint: str | None = None
        self.lock = threading.RLock()
        self.adapters: dict[str, "AdapterBackend"] = {}
        self.plain: dict[str, bool] = {}  # adapter -> its LoRA is summed by lora_inference_forward (plain_lora)
        self.plan = CallPlan()
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
        return self.embed_rows([TaggedRow(ids, adapter) for ids in id_lists])

    def embed_rows(self, rows: Sequence[TaggedRow]) -> np.ndarray:
        """One model call over rows of several adapters (TaggedRow.tag: the adapter, None for the base alone), the
        shared batcher's call: rows regrouped by adapter (padding is the call's longest row either way), each group a
        segment of `lora_inference_forward`, vectors back in the given order. Adapters that are not plain LoRA run
        apart through PEFT's forward."""
        import torch

        groups: dict[str | None, list[int]] = {}
        for i, row in enumerate(rows):
            groups.setdefault(row.tag, []).append(i)
        with self.lock, torch.inference_mode():
            peft = self.peft
            for name in groups:
                if name is not None and name not in self.adapters:
                    raise ModelError(f"adapter {name!r} has been removed")
            if peft is None:  # no adapter loaded: the base backend's own call, unchanged
                return self.base.embed_ids([row.ids for row in rows])
            together = [name for name in groups if name is None or self.plain[name]]
            out = None
            for call in ([together] if together else []) + [[name] for name in groups if name not in together]:
                order = [i for name in call for i in groups[name]]
                vectors = self._forward(peft, call, [len(groups[name]) for name in call],
                                        [rows[i].ids for i in order])
                if out is None:
                    out = np.empty((len(rows), vectors.shape[1]), dtype=np.float32)
                out[order] = vectors
            return out

    def _forward(self, peft, names: list[str | None], counts: list[int], id_lists) -> np.ndarray:
        """The encoder's forward over `id_lists`, `counts[k]` rows of adapter `names[k]` after each other."""
        features = self.encoder.collate(id_lists)
        if len(names) == 1 and names[0] is not None and not self.plain[names[0]]:  # PEFT's own forward
            if peft.active_adapter != names[0]:
                peft.set_adapter(names[0])
            return self.encoder.forward(features).cpu().numpy()
        bounds = np.cumsum([0, *counts]).tolist()
        # An adapter that is not plain LoRA may hold layers PEFT runs with its active adapter (LoRA on embeddings):
        # disabled, they give the base's output, and the planned Linear layers ignore the flag.
        others_off = peft.disable_adapter() if not all(self.plain.values()) else contextlib.nullcontext()
        self.plan.segments = [(name, bounds[k], bounds[k + 1]) for k, name in enumerate(names)]
        try:
            with others_off:
                return self.encoder.forward(features).cpu().numpy()
        finally:
            self.plan.segments = None

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
            use_inference_forward(self.encoder.backbone, self.plan)
            self.plain[name] = plain_lora(self.encoder.backbone, name)
            if self.plain[name]:
                store_for_inference(self.encoder.backbone, name)
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
            self.plain.pop(name, None)
            forget_for_inference(peft, name)
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
