"""Shared fixtures: tiny models built from configs (no hub, no downloads), and the offline environment."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

CORPUS = [
    "the patient has a fever and a cough",
    "diabetes is a disease of high blood sugar",
    "insulin lowers the level of glucose in the blood",
    "a man is playing a guitar on the stage",
    "the court ruled that the contract was void",
    "interest rates rose by half a percent this quarter",
    "what causes high blood pressure in adults",
    "how is asthma treated in children",
    "the quick brown fox jumps over the lazy dog",
    "symptoms of flu include fever, aches and fatigue",
] * 3



def bench_module(name: str):
    """bench/NAME.py imported as the module NAME (bench/ is scripts, not a package), for a module-scoped fixture:
    `yield from bench_module("gpu_check")` (the module is dropped from sys.modules afterwards)."""
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location(name, REPO / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses and pickling look their module up by name
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(name, None)

@pytest.fixture(autouse=True)
def _embedkit_logging_restored():
    """A command run in this process (CliRunner, `main([...])`) configures the "embedkit" logger for its run: its
    handler, its level (-q, a command's --quiet), no propagation to the root, and the libraries' progress bars off
    (HF_HUB_DISABLE_PROGRESS_BARS). Put it back after each test, so that the next test's commands start from the
    defaults and its caplog still receives the records."""
    import logging

    from embedkit import logs

    logger = logging.getLogger(logs.ROOT_LOGGER)
    handlers, level, propagate, configured = logger.handlers[:], logger.level, logger.propagate, dict(logs._configured)
    bars = os.environ.get(logs.HF_BARS_ENV)
    yield
    logger.handlers, logger.propagate = handlers, propagate
    logger.setLevel(level)
    logs._configured.clear()
    logs._configured.update(configured)
    if bars is None:
        os.environ.pop(logs.HF_BARS_ENV, None)
    else:
        os.environ[logs.HF_BARS_ENV] = bars


@pytest.fixture(scope="session", autouse=True)
def _isolated_embedkit_home(tmp_path_factory):
    """Caches go to a temp folder, except the converted SmolLM2, which is reused across runs when present."""
    home = os.environ.get("EMBEDKIT_TEST_HOME") or str(tmp_path_factory.mktemp("embedkit_home"))
    os.environ["EMBEDKIT_HOME"] = home
    yield home


def _wordpiece_tokenizer(vocab_size: int = 200):
    """A tiny BERT WordPiece tokenizer, the same in every process: its vocabulary is built, not trained (the Rust
    trainer breaks frequency ties in hash order, so a trained vocabulary, and every score of a tiny model, changed
    from one pytest process to the next). Specials, then the corpus's characters and their ## continuations, then
    its whole words, sorted; filled up to `vocab_size` with the sorted ##word continuations."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    normalizer = normalizers.BertNormalizer(lowercase=True)
    pre = pre_tokenizers.BertPreTokenizer()
    words = sorted({w for text in CORPUS for w, _ in pre.pre_tokenize_str(normalizer.normalize_str(text))})
    chars = sorted({c for w in words for c in w})
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tokens = specials + chars + [f"##{c}" for c in chars] + [w for w in words if len(w) > 1]
    tokens += [f"##{w}" for w in words if len(w) > 1][: max(0, vocab_size - len(tokens))]
    tok = Tokenizer(models.WordPiece(vocab={t: i for i, t in enumerate(tokens)}, unk_token="[UNK]"))
    tok.normalizer = normalizer
    tok.pre_tokenizer = pre
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", tok.token_to_id("[CLS]")), ("[SEP]", tok.token_to_id("[SEP]"))],
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]", model_max_length=128)


def _bytelevel_tokenizer(vocab_size: int = 300):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>", unk_token="<|endoftext|>", model_max_length=256,
                                   model_input_names=["input_ids", "attention_mask"])


def build_tiny_bert(folder: Path, *, hidden: int = 32, seed: int = 0) -> Path:
    import torch
    from transformers import BertConfig, BertModel

    tokenizer = _wordpiece_tokenizer()
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=hidden, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=hidden * 2, max_position_embeddings=128)
    BertModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def build_tiny_llama(folder: Path, *, hidden: int = 32, seed: int = 0, max_positions: int = 256,
                     tied: bool = False) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = _bytelevel_tokenizer()
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=hidden * 2,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=max_positions, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         tie_word_embeddings=tied)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture
def one_torch_thread():
    """Tiny models: extra threads only spin-wait on a busy machine."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory) -> Path:
    """A 2-layer, 32-d BERT with a 200-token WordPiece vocabulary (plain HF folder, no pooling config)."""
    return build_tiny_bert(tmp_path_factory.mktemp("tiny_bert"))


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    """A 2-layer, 32-d Llama causal LM with a 300-token byte-level BPE vocabulary."""
    return build_tiny_llama(tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture(scope="session")
def tiny_llama_tied_dir(tmp_path_factory) -> Path:
    """Like tiny_llama_dir with the LM head tied to the input embedding (SmolLM2, Qwen3-0.6B style)."""
    return build_tiny_llama(tmp_path_factory.mktemp("tiny_llama_tied"), tied=True)


@pytest.fixture(scope="session")
def tiny_llama64_dir(tmp_path_factory) -> Path:
    """Like tiny_llama_dir with 64-d layers: bitsandbytes' CPU 4-bit path needs in_features >= 64."""
    return build_tiny_llama(tmp_path_factory.mktemp("tiny_llama64"), hidden=64)


@pytest.fixture(scope="session")
def st_bert(tmp_path_factory, tiny_bert_dir) -> Path:
    """The tiny BERT saved by embedkit as a normalised sentence-transformers model with a query prompt."""
    from embedkit.models import load_model

    folder = tmp_path_factory.mktemp("st_bert") / "model"
    load_model(tiny_bert_dir, prompts={"query": "query: "}, normalize=True).save(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_reranker(tmp_path_factory, tiny_bert_dir) -> Path:
    """The tiny BERT with a new one-logit head (seeded), saved by embedkit as a cross-encoder folder."""
    import torch

    from embedkit.models.reranker import Reranker

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny_reranker") / "reranker"
    Reranker.from_pretrained(tiny_bert_dir, max_length=48, start=True).save(folder)
    return folder


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    from embedkit.models.registry import minilm_path

    return minilm_path()


@pytest.fixture(scope="session")
def shared_data() -> Path:
    assert SHARED_DATA.is_dir(), f"the shared data sets are expected at {SHARED_DATA}"
    return SHARED_DATA
