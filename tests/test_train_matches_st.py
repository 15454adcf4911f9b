"""embedkit's training engine computes what sentence-transformers' MultipleNegativesRankingLoss trainer computes.

A gap between embedkit at ST's settings and ST's trainer (MedQuAD, 100 queries) was traced on 2026-12-06 to the
batch orders each drew, not to the trainer: same batch, same weights, no dropout gave the same loss and gradients,
and the whole run equalled a plain loop over ST's loss. This keeps that true on a tiny model: embedkit's run must end
with the model that a plain torch loop ends with when it feeds embedkit's batch order to ST's loss with ST's
optimizer (fused AdamW), schedule (linear, no warm-up), clipping (1.0) and no weight decay.
"""

from __future__ import annotations

import json

import torch

from embedkit.train.config import parse_recipe
from embedkit.train.contrastive import load_examples, train
from embedkit.train.trainset import seeded_batches

PAIRS = [(f"question {w} about {v}", f"answer on {w} and {v} here") for w, v in
         [("fever", "cough"), ("insulin", "glucose"), ("court", "contract"), ("rates", "quarter"), ("asthma", "child"),
          ("flu", "aches"), ("guitar", "stage"), ("fox", "dog"), ("blood", "pressure"), ("tax", "income"),
          ("heart", "valve"), ("lease", "tenant")]]


def test_embedkit_training_ends_where_a_plain_loop_over_st_loss_ends(tiny_bert_dir, tmp_path):
    # Bugs caught: any difference in the trainer's math against ST's (the loss scale or masking, the schedule's
    # step count or warm-up, clipping, AdamW's settings, the pooling or normalisation the loss sees, the tokens).
    from sentence_transformers import SentenceTransformer, losses
    from sentence_transformers.models import Pooling, Transformer

    pairs_file = tmp_path / "pairs.jsonl"
    pairs_file.write_text("".join(json.dumps({"query": q, "positive": p}) + "\n" for q, p in PAIRS))
    recipe = parse_recipe({
        "model": {"name": str(tiny_bert_dir), "max_length": 32, "attention_dropout": 0.0, "hidden_dropout": 0.0},
        "data": {"train": str(pairs_file)}, "loss": {"temperature": 0.05},
        "training": {"output_dir": str(tmp_path / "embedkit"), "batch_size": 5, "lr": 1e-3, "epochs": 3, "seed": 3,
                     "warmup_ratio": 0.0, "weight_decay": 0.0, "max_grad_norm": 1.0, "progress": False,
                     "threads": 1}})
    train(recipe)

    torch.manual_seed(0)
    word = Transformer(str(tiny_bert_dir), max_seq_length=32,
                       config_args={"attention_probs_dropout_prob": 0.0, "hidden_dropout_prob": 0.0})
    st = SentenceTransformer(modules=[word, Pooling(word.get_embedding_dimension(), "mean")], device="cpu")
    st.train()
    mnrl = losses.MultipleNegativesRankingLoss(st, scale=20.0)  # ST's default scale: temperature 0.05
    params = [p for name, p in st.named_parameters() if "pooler" not in name]  # unused by the embedding
    optimizer = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0, fused=True)
    examples, _ = load_examples(recipe)
    batches = [seeded_batches(len(examples), recipe.training, epoch) for epoch in range(3)]
    total = sum(len(b) for b in batches)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: max(0.0, (total - step) / total))
    for epoch_batches in batches:
        for rows in epoch_batches:
            features = [st.tokenize([examples[i].query for i in rows]), st.tokenize([examples[i].positive for i in rows])]
            mnrl(features, None).backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad()

    trained = SentenceTransformer(str(tmp_path / "embedkit"), device="cpu")
    texts = [t for pair in PAIRS for t in pair]
    st.eval()
    expected = st.encode(texts, convert_to_tensor=True, normalize_embeddings=True)
    got = trained.encode(texts, convert_to_tensor=True, normalize_embeddings=True)
    base = SentenceTransformer(modules=[Transformer(str(tiny_bert_dir), max_seq_length=32),
                                        Pooling(word.get_embedding_dimension(), "mean")], device="cpu")
    moved = (expected - base.encode(texts, convert_to_tensor=True, normalize_embeddings=True)).abs().max()
    assert moved > 0.05  # the runs trained: equal outputs are not two untouched models
    assert (got - expected).abs().max() < 1e-4
