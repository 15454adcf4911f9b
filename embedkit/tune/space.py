"""What `embedkit tune` searches, within which bounds, and why those bounds should hold on other corpora.

Every bound is set around the recipe (its own value is always inside, trial 0 is the recipe as written and trial 1
the recipe trained longer: `longer_schedule`), and each parameter is searched only where the recipe can use it:

| name | recipe keys | searched | bounds |
|---|---|---|---|
| lr | training.lr | always | log-uniform, recipe lr / 4 .. x 4 |
| epochs | training.epochs | unless training.max_steps is set | 1 .. max(3, recipe, enough for 150 steps) (cap 10) |
| temperature | loss.temperature | always | log-uniform, 0.01 .. 0.1 |
| hard_negatives | loss.hard_negatives | the recipe mines (mining.online), or its data carries negatives | 1 .. 3 mining; 0 .. min(3, in the data) |
| mined_negatives | loss.hard_negatives, mining.online | the recipe neither mines nor has negatives (and could mine) | 0 (as written) .. 3: mine online |
| mining_range | mining.range | the recipe mines, or a trial turns mining on | 0:30, 3:50, 10:100, 30:100, 30:200 (+ the recipe's) |
| relative_margin | mining.relative_margin | the recipe mines and the base model's mining left most rows without negatives (or named in --params) | 0 .. 0.1 |
| margin_from | mining.margin_from | as relative_margin | weakest, strongest |
| lora_r | adapter.r (+ adapter.alpha, ratio kept) | adapter lora / qlora | 4, 8, 16, 32, 64 (+ the recipe's) |

Why the bounds hold beyond SciFact and MedQuAD:

- lr: the right step size is set by the model and the adapter far more than by the corpus (full fine-tuning of
  pretrained sentence encoders lands at 1e-5..5e-5, LoRA at 1e-4..1e-3); the recipe's lr is the family's value, and
  a 16x band around it covers those ranges while leaving room for small, noisy corpora that want less.
- epochs: what moves a pretrained encoder is the number of optimizer steps more than the number of passes. A big
  corpus gets a few hundred steps within one epoch and gains little beyond 3 passes; a small one (1e2..1e3 pairs,
  the usual domain set) gets 25-30 steps per epoch at batch 32 and needs more passes to get them (MedQuAD, 1,000
  pairs, test nDCG@10, seed 42: 3 epochs at 5e-5 0.9256, 6 epochs 0.9375). So the upper bound is 3 or the epochs
  that give MIN_STEPS optimizer steps, whichever is more (at most MAX_EPOCHS); overfitting a small corpus is what
  the dev score then catches.
- temperature: InfoNCE on cosine scores works between 0.01 and 0.1 in every current recipe (E5 0.01, BGE 0.02,
  sentence-transformers' MNRL 0.05, SimCSE 0.05); it is tied to the cosine scale, not to the corpus.
- hard_negatives: 1-3 mined negatives per query give most of their gain (NV-Retriever, and bench_mine here: +0.01
  at 3 negatives, 4.3x the training time); more multiplies the cost of every trial.
- mined_negatives: a recipe written without negatives is the common first recipe (pairs are what teams have), and
  mined negatives were the largest single gain measured here (bench_mine: +0.013 SciFact, +0.057 MedQuAD) and in the
  literature (DPR, ANCE, NV-Retriever) on corpora of every kind; whether they help *this* corpus (false negatives
  when many relevant documents are unlabelled, the extra forward passes) is what the dev score decides, so 0 (the
  recipe as written) stays a choice. The window (and, when the base model's mining flags it, the margin) is then
  searched with it, since where the unlabelled positives sit in the ranking is corpus-specific.
- mining_range: the top ranks of the model's own ranking hold the unlabelled positives (more of them when labels
  are sparse, fewer when every relevant document is judged), the tail holds easy negatives. How densely a corpus is
  labelled is exactly what differs between corpora, so the window is searched, within the top 200 where all common
  miners work (NV-Retriever, sentence-transformers' mine_hard_negatives).
- relative_margin / margin_from: the margin is relative to the positive's score, and how a model scores this
  corpus's positives (weak, graded, many per query) is corpus-specific; 0..0.1 spans "off" to twice NV-Retriever's
  5%. Searched when the base model's mining shows the margin leaving most rows without a negative.
- lora_r: the adapter's capacity; retrieval fine-tuning on 1e2..1e5 pairs saturates between r 8 and 32, and alpha
  moves with r (alpha / r as in the recipe) so the update scale, and with it the lr, keeps its meaning.

Not searched: batch size (the number of in-batch negatives and the memory: larger is better up to what fits, not a
corpus property; set it to what fits), max length (a property of the texts: set it from their lengths), warmup and
weight decay (small effects), the loss type and pooling (the model's).

A reranker recipe (`task: rerank`) has a space of its own (`_reranker_space`), scored by the two-stage dev score
(rerank.first_stage's top rerank.top_k of the dev corpus, reranked: embedkit/train/rerank.py's DevReranking):

| name | recipe keys | searched | bounds |
|---|---|---|---|
| lr | training.lr | always | log-uniform, recipe lr / 4 .. x 4 |
| epochs | training.epochs | unless training.max_steps is set | as for the bi-encoder |
| hard_negatives | loss.hard_negatives (+ mining.num_negatives when set) | always | 1 .. max(7, recipe); mined or in the data |
| loss_type | loss.type | always | listwise, bce |
| warmup_ratio | training.warmup_ratio | always | 0 .. 0.2 |
| lora_r | adapter.r (+ adapter.alpha) | adapter lora / qlora (the yes/no reranker) | as for the bi-encoder |

- hard_negatives: the group a query's positive is scored against. Reranker trainers use larger groups than
  bi-encoders (FlagEmbedding's train_group_size 8 to 16, the rerank recipes' 7 negatives), since there are no
  in-batch negatives: every negative is all a row sees. Each one adds a pair's forward pass, so the cost grows with
  it, and how many of the first stage's top ranks are unlabelled positives (false negatives) is corpus-specific.
  When the rows carry their negatives (`embedkit mine` output), at most as many as the data holds.
- loss_type: listwise learns an order within a query's candidates (what reranking uses), bce calibrated
  per-pair scores; which one ranks this corpus's candidates better is an empirical question on every benchmark
  that reports both, and both cost the same.
- warmup_ratio: the new one-logit head starts random, so the first steps' gradients through the pretrained encoder
  are large; a warm-up protects the encoder from them, and how much it needs depends on the steps a corpus gets.
  Cheap to search: it changes no cost.

Not searched for rerankers: temperature, the mining window and margin, mined_negatives, pooling, prompts,
matryoshka (the bi-encoder's; `_check_rerank` refuses them in a rerank recipe), top_k (the serving setting the
dev score is defined by) and batch size (memory).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from embedkit.errors import ConfigError
from embedkit.train.backends import backend_class

MINING_WINDOWS = ("0:30", "3:50", "10:100", "30:100", "30:200")
LORA_RANKS = (4, 8, 16, 32, 64)
TEMPERATURE_BOUNDS = (0.01, 0.1)
MARGIN_BOUNDS = (0.0, 0.1)
MAX_HARD_NEGATIVES = 3
MAX_RERANK_NEGATIVES = 7  # a reranker's group: positive + 7 (FlagEmbedding's train_group_size 8)
WARMUP_BOUNDS = (0.0, 0.2)
BASE_EPOCHS = 3  # the epochs' upper bound on a corpus big enough to get MIN_STEPS in them
MIN_STEPS = 150  # optimizer steps the upper bound of epochs should reach on a small corpus (see the docstring)
MAX_EPOCHS = 10
LR_FACTOR = 4.0
LONGER_LR_FACTOR = 2.0  # trial 1's lr (see longer_schedule): half-way up the band, in log terms

WHY = {
    "lr": "set by the model and adapter more than the corpus; a 16x band around the recipe's value covers full "
          "fine-tuning (1e-5..5e-5) and LoRA (1e-4..1e-3) optima",
    "epochs": "the optimizer steps move a pretrained encoder: up to 3 passes, or as many as give a small corpus "
              f"{MIN_STEPS} steps (at most {MAX_EPOCHS}); overfitting is what the dev score catches",
    "temperature": "InfoNCE on cosine scores works in 0.01..0.1 in every current recipe (E5, BGE, MNRL, SimCSE); "
                   "tied to the cosine scale, not the corpus",
    "hard_negatives": "1-3 mined negatives give most of the gain; each one adds a forward pass per row",
    "mined_negatives": "mined negatives were the largest single gain measured here and in the literature on corpora "
                       "of every kind; 0 (the recipe as written) stays a choice, the dev score decides for this corpus",
    "mining_range": "how many unlabelled positives sit at the top of the ranking depends on how densely the corpus "
                    "is labelled; all common miners work within the top 200",
    "relative_margin": "relative to the positive's score, whose size (weak, graded, many positives) is "
                       "corpus-specific; 0..0.1 spans off to twice NV-Retriever's 5%",
    "margin_from": "with many weak positives the weakest one sets too low a threshold",
    "lora_r": "adapter capacity; retrieval fine-tuning saturates between r 8 and 32; alpha/r kept so the lr keeps "
              "its meaning",
    "rerank_negatives": "a reranker sees no in-batch negatives: the group (positive + negatives) is all a row "
                        "learns from; rerankers train with groups of 8 to 16, each negative one more pair's forward",
    "loss_type": "listwise orders a query's candidates, bce calibrates each pair; which ranks better is corpus-"
                 "specific, the cost is the same",
    "warmup_ratio": "the new head starts random: a warm-up keeps its first gradients from wrecking the pretrained "
                    "encoder; free to search",
}


def _round(value: float, digits: int = 3) -> float:
    """Three significant digits: readable recipes, and the value trained is the value written."""
    if value == 0:
        return 0.0
    return float(f"{value:.{digits - 1}e}")


@dataclass(frozen=True)
class Param:
    name: str
    keys: tuple[str, ...]
    kind: str  # "log" | "float" | "int" | "choice"
    default: Any
    low: float | None = None
    high: float | None = None
    choices: tuple = ()
    why: str = ""
    scale: dict[str, float] = field(default_factory=dict)  # lora_r: {"alpha_per_r": ...}
    needs: str | None = None  # searched only in trials where this (integer) parameter is > 0

    def active(self, params: dict[str, Any]) -> bool:
        return self.needs is None or (params.get(self.needs) or 0) > 0

    def suggest(self, trial) -> Any:
        if self.kind in ("log", "float"):
            value = trial.suggest_float(self.name, self.low, self.high, log=self.kind == "log")
            return value if value == self.default else _round(value)  # the recipe's own value stays as written
        if self.kind == "int":
            return trial.suggest_int(self.name, int(self.low), int(self.high))
        return trial.suggest_categorical(self.name, list(self.choices))

    def bounds(self) -> str:
        if self.kind == "log":
            return f"{self.low:.3g} .. {self.high:.3g} (log)"
        if self.kind in ("float", "int"):
            return f"{self.low:g} .. {self.high:g}"
        return ", ".join(str(c) for c in self.choices)

    def overrides(self, value: Any) -> dict[str, Any]:
        """Recipe keys (dotted) -> values for this parameter's value."""
        if self.name == "lora_r":
            return {"adapter.r": int(value), "adapter.alpha": max(1, round(value * self.scale["alpha_per_r"]))}
        if self.name == "mined_negatives":  # 0: the recipe as written, without negatives
            return {"loss.hard_negatives": int(value), "mining.online": True} if value else {}
        return {key: value for key in self.keys}

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "keys": list(self.keys), "kind": self.kind, "default": self.default,
                "low": self.low, "high": self.high, "choices": list(self.choices), "bounds": self.bounds(),
                "why": self.why, "needs": self.needs}


# The parameters each recipe task can search (the spaces: SPACES below). A new task is one entry here and one there.
PARAMS_BY_TASK = {
    "embed": ("lr", "epochs", "temperature", "hard_negatives", "mined_negatives", "mining_range", "relative_margin",
              "margin_from", "lora_r"),
    "rerank": ("lr", "epochs", "hard_negatives", "loss_type", "warmup_ratio", "lora_r"),
}
ALL_PARAMS = PARAMS_BY_TASK["embed"]


def can_turn_on_mining(recipe, negatives_in_data: int) -> bool:
    """A recipe without negatives that online mining could serve (its engine settings allow mining.online)."""
    return (not recipe.mining.online and negatives_in_data == 0 and recipe.loss.distillation == "none"
            and recipe.loss.hard_negatives == 0 and backend_class(recipe).supports_online_mining)


def epochs_bound(recipe_epochs: int, steps_per_epoch: int | None) -> int:
    """The epochs' upper bound: 3, the recipe's, or enough passes for MIN_STEPS optimizer steps (at most
    MAX_EPOCHS), whichever is more."""
    wanted = -(-MIN_STEPS // steps_per_epoch) if steps_per_epoch else BASE_EPOCHS
    return max(recipe_epochs, BASE_EPOCHS, min(MAX_EPOCHS, wanted))


def build_space(recipe, *, margin_flagged: bool = False, negatives_in_data: int = 0, several_positives: bool = False,
                only: list[str] | None = None, steps_per_epoch: int | None = None) -> list[Param]:
    """The parameters this recipe can use (see the module docstring), restricted to `only` when given: the space of
    the recipe's task (SPACES).

    `steps_per_epoch`: the optimizer steps of one epoch of the trials (sets the epochs' upper bound);
    `margin_flagged`: the base model's mining left most rows short because of the margin (search the margin);
    `negatives_in_data`: the most negatives a training row carries (static negatives, when the recipe does not
    mine); `several_positives`: some query has more than one positive (margin_from matters).
    """
    task = getattr(recipe, "task", "embed")
    names, space_of, cannot = SPACES[task]
    wanted = set(only) if only else None
    if wanted is not None:
        unknown = sorted(wanted - set(names))
        if unknown:
            where = f" for a task: {task} recipe" if task != "embed" else ""
            raise ConfigError(f"unknown parameter(s) {', '.join(unknown)}{where}; choose from {', '.join(names)}",
                              field="--params")
    space = space_of(recipe, margin_flagged=margin_flagged, negatives_in_data=negatives_in_data,
                     several_positives=several_positives, wanted=wanted, steps_per_epoch=steps_per_epoch)
    if wanted is not None:
        missing = sorted(wanted - {p.name for p in space})
        if missing:
            raise ConfigError(f"this recipe cannot search {', '.join(missing)} ({cannot})", field="--params")
        space = [p for p in space if p.name in wanted]
        orphans = sorted(p.name for p in space if p.needs is not None and p.needs not in wanted)
        if orphans:
            raise ConfigError(f"{', '.join(orphans)}: this recipe does not mine, so searching it needs "
                              "mined_negatives in --params too (the switch that turns mining on)", field="--params")
    return space


def _schedule(recipe, steps_per_epoch: int | None) -> list[Param]:
    """lr and epochs: every task's."""
    t = recipe.training
    space = [Param("lr", ("training.lr",), "log", t.lr, low=t.lr / LR_FACTOR, high=t.lr * LR_FACTOR, why=WHY["lr"])]
    if t.max_steps is None:
        space.append(Param("epochs", ("training.epochs",), "int", t.epochs, low=1,
                           high=epochs_bound(t.epochs, steps_per_epoch), why=WHY["epochs"]))
    return space


def _lora_rank(recipe) -> list[Param]:
    a = recipe.adapter
    if a.type not in ("lora", "qlora"):
        return []
    ranks = tuple(sorted(set(LORA_RANKS) | {a.r}))
    return [Param("lora_r", ("adapter.r", "adapter.alpha"), "choice", a.r, choices=ranks, why=WHY["lora_r"],
                  scale={"alpha_per_r": a.alpha / a.r})]


def _embedding_space(recipe, *, margin_flagged: bool, negatives_in_data: int, several_positives: bool,
                     wanted: set[str] | None, steps_per_epoch: int | None) -> list[Param]:
    loss, m = recipe.loss, recipe.mining
    space = _schedule(recipe, steps_per_epoch)
    lo, hi = TEMPERATURE_BOUNDS
    space.append(Param("temperature", ("loss.temperature",), "log", loss.temperature,
                       low=min(lo, loss.temperature), high=max(hi, loss.temperature), why=WHY["temperature"]))
    turn_on = can_turn_on_mining(recipe, negatives_in_data)
    if m.online or turn_on:
        needs = None
        if m.online:
            keys = ("loss.hard_negatives",) + (("mining.num_negatives",) if m.num_negatives is not None else ())
            space.append(Param("hard_negatives", keys, "int", loss.hard_negatives, low=1,
                               high=max(MAX_HARD_NEGATIVES, loss.hard_negatives), why=WHY["hard_negatives"]))
        else:
            needs = "mined_negatives"
            space.append(Param("mined_negatives", ("loss.hard_negatives", "mining.online"), "int", 0, low=0,
                               high=MAX_HARD_NEGATIVES, why=WHY["mined_negatives"]))
        windows = tuple(dict.fromkeys((*MINING_WINDOWS, m.range)))
        space.append(Param("mining_range", ("mining.range",), "choice", m.range, choices=windows,
                           why=WHY["mining_range"], needs=needs))
        margin_wanted = margin_flagged or (wanted is not None and "relative_margin" in wanted)
        if margin_wanted and m.relative_margin is not None:
            lo, hi = MARGIN_BOUNDS
            space.append(Param("relative_margin", ("mining.relative_margin",), "float", m.relative_margin,
                               low=min(lo, m.relative_margin), high=max(hi, m.relative_margin),
                               why=WHY["relative_margin"], needs=needs))
        if (margin_flagged and several_positives) or (wanted is not None and "margin_from" in wanted):
            space.append(Param("margin_from", ("mining.margin_from",), "choice", m.margin_from,
                               choices=tuple(dict.fromkeys((m.margin_from, "weakest", "strongest"))),
                               why=WHY["margin_from"], needs=needs))
    elif negatives_in_data > 0 and loss.distillation == "none":
        space.append(Param("hard_negatives", ("loss.hard_negatives",), "int", loss.hard_negatives, low=0,
                           high=max(min(MAX_HARD_NEGATIVES, negatives_in_data), loss.hard_negatives),
                           why=WHY["hard_negatives"]))
    return space + _lora_rank(recipe)


def _reranker_space(recipe, *, negatives_in_data: int, steps_per_epoch: int | None, **_) -> list[Param]:
    """A reranker's (task: rerank) space: see the module docstring. No temperature, pooling, prompts, matryoshka or
    online mining: a rerank recipe refuses them (Recipe._check_rerank)."""
    t, loss, m = recipe.training, recipe.loss, recipe.mining
    space = _schedule(recipe, steps_per_epoch)
    # Rows with negatives keep them (at most as many as they carry); rows without get them mined at the start of
    # every trial with rerank.first_stage (train_reranker), mining.num_negatives moving with the count when set.
    high = min(MAX_RERANK_NEGATIVES, negatives_in_data) if negatives_in_data else MAX_RERANK_NEGATIVES
    keys = ("loss.hard_negatives",) + (("mining.num_negatives",)
                                       if m.num_negatives is not None and not negatives_in_data else ())
    space.append(Param("hard_negatives", keys, "int", loss.hard_negatives, low=1, high=max(high, loss.hard_negatives),
                       why=WHY["rerank_negatives"]))
    if loss.distillation == "none":  # with teacher scores the base loss is a weighted part: its kind stays
        space.append(Param("loss_type", ("loss.type",), "choice", loss.type,
                           choices=tuple(dict.fromkeys((loss.type, "listwise", "bce"))), why=WHY["loss_type"]))
    lo, hi = WARMUP_BOUNDS
    space.append(Param("warmup_ratio", ("training.warmup_ratio",), "float", t.warmup_ratio,
                       low=min(lo, t.warmup_ratio), high=max(hi, t.warmup_ratio), why=WHY["warmup_ratio"]))
    return space + _lora_rank(recipe)


# task -> (the parameters it can search, its space, what the "cannot search" error says it needs)
SPACES = {
    "embed": (PARAMS_BY_TASK["embed"], _embedding_space,
              "hard_negatives needs mining.online or negatives in the data, mined_negatives a recipe with neither; "
              "the mining parameters either; lora_r an adapter; epochs no training.max_steps"),
    "rerank": (PARAMS_BY_TASK["rerank"], _reranker_space,
               "loss_type needs a recipe without loss.distillation; lora_r an adapter (the yes/no reranker); epochs "
               "no training.max_steps"),
}


def suggest(space: list[Param], trial) -> dict[str, Any]:
    """One trial's parameters: a dependent parameter (`needs`) only where its switch is on (define-by-run)."""
    params: dict[str, Any] = {}
    for p in space:
        if p.active(params):
            params[p.name] = p.suggest(trial)
    return params


def defaults(space: list[Param]) -> dict[str, Any]:
    """The recipe's own values: trial 0."""
    params: dict[str, Any] = {}
    for p in space:
        if p.active(params):
            params[p.name] = p.default
    return params


def longer_schedule(space: list[Param], epochs: int | None = None) -> dict[str, Any] | None:
    """Trial 1: the recipe trained longer (`epochs`: the search's first epoch cap, embedkit/tune/search.py; None: the
    epochs' upper bound) at LONGER_LR_FACTOR x its lr, with one mined negative when the recipe has none (None:
    nothing of that applies, e.g. --params temperature).

    Why: a recipe's first draft is a cautious short schedule, and the published fine-tuning of pretrained encoders
    runs several epochs at a larger step size (sentence-transformers' trainer: 3 epochs at 5e-5) with mined
    negatives (the largest single gain measured here and in the literature). A budget of a handful of trials on a
    small machine leaves TPE's random start a few points in a 5-dimensional space; trials 0 and 1 put two of them at
    the two ends of the schedule axis, which matters most on every corpus. A starting point, not a choice: the dev
    score decides, and TPE models the rest from there."""
    chosen: dict[str, Any] = {}
    for p in space:
        if not p.active(chosen):
            continue
        value = p.default
        if p.name == "epochs":
            value = int(p.high) if epochs is None else max(int(p.default), min(int(p.high), int(epochs)))
        elif p.name == "lr":
            value = _round(min(p.high, p.default * LONGER_LR_FACTOR))
        elif p.name == "mined_negatives":
            value = max(1, int(p.default))
        chosen[p.name] = value
    return chosen if chosen != defaults(space) else None


def in_space(space: list[Param], params: dict[str, Any]) -> bool:
    for p in space:
        if p.name not in params:
            continue
        value = params[p.name]
        if p.kind == "choice" and value not in p.choices:
            return False
        if p.kind != "choice" and not (p.low - 1e-12 <= value <= p.high + 1e-12 or math.isclose(value, p.low)):
            return False
    return True


def recipe_overrides(space: list[Param], params: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for p in space:
        if p.name in params:  # a dependent parameter is absent where its switch was off
            out.update(p.overrides(params[p.name]))
    return out
