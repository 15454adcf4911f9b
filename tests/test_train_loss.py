"""The contrastive losses (InfoNCE, Matryoshka, distillation) and their factory: values checked against
hand-written formulas on tiny tensors."""

from __future__ import annotations

import math
import os
import socket

import pytest
import torch
import torch.nn.functional as F

from embedkit.train.config import LossSection
from embedkit.train.losses import Distillation, InfoNCE, Matryoshka, build_loss, text_keys


def ce(scores: list[float], label: int) -> float:
    """-log softmax(scores)[label], written out."""
    return -scores[label] + math.log(sum(math.exp(s) for s in scores))


Q = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
D = torch.tensor([[0.8, 0.6], [0.0, 1.0]])
# cosines: q0.d0 = .8, q0.d1 = 0, q1.d0 = .96, q1.d1 = .8


def test_in_batch_infonce_hand_computed():
    out = InfoNCE(temperature=1.0)(Q, D)
    expected = (ce([0.8, 0.0], 0) + ce([0.96, 0.8], 1)) / 2
    assert out.loss.item() == pytest.approx(expected, abs=1e-6)
    out = InfoNCE(temperature=0.5)(Q, D)  # temperature divides the cosine
    expected = (ce([1.6, 0.0], 0) + ce([1.92, 1.6], 1)) / 2
    assert out.loss.item() == pytest.approx(expected, abs=1e-6)


def test_unnormalised_inputs_are_scored_by_cosine():
    out = InfoNCE(temperature=1.0)(Q * 3.0, D * torch.tensor([[2.0], [5.0]]))
    assert out.loss.item() == pytest.approx((ce([0.8, 0.0], 0) + ce([0.96, 0.8], 1)) / 2, abs=1e-6)


def test_hard_negatives_extend_the_candidates():
    negs = torch.tensor([[0.0, 1.0], [1.0, 0.0]])  # one per query: rows 2 (query 0) and 3 (query 1)
    out = InfoNCE(temperature=1.0, mask_false_negatives=False)(Q, torch.cat([D, negs]))
    # query 0: d0 .8, d1 0, n0 0, n1 1 ; query 1: d0 .96, d1 .8, n0 .8, n1 .6
    expected = (ce([0.8, 0.0, 0.0, 1.0], 0) + ce([0.96, 0.8, 0.8, 0.6], 1)) / 2
    assert out.loss.item() == pytest.approx(expected, abs=1e-6)
    with pytest.raises(ValueError, match="B \\* \\(1 \\+ k\\)"):
        InfoNCE()(Q, torch.cat([D, negs[:1]]))


def test_learned_temperature_is_a_trained_log_parameter():
    fixed = InfoNCE(temperature=0.05)
    assert not list(fixed.parameters()) and fixed.scale.item() == pytest.approx(20.0)
    learned = InfoNCE(temperature=0.5, learn_temperature=True)
    assert [n for n, _ in learned.named_parameters()] == ["log_scale"]
    out = learned(Q, D)
    assert out.loss.item() == pytest.approx((ce([1.6, 0.0], 0) + ce([1.92, 1.6], 1)) / 2, abs=1e-6)
    out.loss.backward()
    # d loss / d log_scale = scale * d loss / d scale; finite-difference the latter.
    eps = 1e-3
    plus = (ce([0.8 * (2 + eps), 0.0], 0) + ce([0.96 * (2 + eps), 0.8 * (2 + eps)], 1)) / 2
    minus = (ce([0.8 * (2 - eps), 0.0], 0) + ce([0.96 * (2 - eps), 0.8 * (2 - eps)], 1)) / 2
    assert learned.log_scale.grad.item() == pytest.approx(2.0 * (plus - minus) / (2 * eps), abs=1e-4)
    learned.log_scale.data.fill_(10.0)  # exp(10) > 100: clamped
    assert learned.scale.item() == pytest.approx(100.0)


def test_symmetric_adds_document_to_query_term():
    out = InfoNCE(temperature=1.0, symmetric=True)(Q, D)
    forward = (ce([0.8, 0.0], 0) + ce([0.96, 0.8], 1)) / 2
    backward = (ce([0.8, 0.96], 0) + ce([0.0, 0.8], 1)) / 2  # d0 vs (q0, q1), d1 vs (q0, q1)
    assert out.loss.item() == pytest.approx((forward + backward) / 2, abs=1e-6)


def test_duplicate_positive_text_is_masked():
    q = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]])
    d = torch.tensor([[0.8, 0.6], [0.0, 1.0], [0.8, 0.6]])  # d2 is the same text as d0
    queries, docs = ["a", "b", "c"], ["x", "y", "x"]
    loss = InfoNCE(temperature=1.0)
    out = loss(q, d, query_keys=text_keys(queries), document_keys=text_keys(docs))
    # query 0 must not see d2 (its positive again), query 2 must not see d0.
    sims = (F.normalize(q, dim=-1) @ F.normalize(d, dim=-1).T).tolist()
    expected = (ce([sims[0][0], sims[0][1]], 0) + ce(sims[1], 1) + ce([sims[2][1], sims[2][2]], 1)) / 3
    assert out.loss.item() == pytest.approx(expected, abs=1e-6)
    assert out.masked == 2
    unmasked = InfoNCE(temperature=1.0, mask_false_negatives=False)(q, d, document_keys=text_keys(docs))
    assert unmasked.loss.item() == pytest.approx(sum(ce(sims[i], i) for i in range(3)) / 3, abs=1e-6)


def test_other_positives_of_the_same_query_are_masked():
    q = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.6, 0.8]])  # rows 0 and 1: the same query, two positives
    d = torch.tensor([[0.8, 0.6], [0.6, 0.8], [0.0, 1.0]])
    out = InfoNCE(temperature=1.0)(q, d, query_keys=text_keys(["q", "q", "r"]),
                                           document_keys=text_keys(["p1", "p2", "p3"]))
    sims = (q @ d.T).tolist()
    expected = (ce([sims[0][0], sims[0][2]], 0) + ce([sims[1][1], sims[1][2]], 0) + ce(sims[2], 2)) / 3
    assert out.loss.item() == pytest.approx(expected, abs=1e-6)
    assert out.masked == 2


def test_margin_masks_negatives_scoring_near_the_positive():
    # query 1: positive d1 .8, candidate d0 .96 > .8 - .1 -> masked; query 0: d1 scores 0 < .8 - .1 -> kept.
    out = InfoNCE(temperature=1.0, margin=0.1)(Q, D)
    assert out.loss.item() == pytest.approx((ce([0.8, 0.0], 0) + ce([0.8], 0)) / 2, abs=1e-6)
    assert out.masked == 1


def test_matryoshka_averages_the_loss_over_prefixes():
    torch.manual_seed(0)
    q, d = torch.randn(4, 8), torch.randn(12, 8)  # two hard negatives each
    plain = InfoNCE(temperature=0.1, mask_false_negatives=False)
    loss = Matryoshka(plain, [8, 4, 2])
    expected = sum(plain(q[:, :m], d[:, :m]).loss.item() for m in (8, 4, 2)) / 3
    assert loss(q, d).loss.item() == pytest.approx(expected, abs=1e-6)
    with pytest.raises(ValueError, match="exceeds"):
        Matryoshka(InfoNCE(), [16])(q, d)


def test_kl_distillation_hand_computed():
    negs = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    teacher = torch.tensor([[2.0, 0.0], [1.0, 1.0]])  # [positive, negative] per query
    loss = Distillation(InfoNCE(temperature=1.0), kind="kl", contrastive_weight=0.0)
    out = loss(Q, torch.cat([D, negs]), teacher_scores=teacher)
    student = [[0.8, 0.0], [0.8, 0.6]]  # own positive, own negative

    def softmax(v):
        z = sum(math.exp(x) for x in v)
        return [math.exp(x) / z for x in v]

    kl = 0.0
    for s, t in zip(student, teacher.tolist()):
        p, r = softmax(t), softmax(s)
        kl += sum(pi * math.log(pi / ri) for pi, ri in zip(p, r))
    assert out.loss.item() == pytest.approx(kl / 2, abs=1e-6)
    assert out.contrastive > 0  # still reported, weighted 0


def test_margin_mse_distillation_hand_computed():
    negs = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    teacher = torch.tensor([[2.0, 0.0], [1.0, 1.0]])
    out = Distillation(InfoNCE(temperature=1.0), kind="margin_mse", weight=0.5)(
        Q, torch.cat([D, negs]), teacher_scores=teacher)
    contrastive = (ce([0.8, 0.0, 0.0, 1.0], 0) + ce([0.96, 0.8, 0.8, 0.6], 1)) / 2
    mse = (((0.8 - 0.0) - 2.0) ** 2 + ((0.8 - 0.6) - 0.0) ** 2) / 2
    assert out.loss.item() == pytest.approx(contrastive + 0.5 * mse, abs=1e-6)
    with pytest.raises(ValueError, match="teacher_scores"):
        Distillation(InfoNCE(), kind="kl")(Q, D)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _gather_worker(rank: int, world: int, port: int, q, d, keys_q, keys_d, result_queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        b = q.shape[0] // world
        # Each process holds its queries, positives and hard negatives (k = 1) in the documented layout.
        local_q = q[rank * b:(rank + 1) * b].clone().requires_grad_(True)
        pos, neg = d[: q.shape[0]], d[q.shape[0]:]
        local_d = torch.cat([pos[rank * b:(rank + 1) * b], neg[rank * b:(rank + 1) * b]]).clone().requires_grad_(True)
        lk_q = keys_q[rank * b:(rank + 1) * b]
        lk_d = torch.cat([keys_d[: q.shape[0]][rank * b:(rank + 1) * b], keys_d[q.shape[0]:][rank * b:(rank + 1) * b]])
        loss_fn = InfoNCE(temperature=0.1, symmetric=True)
        out = loss_fn(local_q, local_d, query_keys=lk_q, document_keys=lk_d)
        out.loss.backward()
        # Plain lists: shared-memory tensors would vanish with this process before the parent reads them.
        result_queue.put((rank, out.loss.item(), local_q.grad.tolist(), local_d.grad.tolist(), loss_fn.grad_scale))
    finally:
        torch.distributed.destroy_process_group()


def test_gather_across_processes_gives_the_full_batch_loss_and_gradient():
    torch.manual_seed(0)
    world, b = 2, 3
    q, d = torch.randn(world * b, 4), torch.randn(2 * world * b, 4)
    keys_q = text_keys([f"q{i}" for i in range(world * b)])
    names = [f"d{i}" for i in range(2 * world * b)]
    names[1] = "d4"  # a duplicate of another process's positive: masked across processes too
    keys_d = text_keys(names)
    # Reference: one process, documents reordered to the per-process block layout [pos_r, neg_r] per rank.
    order = []
    for r in range(world):
        order += list(range(r * b, (r + 1) * b)) + list(range(world * b + r * b, world * b + (r + 1) * b))
    ref_q, ref_d = q.clone().requires_grad_(True), d[order].clone().requires_grad_(True)
    ref_fn = InfoNCE(temperature=0.1, symmetric=True)
    ref_d_keys = keys_d[order]
    # Labels in the reference must point at each query's positive in the reordered layout: rank-block layout
    # is what gather produces, so compute the reference with the same label rule by hand.
    sims = F.normalize(ref_q, dim=-1) @ F.normalize(ref_d, dim=-1).T * 10.0
    labels = torch.tensor([r * 2 * b + i for r in range(world) for i in range(b)])
    pos_keys = ref_d_keys[labels]
    mask = pos_keys[:, None] == ref_d_keys[None, :]
    mask[torch.arange(len(labels)), labels] = False
    forward = F.cross_entropy(sims.masked_fill(mask, torch.finfo(sims.dtype).min), labels)
    backward = F.cross_entropy((F.normalize(ref_d[labels], dim=-1) @ F.normalize(ref_q, dim=-1).T) * 10.0,
                               torch.arange(len(labels)))
    ref_loss = (forward + backward) / 2
    ref_loss.backward()
    assert ref_fn.grad_scale == 1

    ctx = torch.multiprocessing.get_context("spawn")  # fork deadlocks gloo after torch threads started
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_gather_worker, args=(r, world, port, q, d, keys_q, keys_d, queue)) for r in range(world)]
    for p in procs:
        p.start()
    results = sorted(queue.get(timeout=60) for _ in procs)
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    for rank, loss_value, grad_q, grad_d, grad_scale in results:
        assert grad_scale == world
        assert loss_value == pytest.approx(ref_loss.item(), abs=1e-6)
        # Each process's gradient is exactly its slice of the full-batch gradient.
        assert torch.allclose(torch.tensor(grad_q), ref_q.grad[rank * b:(rank + 1) * b], atol=1e-6)
        assert torch.allclose(torch.tensor(grad_d), ref_d.grad[rank * 2 * b:(rank + 1) * 2 * b], atol=1e-6)


def test_the_factory_builds_what_the_recipe_section_names():
    plain = build_loss(LossSection(temperature=0.1))
    assert isinstance(plain, InfoNCE) and plain.scale.item() == pytest.approx(10.0)
    both = build_loss(LossSection(temperature=0.1, matryoshka_dims=[2, 1], distillation="margin_mse",
                                  hard_negatives=1, distillation_weight=0.5))
    assert isinstance(both, Matryoshka) and isinstance(both.inner, Distillation)
    assert isinstance(both.inner.inner, InfoNCE) and both.dims == [2, 1]
    assert "Matryoshka" in both.describe() and "margin_mse" in both.describe() and "InfoNCE" in both.describe()
    negs = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    teacher = torch.tensor([[2.0, 0.0], [1.0, 1.0]])
    by_hand = Matryoshka(Distillation(InfoNCE(temperature=0.1), kind="margin_mse", weight=0.5), [2, 1])
    docs = torch.cat([D, negs])
    assert both(Q, docs, teacher_scores=teacher).loss.item() == pytest.approx(
        by_hand(Q, docs, teacher_scores=teacher).loss.item(), abs=1e-7)
    with pytest.raises(ValueError, match="unknown loss type"):
        build_loss(LossSection.model_construct(**{**LossSection().model_dump(), "type": "triplet"}))
