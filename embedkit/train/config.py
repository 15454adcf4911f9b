"""Training recipes: typed YAML (pydantic v2), `--set a.b=value` overrides, validation before any model loads.

    model:    {name: minilm, pooling: mean, prompts: none, max_length: 256, attention_dropout: 0.0, device: auto,
               attention: null | causal | bidirectional (causal LLMs)}
    adapter:  {type: none | lora | qlora, r: 16, alpha: 32, dropout: 0.0, targets: all-linear, dora: false, rslora: false}
    data:     {train: pairs.jsonl | beir:DIR:SPLIT, columns: {query: q, positive: p}, max_examples: 1000, dev: beir:DIR:SPLIT}
    loss:     {type: infonce, temperature: 0.05, learn_temperature: false, symmetric: false, hard_negatives: 0, ...}
    training: {output_dir: runs/x, epochs: 1, batch_size: 32, lr: 2e-5, seed: 42, grad_cache: null,
               gradient_accumulation: 1, mixed_precision: no | bf16 | fp16, report_to: [tensorboard],
               head_lr: null (task: rerank: the lr of a cross-encoder's new head), ...}
    deepspeed: {stage: none | zero2 | zero3, offload_optimizer: false, offload_params: false}
    fsdp:     {enabled: false, offload_params: false, reshard_after_forward: true}   (torch FSDP2, several processes)
    mining:   {online: false, every: epoch | N (steps), range: "10:100", num_negatives: null (= loss.hard_negatives),
               sampling: random, relative_margin: 0.05, corpus: null, ...}   (online hard-negative re-mining)
    mntp:     {steps: 0, batch_size: 8, lr: 1e-4, mask_ratio: 0.2, max_length: 128}   (LLM2Vec warm-up, causal LLMs)
    task:     embed | rerank   (rerank: a reranker over (query, positive, negatives) rows; loss listwise | bce;
              a BERT-style start trains a cross-encoder, a causal LM start a yes/no LLM reranker, LoRA / QLoRA allowed)
    rerank:   {first_stage: null | MODEL, top_k: 100, instruction: null}   (rerank recipes: the bi-encoder whose
              ranking dev reranks; the yes/no reranker's instruction)

Every mistake is one ConfigError naming the recipe file, the line when known, and the field path
(`training.batch_size`): unknown keys (extra="forbid"), wrong types, missing data files, unknown models.
Relative paths are relative to the current directory (run recipes from the project root).

Every recipe the training engine trains (this module's `Recipe`, embedkit/llm/config.py's `LLMRecipe`) derives from
`BaseRecipe`: the sections the engine reads (model, adapter, training, deepspeed, fsdp) are declared once here, and
a recipe kind narrows them with subclasses where it needs more fields. Recipes are edited in one way, the `--set`
way: "KEY=VALUE" strings applied by `apply_overrides`, to a file's YAML (`load_recipe`) or to a typed recipe
(`BaseRecipe.with_overrides`; `format_override` writes the strings), then validated again.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from embedkit.device import validate_device
from embedkit.errors import ConfigError
from embedkit.mine.settings import MiningSettings, parse_margin_grade, parse_range
from embedkit.models.prompts import PROMPT_PRESETS
from embedkit.models.registry import EMBEDDED_MODELS


class Section(BaseModel):
    """A recipe section: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def _valid_device(spec: str) -> str:
    try:
        return validate_device(spec)
    except ConfigError as exc:
        raise ValueError(exc.message) from None


DeviceSpec = Annotated[str, AfterValidator(_valid_device)]


def registered_pooling(name: str, *, for_causal_lm: bool = False) -> str:
    """`name` when it is a pooling mode of embedkit.models.pooling's registry (ValueError naming them otherwise)."""
    from embedkit.models.pooling import pooling_names  # the registry holds torch functions: loaded when needed

    names = pooling_names(for_causal_lm=for_causal_lm)
    if name not in names:
        raise ValueError(f"unknown pooling {name!r}; choose one of {', '.join(names)}")
    return name


PoolingName = Annotated[str, AfterValidator(registered_pooling)]


class EngineModelSection(Section):
    """What every recipe's model section holds: the model, how its weights are stored, where it runs."""

    name: str = Field(description="an embedded name, a local folder, or a Hugging Face id")
    dtype: Literal["fp32", "bf16", "fp16"] = "fp32"
    gradient_checkpointing: bool = False
    device: DeviceSpec = Field("auto", description="auto | cpu | cuda | cuda:N (auto: this process's GPU if any)")


class ModelSection(EngineModelSection):
    name: str = Field(description="embedded name (minilm, smollm2-135m), a local folder, or a Hugging Face id")
    pooling: PoolingName | None = Field(None, description="a pooling mode (embedkit.models.pooling's registry); "
                                                          "null: the model folder's, else mean (lasttoken for LLMs)")
    prompts: dict[str, str] | str | None = None  # a preset name (none, e5, bge, instruct) or {query:, document:}
    max_length: int | None = Field(None, gt=0)
    padding_side: Literal["left", "right"] | None = None
    # None keeps the model's own dropout. attention_dropout 0 lets CPU attention use the fused (flash) kernel, which
    # does not materialise the [heads, L, L] probabilities: several times faster and far less memory.
    attention_dropout: float | None = Field(None, ge=0.0, lt=1.0)
    hidden_dropout: float | None = Field(None, ge=0.0, lt=1.0)
    # Causal LLM encoders only. bidirectional: every token attends to every other while embedding (LLM2Vec,
    # GritLM); the saved model keeps it, so eval, export and serving embed the same way. null: the model's own.
    attention: Literal["causal", "bidirectional"] | None = None


class AdapterSection(Section):
    """The engine's adapter (PEFT LoRA / QLoRA), for every recipe kind. embedkit/llm/config.py subclasses it for its
    default (lora); `EncoderAdapterSection` adds what an embedding run saves."""

    type: Literal["none", "lora", "qlora"] = "none"
    r: int = Field(16, gt=0)
    alpha: int = Field(32, gt=0)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    targets: str | list[str] = "all-linear"
    # PEFT's LoRA variants: DoRA (weight-decomposed, Liu et al. 2024) and rsLoRA (scaling alpha / sqrt(r), which
    # keeps larger ranks learning; Kalajdzievski 2023).
    dora: bool = False
    rslora: bool = False


class EncoderAdapterSection(AdapterSection):
    save: Literal["merged", "adapter", "both"] = "merged"  # what the output folder holds


class ColumnsSection(Section):
    query: str = "query"
    positive: str = "positive"
    negatives: str | list[str] | None = None
    scores: str | None = None


class EngineDataSection(Section):
    """What every recipe's data section names: the training data."""

    train: str = Field(description="the training data: a file or beir:DIR[:SPLIT]")


class DataSection(EngineDataSection):
    train: str = Field(description="a tuples file (.jsonl/.json/.csv/.tsv/.parquet) or beir:DIR[:SPLIT]")
    columns: ColumnsSection = ColumnsSection()
    max_examples: int | None = Field(None, gt=0)
    sample: Literal["first", "random"] = "first"  # with max_examples: the first N, or a seeded random N
    dev: str | None = None  # an eval task spec (beir:DIR:SPLIT, sts:FILE, stsb ...) for dev evaluation
    dev_batch_size: int = Field(64, gt=0)


def registered_loss(name: str) -> str:
    """`name` when it is a base loss of embedkit.train.losses' registry, of any task (ValueError naming them
    otherwise); the recipe's task checks its own."""
    names = _loss_names(None)
    if name not in names:
        raise ValueError(f"unknown loss type {name!r}; choose one of {', '.join(names)}")
    return name


class LossSection(Section):
    """Built by embedkit.train.losses.build_loss: the base loss `type`, wrapped in Matryoshka when
    `matryoshka_dims` is set and in distillation when `distillation` is set."""

    type: Annotated[str, AfterValidator(registered_loss)] = Field(
        "infonce", description="the base loss (embedkit.train.losses' registry: infonce for embedding recipes; "
                               "listwise (the default there) or bce for task: rerank)")
    temperature: float = Field(0.05, gt=0.0)
    learn_temperature: bool = False
    symmetric: bool = False
    hard_negatives: int = Field(0, ge=0, description="hard negatives per query taken from the data")
    mask_false_negatives: bool = True
    margin: float | None = None  # also mask candidates scoring above positive - margin
    matryoshka_dims: list[int] | None = None
    distillation: Literal["none", "kl", "margin_mse"] = "none"
    distillation_weight: float = Field(1.0, ge=0.0)
    distillation_temperature: float = Field(1.0, gt=0.0)
    contrastive_weight: float = Field(1.0, ge=0.0)  # with distillation: weight of the contrastive term

    @field_validator("matryoshka_dims")
    @classmethod
    def _positive_dims(cls, dims):
        if dims is not None and (not dims or any(d <= 0 for d in dims)):
            raise ValueError("matryoshka_dims must be a non-empty list of positive sizes")
        return dims


class EngineTrainingSection(Section):
    """What the training engine (embedkit/train/engine.py) honours for every kind of run."""

    output_dir: str
    epochs: int = Field(1, gt=0)
    max_steps: int | None = Field(None, gt=0)  # stop early (counts optimizer steps)
    # At least this many optimizer steps: the epochs are raised to the whole passes that give them (never lowered;
    # max_steps still caps). What moves a pretrained encoder is the number of updates, not of passes: one epoch of
    # 100 pairs at batch 32 is 4 steps, of 100,000 pairs 3,125. A floor in steps gives a small data set enough
    # updates and changes nothing for one large enough to get them in its epochs.
    min_steps: int | None = Field(None, gt=0)
    batch_size: int = Field(32, gt=0, description="examples per optimizer step and process")
    lr: float = Field(2e-5, gt=0.0)
    warmup_ratio: float = Field(0.1, ge=0.0, le=1.0)
    weight_decay: float = Field(0.01, ge=0.0)
    max_grad_norm: float | None = Field(1.0, gt=0.0)
    seed: int = 42
    # Optimizer steps cover this many batches. A contrastive batch's negatives stay within its own batch: to grow
    # the negatives use grad_cache (one big batch, small memory), not accumulation.
    gradient_accumulation: int = Field(1, gt=0)
    # Autocast with fp32 master weights (bf16 on CPUs and Ampere+ GPUs; fp16 needs a GPU and a loss scaler).
    # model.dtype instead sets the dtype the weights are stored in.
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    # Experiment trackers. null: TensorBoard where it is installed; []: none; or any of tensorboard, wandb, mlflow.
    report_to: list[Literal["tensorboard", "wandb", "mlflow"]] | None = None
    checkpoint_every: int | None = Field(None, gt=0)
    keep_checkpoints: int = Field(2, gt=0)
    eval_every: int | None = Field(None, gt=0)
    eval_at_end: bool = True
    log_every: int = Field(10, gt=0)
    threads: int | None = Field(None, gt=0)  # torch intra-op threads; null = torch's default
    progress: bool = True


class TrainingSection(EngineTrainingSection):
    grad_cache: int | None = Field(None, gt=0, description="GradCache sub-batch size; null = plain step")
    group_by_length: bool = False
    # Forward a batch in length-sorted chunks of this many texts (each padded to its own longest) when that removes
    # at least 20% and 2,048 of its padded tokens: same loss, less compute on mixed lengths. null = one forward.
    # Ignored with grad_cache.
    length_chunk: int | None = Field(8, gt=0)
    drop_last: bool = False
    # task: rerank only. The lr of the weights the model creates new instead of loading (a cross-encoder's one-logit
    # head started from an embedding model; Reranker.new_parameter_names); null: lr, as every other weight. With
    # AdamW a weight moves by about lr a step, so at an encoder's 2e-5 a new head barely moves in a short run.
    head_lr: float | None = Field(None, gt=0.0)


class RerankSection(Section):
    """A reranker recipe's second-stage settings: the first stage (bi-encoder) whose ranking the negatives are mined
    from when the training rows have none, and whose top `top_k` the dev evaluation reranks."""

    first_stage: str | None = Field(None, description="the bi-encoder (embedded name or folder): mines the negatives "
                                                      "of rows without any, and retrieves the candidates the dev "
                                                      "evaluation reranks (needed with data.dev)")
    top_k: int = Field(100, gt=0, description="candidates per query the reranker orders")
    # The yes/no (causal LM) reranker's instruction, in its prompt beside the query and the document. null: the
    # start folder's own (a saved yes/no reranker), else Qwen3-Reranker's default (DEFAULT_INSTRUCTION there).
    instruction: str | None = Field(None, min_length=1,
                                    description="the yes/no reranker's instruction (causal LM starts only); null: "
                                                "the start's own, else 'Given a web search query, retrieve relevant "
                                                "passages that answer the query'")


class MNTPSection(Section):
    """Masked next-token prediction warm-up (LLM2Vec, BehnamGhader et al. 2024) for causal LLM encoders: before the
    contrastive stage, the same adapter learns to predict masked tokens of the training documents from the hidden
    state of the token before them, with the recipe's attention. It teaches a decoder to use the tokens to its
    right once attention is made bidirectional. The first phase of the run's one training engine."""

    steps: int = Field(0, ge=0, description="optimizer steps of the warm-up; 0 = none")
    batch_size: int = Field(8, gt=0)
    lr: float = Field(1e-4, gt=0.0)
    mask_ratio: float = Field(0.2, gt=0.0, lt=1.0)  # LLM2Vec's 0.2 for Llama / Mistral
    max_length: int = Field(128, gt=1)


class DeepSpeedSection(Section):
    stage: Literal["none", "zero2", "zero3"] = "none"
    offload_optimizer: bool = False
    offload_params: bool = False

    @model_validator(mode="after")
    def _offload_params_needs_zero3(self):
        if self.offload_params and self.stage != "zero3":
            raise ValueError("offload_params needs stage: zero3")
        return self


class FSDPSection(Section):
    """torch FSDP2 (fully_shard per transformer layer): parameters, gradients and optimizer state sharded across
    processes. Launch with several processes (`embedkit train RECIPE --nproc N`)."""

    enabled: bool = False
    offload_params: bool = False  # keep the shards in CPU memory between uses
    reshard_after_forward: bool = True  # ZeRO-3-like; false keeps gathered weights until backward (ZeRO-2-like)


class MiningSection(Section):
    """Online hard-negative re-mining: the trainer re-encodes the pool with the model being trained and refreshes
    every example's negatives with the same filters as `embedkit mine` (see embedkit/mine/settings.py)."""

    online: bool = False
    every: Literal["epoch"] | int = Field("epoch", description="'epoch' (before each epoch) or a number of steps")
    at_start: bool = True  # also mine before the first step, with the base model
    range: str = "10:100"  # rank window START:END of the model's ranking of the pool
    num_negatives: int | None = Field(None, gt=0)  # null = loss.hard_negatives
    sampling: Literal["random", "top"] = "random"
    absolute_margin: float | None = Field(None, ge=0.0)
    relative_margin: float | None = Field(0.05, ge=0.0, lt=1.0)
    # Which positive the margins are measured from (see `embedkit mine --help`): the weakest / strongest of the
    # query's positives graded margin_grade ("top": its highest grade; "all"; K: grade >= K). Grades come with a
    # beir: training set; pairs files are ungraded (every choice = all positives).
    margin_from: Literal["weakest", "strongest"] = "weakest"
    margin_grade: str | int = "top"  # "top" | "all" | a grade K >= 1
    max_score: float | None = None
    min_score: float | None = None
    duplicate_threshold: float | None = 0.98
    seed: int | None = Field(None, ge=0)  # null = training.seed; round r draws with seed + r
    corpus: str | None = None  # more pool documents (BEIR folder / corpus.jsonl); a beir: train set brings its own
    batch_size: int = Field(64, gt=0)  # encoding batch size

    @field_validator("every")
    @classmethod
    def _positive_every(cls, every):
        if isinstance(every, int) and every <= 0:
            raise ValueError("every must be 'epoch' or a positive number of steps")
        return every

    @field_validator("margin_grade", mode="before")
    @classmethod
    def _margin_grade(cls, value):
        try:
            return parse_margin_grade(value)
        except ConfigError as exc:
            raise ValueError(exc.message) from None

    @field_validator("range")
    @classmethod
    def _range(cls, text):
        try:
            parse_range(text)
        except ConfigError as exc:
            raise ValueError(exc.message) from None
        return text


RecipeT = TypeVar("RecipeT", bound="BaseRecipe")


class BaseRecipe(Section):
    """What every recipe the training engine (embedkit/train/engine.py) trains holds; a recipe kind derives from it
    and narrows the sections with its own subclasses (`Recipe` here, `LLMRecipe` in embedkit/llm/config.py).
    data and loss are declared here too, in this order, so that every kind reports its first mistake in the same
    order as the file reads (model, adapter, data, ...)."""

    model: EngineModelSection
    adapter: AdapterSection = AdapterSection()
    data: EngineDataSection
    loss: LossSection = LossSection()
    training: EngineTrainingSection
    deepspeed: DeepSpeedSection = DeepSpeedSection()
    fsdp: FSDPSection = FSDPSection()

    @model_validator(mode="after")
    def _engine_settings(self):  # runs before a subclass's own validators
        check_engine_settings(self)
        return self

    @classmethod
    def from_raw(cls: type[RecipeT], raw: Any, *, source: str | Path | None = None,
                 text: str | None = None) -> RecipeT:
        """The typed recipe of a YAML mapping, or one ConfigError naming `source`, the line in `text` (the
        deepest key of the failing field that the text holds) and the field path."""
        if not isinstance(raw, dict):
            raise ConfigError("a recipe must be a YAML mapping with sections model, data, training, ...", path=source)
        try:
            return cls.model_validate(raw)
        except ValidationError as exc:
            loc, message = _first_error(exc)
            line = None
            if text is not None and loc:
                lines = _key_lines(text)
                for cut in range(len(loc), 0, -1):  # the deepest key that exists in the file
                    if loc[:cut] in lines:
                        line = lines[loc[:cut]]
                        break
            raise ConfigError(message, path=source, line=line, field=".".join(loc) or None) from None

    def with_overrides(self: RecipeT, overrides: list[str], *, source: str | Path | None = None) -> RecipeT:
        """A new recipe: this one with `--set`-style overrides ("training.lr=4e-05"; `format_override` writes them)
        applied by `apply_overrides`, as `--set` applies them to the file, and validated again. A key that is not a
        recipe field is the ConfigError `--set` gives ("unknown key", naming it). The keys written in this recipe
        stay the ones written (the others keep their defaults): what `model_fields_set` says is unchanged. Checks
        what the types and validators check, not the file system (`validate_recipe`)."""
        raw = apply_overrides(self.model_dump(exclude_unset=True), list(overrides))
        return type(self).from_raw(raw, source=source)


class Recipe(BaseRecipe):
    model: ModelSection
    adapter: EncoderAdapterSection = EncoderAdapterSection()
    data: DataSection
    training: TrainingSection
    mining: MiningSection = MiningSection()
    mntp: MNTPSection = MNTPSection()
    # embed: a bi-encoder (the default). rerank: a cross-encoder scoring (query, document) pairs, trained on each
    # row's positive and hard negatives (embedkit/train/rerank.py).
    task: Literal["embed", "rerank"] = "embed"
    rerank: RerankSection = RerankSection()

    @model_validator(mode="after")
    def _consistent(self):
        if self.task == "rerank":
            self._check_rerank()
        elif self.loss.type not in _loss_names("embed"):
            raise ValueError(f"loss.type {self.loss.type!r} is a reranker loss: set task: rerank, or use one of "
                             f"{', '.join(_loss_names('embed'))}")
        # Refused, not ignored: a bi-encoder has no newly initialised head, so the setting would change nothing while
        # reading as if it did (and `embedkit tune` would search it in vain).
        if self.task != "rerank" and self.training.head_lr is not None:
            raise ValueError("training.head_lr is the lr of a reranker's new head: set task: rerank, or remove it "
                             "(a bi-encoder recipe has no new head)")
        if self.mining.online:
            if self.loss.hard_negatives == 0:
                raise ValueError("mining.online needs loss.hard_negatives > 0 (how many mined negatives to train on)")
            if self.loss.distillation != "none":
                raise ValueError("mining.online replaces the negatives and their scores during training: use it "
                                 "without loss.distillation (teacher scores must come from a fixed teacher)")
            backend = training_backend(self)
            if not backend.supports_online_mining:
                raise ValueError("mining.online runs in one process (DDP's --nproc is refused too): not with "
                                 f"{backend.selected_with} yet")
            self.mining_settings()  # the mining filters' own checks (window size, margins)
        if self.loss.distillation == "margin_mse" and self.loss.hard_negatives == 0:
            raise ValueError("loss.distillation margin_mse needs loss.hard_negatives > 0")
        return self


    def _check_rerank(self) -> None:
        """What a reranker recipe (task: rerank) cannot have; loss.type defaults to listwise there. Adapters (LoRA,
        QLoRA) are for the yes/no reranker, whose start is a causal LM: build_reranker refuses them for a
        cross-encoder once the start's config is read (a hub id's kind is not known before)."""
        if "type" not in self.loss.model_fields_set:
            self.loss.type = "listwise"
        elif self.loss.type not in _loss_names("rerank"):
            raise ValueError(f"task rerank trains with a reranker loss ({', '.join(_loss_names('rerank'))}), not "
                             f"{self.loss.type!r}")
        if self.loss.hard_negatives < 1:
            raise ValueError("task rerank needs loss.hard_negatives >= 1: a reranker learns from each query's "
                             "positive against its negatives (mine them with embedkit mine)")
        if self.adapter.save != "merged":
            raise ValueError("task rerank saves the adapter merged into the model (adapter.save: merged)")
        refused = {"model.pooling": self.model.pooling, "model.prompts": self.model.prompts,
                   "loss.matryoshka_dims": self.loss.matryoshka_dims, "training.grad_cache": self.training.grad_cache,
                   "mining.online": self.mining.online or None, "mntp.steps": self.mntp.steps or None,
                   "model.attention": self.model.attention}
        for key, value in refused.items():
            if value is not None:
                raise ValueError(f"{key} is for embedding recipes: task rerank does not use it")
        if parse_train_source(self.data.train)[0] == "beir" and not self.rerank.first_stage:
            raise ValueError("a beir: training set has no negatives: set rerank.first_stage (the bi-encoder whose "
                             "ranking the negatives are mined from), or train on rows from embedkit mine")
        if self.data.dev and not self.rerank.first_stage:
            raise ValueError("a reranker's dev evaluation reranks a first stage's candidates: set rerank.first_stage "
                             "(the bi-encoder, e.g. minilm or your tuned model) with data.dev")

    def mining_settings(self):
        """The recipe's mining section as embedkit.mine.MiningSettings (ValueError when inconsistent)."""
        m = self.mining
        lo, hi = parse_range(m.range)
        try:
            return MiningSettings(range_min=lo, range_max=hi, num_negatives=m.num_negatives or self.loss.hard_negatives,
                                  sampling=m.sampling, absolute_margin=m.absolute_margin,
                                  relative_margin=m.relative_margin, margin_from=m.margin_from,
                                  margin_grade=m.margin_grade, max_score=m.max_score, min_score=m.min_score,
                                  duplicate_threshold=m.duplicate_threshold,
                                  seed=self.training.seed if m.seed is None else m.seed, batch_size=m.batch_size)
        except ConfigError as exc:
            raise ValueError(f"mining: {exc.message}") from None


def _loss_names(task: str | None) -> list[str]:
    """The registered loss names of `task` (embed | rerank; None: every task)."""
    from embedkit.train.losses import loss_names  # the registry holds the loss classes (torch)

    return loss_names(task)


def check_engine_settings(recipe: BaseRecipe) -> None:
    """Combinations the training engine cannot honour, for every recipe kind (embedding and LLM). ValueError."""
    if recipe.adapter.type == "qlora" and recipe.model.dtype == "fp16":
        raise ValueError("qlora computes in fp32 or bf16, not fp16")
    if (recipe.adapter.dora or recipe.adapter.rslora) and recipe.adapter.type == "none":
        raise ValueError("adapter.dora / adapter.rslora are LoRA variants: set adapter.type lora or qlora")
    backend = training_backend(recipe)  # ValueError when two sharding engines are asked for
    if recipe.training.mixed_precision != "no" and recipe.model.dtype != "fp32":
        raise ValueError("training.mixed_precision keeps fp32 master weights: use it with model.dtype fp32 "
                         "(or set model.dtype and leave mixed_precision: no)")
    backend.check_recipe(recipe)


def training_backend(recipe: BaseRecipe):
    """The training backend class the recipe selects (embedkit/train/backends.py's registry): its capability flags
    answer what recipe checks would otherwise read from the deepspeed / fsdp sections."""
    from embedkit.train.backends import backend_class  # the registry holds the runtime classes, which need torch

    return backend_class(recipe)


# ---------------------------------------------------------------------------------------------------- loading
def _parse_override(text: str) -> tuple[list[str], Any]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set expects KEY=VALUE (e.g. training.lr=1e-5), got {text!r}", field="--set")
    try:
        parsed = yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError:
        parsed = value  # not YAML: take the text as it is
    return key.strip().split("."), parsed


def _section_of(raw: dict, path: list[str], *, create: bool) -> dict | None:
    """The mapping that holds `path`'s last key (created where absent with `create`, else None); a value on the way
    that is not a mapping is a ConfigError."""
    node = raw
    for i, part in enumerate(path[:-1]):
        child = node.get(part)
        if child is None:
            if not create:
                return None
            child = node[part] = {}
        elif not isinstance(child, dict):
            raise ConfigError(f"cannot set {'.'.join(path)}: {'.'.join(path[:i + 1])} is not a section",
                              field="--set")
        node = child
    return node


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply "KEY=VALUE" overrides (`--set`; the value is YAML) to a recipe's YAML mapping, in place; returns it.
    The one way recipes are edited: `load_recipe` applies `--set` with it, `BaseRecipe.with_overrides` the edits of
    a typed recipe (embedkit tune's). A key that is not a recipe field is named when the result is validated."""
    for text in overrides:
        path, value = _parse_override(text)
        _section_of(raw, path, create=True)[path[-1]] = value
    return raw


def format_override(key: str, value: Any) -> str:
    """The override "KEY=VALUE" that `apply_overrides` reads back as `value` itself (the value in YAML flow style:
    4e-05 as 4.0e-05, which YAML 1.1 reads as a float, and a text that would read as another type quoted)."""
    text = yaml.safe_dump(value, default_flow_style=True, width=float("inf"), allow_unicode=True).strip()
    if text.endswith("\n..."):  # the end-of-document mark after a plain scalar
        text = text[:-len("\n...")].rstrip()
    if yaml.safe_load(text) != value or "\n" in text:
        raise ValueError(f"{key}: {value!r} has no one-line YAML form that reads back as itself")
    return f"{key}={text}"


def override_value(raw: dict, key: str) -> Any:
    """The value a recipe's YAML mapping holds at the dotted `key` (None where it is not written): what an
    override of `key` replaces."""
    path = key.split(".")
    node = _section_of(raw, path, create=False)
    return None if node is None else node.get(path[-1])


def _key_lines(text: str) -> dict[tuple, int]:
    """(section, key, ...) -> 1-based line of that key in the YAML text, for error messages."""
    lines: dict[tuple, int] = {}

    def walk(node, prefix: tuple) -> None:
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                if isinstance(key, yaml.ScalarNode):
                    here = prefix + (key.value,)
                    lines[here] = key.start_mark.line + 1
                    walk(value, here)
        elif isinstance(node, yaml.SequenceNode):
            for i, value in enumerate(node.value):
                lines[prefix + (str(i),)] = value.start_mark.line + 1
                walk(value, prefix + (str(i),))

    try:
        walk(yaml.compose(text), ())
    except yaml.YAMLError:
        pass
    return lines


def _first_error(exc: ValidationError) -> tuple[tuple, str]:
    error = exc.errors()[0]
    # pydantic appends the union member / validator tag to `loc`; keep the field names only.
    loc = tuple(str(p) for p in error["loc"] if not (isinstance(p, str) and ("[" in p or p.startswith("function"))))
    message = error["msg"]
    if error["type"] == "extra_forbidden":
        message = "unknown key (not a recipe field; check the spelling)"
    elif error["type"] == "missing":
        message = "required field is missing"
    elif "input" in error and error["type"] not in ("value_error",):
        message = f"{message} (got {error['input']!r})"
    return loc, message.removeprefix("Value error, ")


def parse_recipe(raw: Any, *, source: str | Path | None = None, text: str | None = None) -> Recipe:
    return Recipe.from_raw(raw, source=source, text=text)


def read_recipe_file(path: str | Path, overrides: list[str] | None = None) -> tuple[Any, str]:
    """A recipe file's YAML with the overrides applied (when it is a mapping; `BaseRecipe.from_raw` refuses the
    rest), and its text (for the lines errors name). Any recipe kind."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError("recipe file not found", path=path)
    text = path.read_text(encoding="utf-8")
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise ConfigError(f"invalid YAML: {problem}", path=path, line=mark.line + 1 if mark else None) from None
    if isinstance(raw, dict):
        raw = apply_overrides(raw, list(overrides or []))
    return raw, text


def load_recipe(path: str | Path, overrides: list[str] | None = None, *, validate: bool = True,
                check_environment: bool = True) -> Recipe:
    """Read, override, type-check and (by default) validate a recipe; never loads a model."""
    path = Path(path)
    raw, text = read_recipe_file(path, overrides)
    recipe = parse_recipe(raw, source=path, text=text)
    if validate:
        validate_recipe(recipe, source=path, check_environment=check_environment)
    return recipe


# ---------------------------------------------------------------------------------------------------- validation
def check_engine_environment(recipe: BaseRecipe, *, source=None, check_environment: bool = True) -> None:
    """Packages the engine needs for what the recipe asks (skipped with check_environment=False)."""
    if not check_environment:
        return
    needs = {"wandb": "wandb", "mlflow": "mlflow", "tensorboard": "tensorboard"}
    for tracker in recipe.training.report_to or []:
        if importlib.util.find_spec(needs[tracker]) is None:
            raise ConfigError(f"training.report_to names {tracker}, which is not installed: pip install {tracker}",
                              path=source, field="training.report_to")
    if recipe.adapter.type == "qlora" and importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError("qlora needs bitsandbytes: pip install 'embedkit[qlora]'", path=source, field="adapter.type")
    backend = training_backend(recipe)
    if backend.requires is not None and importlib.util.find_spec(backend.requires[0]) is None:
        package, install = backend.requires
        raise ConfigError(f"{package} is not installed: {install}", path=source, field=backend.selected_with)



def parse_train_source(spec: str) -> tuple[str, Path, str | None]:
    """("beir", DIR, SPLIT) or ("file", PATH, None)."""
    if spec.startswith("beir:"):
        rest = spec[len("beir:"):]
        folder, sep, split = rest.rpartition(":")
        if Path(rest).is_dir() or not sep or "/" in split:
            return "beir", Path(rest), "train"
        return "beir", Path(folder), split
    return "file", Path(spec), None


def warn_if_dev_is_test(recipe, *, source: str | Path | None = None) -> bool:
    """One warning line when data.dev is a split named test (beir:DIR:test; beir:DIR, whose split defaults to
    test; sts:.../test.jsonl): the dev score steers choices (the dev-best step that eval_every restores, the trial
    `embedkit tune` keeps), so a test split there stops being held out. Returns whether it warned."""
    if not recipe.data.dev:
        return False
    from embedkit.eval.tasks import parse_task_spec

    try:
        spec = parse_task_spec(recipe.data.dev)
    except ConfigError:
        return False  # validation names it
    name = (spec.split or "") if spec.type == "retrieval" else Path(spec.path or "").stem
    if spec.path is None or name.lower() != "test":
        return False
    where = f"{source}: " if source is not None else ""
    logging.getLogger(__name__).warning(
        "%sdata.dev (%s) is a test split: the dev score steers choices (the dev-best step with eval_every, the "
        "trial embedkit tune keeps), so the test stops being held out; use a dev split or none, and evaluate the "
        "test once after training (embedkit eval MODEL --task %s)", where, recipe.data.dev, recipe.data.dev)
    return True


def validate_recipe(recipe: Recipe, *, source: str | Path | None = None, check_environment: bool = True) -> None:
    """Checks that need the file system but no model: data files exist, specs parse, optional packages present
    (`check_environment=False` skips the last, to validate a GPU recipe on a machine without deepspeed)."""
    kind, path, split = parse_train_source(recipe.data.train)
    if kind == "beir":
        if not (path / "corpus.jsonl").is_file() or not (path / "queries.jsonl").is_file():
            raise ConfigError(f"not a BEIR folder (needs corpus.jsonl and queries.jsonl): {path}", path=source,
                              field="data.train")
        if not (path / "qrels" / f"{split}.tsv").is_file():
            raise ConfigError(f"no qrels/{split}.tsv in {path}", path=source, field="data.train")
    else:
        if not path.is_file():
            raise ConfigError(f"training data file not found: {path}", path=source, field="data.train")
        from embedkit.data.tuples import TUPLE_FORMATS

        if path.suffix.lower() not in TUPLE_FORMATS:
            raise ConfigError(f"unknown training file type {path.suffix!r} (use {', '.join(TUPLE_FORMATS)})",
                              path=source, field="data.train")
    if recipe.data.dev:
        from embedkit.eval.tasks import parse_task_spec

        try:
            spec = parse_task_spec(recipe.data.dev)
        except ConfigError as exc:
            raise ConfigError(exc.message, path=source, field="data.dev") from None
        if spec.path is not None and not Path(spec.path).exists():
            raise ConfigError(f"dev data not found: {spec.path}", path=source, field="data.dev")
    name = recipe.model.name
    looks_like_path = name.startswith((".", "/", "~")) or name.count("/") != 1
    if name not in EMBEDDED_MODELS and looks_like_path and not Path(name).expanduser().is_dir():
        raise ConfigError(f"no model {name!r}: not an embedded model ({', '.join(EMBEDDED_MODELS)}), not an existing "
                          "folder, not a Hugging Face id (owner/name)", path=source, field="model.name")
    if isinstance(recipe.model.prompts, str):
        if recipe.model.prompts not in PROMPT_PRESETS:
            raise ConfigError(f"unknown prompt preset {recipe.model.prompts!r} (use {', '.join(PROMPT_PRESETS)})",
                              path=source, field="model.prompts")
    check_engine_environment(recipe, source=source, check_environment=check_environment)
    if recipe.mining.corpus is not None and not Path(recipe.mining.corpus).exists():
        raise ConfigError(f"mining corpus not found: {recipe.mining.corpus}", path=source, field="mining.corpus")
    if recipe.training.eval_every and not recipe.data.dev:
        raise ConfigError("eval_every needs data.dev (a task to evaluate on)", path=source, field="training.eval_every")
    output = Path(recipe.training.output_dir)
    if output.exists() and not output.is_dir():
        raise ConfigError(f"output_dir exists and is not a folder: {output}", path=source, field="training.output_dir")
