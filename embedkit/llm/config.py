"""Recipes for the generative path (`embedkit llm sft|dpo|joint`): typed YAML like embedkit/train/config.py.

    model:    {name: smollm2-135m, max_length: 256, dtype: fp32, system_prompt: null, device: auto,
               pooling: lasttoken, prompts: instruct, padding_side: left, embedding_attention: causal}
    adapter:  {type: none | lora | qlora, r: 16, alpha: 32, dropout: 0.0, targets: all-linear, dora, rslora}
    data:     {train: pairs.jsonl | beir:DIR:SPLIT, columns: {question: query, answer: positive, topic: focus},
               max_examples: 256, sample: random, heldout: beir:DIR:SPLIT, heldout_examples: 64, dev: beir:DIR:SPLIT}
    dpo:      {beta: 0.1}                                  (embedkit llm dpo)
    joint:    {sft_weight: 1.0}                            (embedkit llm joint)
    loss:     {temperature: 0.02, symmetric: false, ...}   (llm joint's contrastive term: embedkit.train.losses)
    training: {output_dir: runs/x, epochs: 1, batch_size: 16, micro_batch_size: 8, lr: 2e-4, seed: 42,
               eval_every, checkpoint_every, gradient_accumulation, mixed_precision, report_to, ...}
    deepspeed / fsdp: as in `embedkit train` recipes (several processes: --nproc N)

`LLMRecipe` derives from embedkit/train/config.py's `BaseRecipe`, as `embedkit train` recipes do: the sections the
engine (embedkit/train/engine.py) reads are declared there once and narrowed here by subclasses. Errors are one
ConfigError naming the file, line and field (the YAML reading and `--set` are shared). Relative paths are relative to the
current directory.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import AfterValidator, Field, model_validator

from embedkit.errors import ConfigError
from embedkit.models.registry import EMBEDDED_MODELS
from embedkit.train.config import (AdapterSection, BaseRecipe, EngineDataSection, EngineModelSection,
                                   EngineTrainingSection, LossSection, Section, check_engine_environment,
                                   parse_train_source, read_recipe_file, registered_pooling)

MODES = ("sft", "dpo", "joint")


def _causal_lm_pooling(name: str) -> str:
    return registered_pooling(name, for_causal_lm=True)


class LLMModelSection(EngineModelSection):
    name: str = Field(description="smollm2-135m, a local folder with a causal LM, or a Hugging Face id")
    max_length: int = Field(256, gt=8, description="tokens of one chat example (prompt + answer) or embedded text")
    system_prompt: str | None = None  # None: the chat template's own default
    # The embedding side of the same model. None: the source folder's setting, else the LLM defaults.
    pooling: Annotated[str, AfterValidator(_causal_lm_pooling)] | None = None  # the registry's for_causal_lm modes
    prompts: dict[str, str] | str | None = None
    padding_side: Literal["left", "right"] | None = None
    embedding_attention: Literal["causal", "bidirectional"] = "causal"


class LLMAdapterSection(AdapterSection):
    """The engine's adapter section (embedkit/train/config.py), LoRA unless the recipe says otherwise. The output
    folder always holds the merged model (no `save`)."""

    type: Literal["none", "lora", "qlora"] = "lora"


class QAColumns(Section):
    question: str = "query"
    answer: str = "positive"
    topic: str | None = "focus"  # preference pairs take the rejected answer from the same topic


class LLMDataSection(EngineDataSection):
    train: str = Field(description="question/answer pairs (.jsonl) or beir:DIR[:SPLIT]")
    columns: QAColumns = QAColumns()
    max_examples: int | None = Field(None, gt=0)
    sample: Literal["first", "random"] = "random"
    heldout: str | None = None  # held-out QA data: answer loss (sft, joint), preference accuracy (dpo)
    heldout_examples: int | None = Field(64, gt=0)
    heldout_before: bool = True  # also measure the held-out metric before training (the starting model)
    # joint: a retrieval task (beir:DIR:SPLIT), the dev metric (every training.eval_every steps, and at the end).
    # sft / dpo: the dev metric is the held-out answer loss / preference accuracy of data.heldout.
    dev: str | None = None
    dev_batch_size: int = Field(32, gt=0)


class DPOSection(Section):
    beta: float = Field(0.1, gt=0.0, description="strength of the KL anchor to the reference (the starting model)")


class JointSection(Section):
    sft_weight: float = Field(1.0, ge=0.0, description="loss = contrastive + sft_weight * answer loss (0: embedding only)")


class LLMTrainingSection(EngineTrainingSection):
    batch_size: int = Field(16, gt=0, description="examples (sft), pairs (dpo) or query/answer pairs (joint) per step")
    micro_batch_size: int | None = Field(None, gt=0, description="split each step's forward into chunks of this size")
    lr: float = Field(2e-4, gt=0.0)
    weight_decay: float = Field(0.0, ge=0.0)
    log_every: int = Field(1, gt=0)


def _joint_loss() -> LossSection:
    # An LLM embedder's last-token cosines spread less than an encoder's: a sharper temperature than 0.05.
    return LossSection(temperature=0.02)


class LLMRecipe(BaseRecipe):
    model: LLMModelSection
    adapter: LLMAdapterSection = LLMAdapterSection()
    data: LLMDataSection
    dpo: DPOSection = DPOSection()
    joint: JointSection = JointSection()
    loss: LossSection = Field(default_factory=_joint_loss)
    training: LLMTrainingSection

    @model_validator(mode="after")
    def _consistent(self):
        if self.loss.hard_negatives or self.loss.distillation != "none":
            raise ValueError("llm joint trains on question/answer pairs: in-batch negatives only (no "
                             "loss.hard_negatives, no distillation)")
        return self


def load_llm_recipe(path: str | Path, overrides: list[str] | None = None, *, mode: str,
                    validate: bool = True) -> LLMRecipe:
    """Read, override, type-check and validate an LLM recipe for `mode` (sft, dpo, joint); loads no model."""
    if mode not in MODES:
        raise ConfigError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
    path = Path(path)
    raw, text = read_recipe_file(path, overrides)
    recipe = LLMRecipe.from_raw(raw, source=path, text=text)
    if validate:
        validate_llm_recipe(recipe, mode=mode, source=path)
    return recipe


def _check_source(spec: str, *, source, field: str) -> None:
    kind, folder, split = parse_train_source(spec)
    if kind == "beir":
        if not (folder / "corpus.jsonl").is_file() or not (folder / "qrels" / f"{split}.tsv").is_file():
            raise ConfigError(f"not a BEIR folder with qrels/{split}.tsv: {folder}", path=source, field=field)
    elif not folder.is_file():
        raise ConfigError(f"data file not found: {folder}", path=source, field=field)
    elif folder.suffix.lower() != ".jsonl":
        raise ConfigError(f"question/answer data must be .jsonl or beir:DIR:SPLIT, not {folder.suffix!r}",
                          path=source, field=field)


def validate_llm_recipe(recipe: LLMRecipe, *, mode: str, source=None) -> None:
    _check_source(recipe.data.train, source=source, field="data.train")
    if recipe.data.heldout:
        _check_source(recipe.data.heldout, source=source, field="data.heldout")
    if recipe.data.dev:
        if mode != "joint":
            raise ConfigError("data.dev (retrieval evaluation) applies to `embedkit llm joint` only", path=source,
                              field="data.dev")
        from embedkit.eval.tasks import parse_task_spec

        spec = parse_task_spec(recipe.data.dev)
        if spec.path is not None and not Path(spec.path).exists():
            raise ConfigError(f"dev data not found: {spec.path}", path=source, field="data.dev")
    if "loss" in recipe.model_fields_set and mode != "joint":
        raise ConfigError("the loss section sets llm joint's contrastive term; sft and dpo have their own losses",
                          path=source, field="loss")
    if recipe.training.eval_every and not (recipe.data.dev if mode == "joint" else recipe.data.heldout):
        raise ConfigError("training.eval_every needs a dev set: data.dev (joint) or data.heldout (sft, dpo)",
                          path=source, field="training.eval_every")
    if mode == "dpo" and not recipe.data.columns.topic and not recipe.data.train.startswith("beir:"):
        raise ConfigError("dpo builds rejected answers from the same topic: set data.columns.topic", path=source,
                          field="data.columns.topic")
    if recipe.model.embedding_attention == "bidirectional" and mode != "joint":
        raise ConfigError("model.embedding_attention: bidirectional needs the embedding side trained (llm joint)",
                          path=source, field="model.embedding_attention")
    name = recipe.model.name
    looks_like_path = name.startswith((".", "/", "~")) or name.count("/") != 1
    if name not in EMBEDDED_MODELS and looks_like_path and not Path(name).expanduser().is_dir():
        raise ConfigError(f"no model {name!r}: not an embedded model, an existing folder or a Hugging Face id",
                          path=source, field="model.name")
    if name == "minilm":
        raise ConfigError("minilm is an encoder without a generative head; use smollm2-135m or a causal LM",
                          path=source, field="model.name")
    check_engine_environment(recipe, source=source)
    output = Path(recipe.training.output_dir)
    if output.exists() and not output.is_dir():
        raise ConfigError(f"output_dir exists and is not a folder: {output}", path=source, field="training.output_dir")
