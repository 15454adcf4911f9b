"""Benchmark: with ~100 labelled queries, does a uniform weight average ("model soup", Wortsman et al. 2022) of the
default recipe trained at several seeds beat the seeds alone, and sentence-transformers' default trainer?

    .venv/bin/python bench/bench_soup.py --dataset medquad --groups 42,43,44 142,243,344 --out runs/soup \
        --peer-evals bench/records/tune/q100 --record bench/records/tune/medquad-q100-soup.json

Why it was tried (issue #30): with a hundred labels the batch order alone moves MiniLM's nDCG@10 by a standard
deviation of up to 0.009 between seeds (docs/tune.md, "Few labels"), and averaging the weights of fine-tunings that
share a pretrained start is the standard way to keep the mean and lose that variance, at no inference cost.

Per group of seeds: the default recipe (recipes/minilm-<dataset>.yaml) trained on bench_tune.py's seeded 100-query
sample 1 at each seed (bench_tune's child process, the same training as its `default` arm), the weights averaged
element-wise into one model, evaluated on the full test split. The members' and sentence-transformers' per-seed
evaluations are read from `--peer-evals` (bench_tune.py's `<ds>-q100-sub1-st-schedule-s<seed>.eval.json`: the
recipe's schedule since 2026-12-07, the same training; its `-default-` files there are the former recipe's; and
`-st-s<seed>.eval.json`), or the members are evaluated here when absent. Verdicts are `embedkit compare` on the
per-query nDCG@10 (soups vs their members, soups vs sentence-transformers' default trainer, both sides
seed-averaged; with several reports a side also over the seeds). MedQuAD: ~1 min per training and ~2 min per
evaluation on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
from pathlib import Path

for _var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ.setdefault(_var, "1")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
sys.path.insert(0, str(REPO))

import bench_tune as bt  # noqa: E402


def average_weights(members: list[Path], target: Path) -> None:
    """A copy of the first member's folder with every tensor the element-wise mean of the members' (fp32 sums)."""
    from safetensors.torch import load_file, save_file

    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(members[0], target)
    states = [load_file(str(m / "model.safetensors")) for m in members]
    mean = {k: (sum(s[k].float() for s in states) / len(states)).to(states[0][k].dtype) for k in states[0]}
    save_file(mean, str(target / "model.safetensors"), metadata={"format": "pt"})
    for probe in target.glob("*probe*"):  # the first member's probe vectors are not the soup's
        probe.unlink()


def peer_eval(folder: Path | None, dataset: str, arms: tuple[str, ...], seed: int) -> dict | None:
    for arm in arms:
        path = folder / f"{dataset}-q100-sub1-{arm}-s{seed}.eval.json" if folder else None
        if path is not None and path.is_file():
            return json.loads(path.read_text())
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="medquad", choices=sorted(bt.DATASETS))
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data"))
    parser.add_argument("--groups", nargs="+", default=["42,43,44", "142,243,344"],
                        help="one soup per group of comma-separated seeds")
    parser.add_argument("--peer-evals", type=Path, help="a folder of bench_tune.py's q100 .eval.json files")
    parser.add_argument("--out", default="runs/soup")
    parser.add_argument("--record")
    args = parser.parse_args()
    from bench_train import verdict_between

    ds = args.dataset
    work = Path(args.out) / ds
    work.mkdir(parents=True, exist_ok=True)
    train, extra = bt.subsample_queries(ds, args.data, work, 100, 1)
    overrides = bt.recipe_overrides(ds, args.data, train, extra)
    task = bt.test_task(ds, args.data, work)
    values: dict = {"dataset": ds, "queries": 100, "sample": 1, "recipe": bt.DATASETS[ds]["recipe"], "soups": {}}
    soups, members_all, peers = [], [], []
    for group in [[int(s) for s in g.split(",")] for g in args.groups]:
        folders, member_reports = [], []
        for seed in group:
            folder = work / f"default-s{seed}"
            if not (folder / "model.safetensors").is_file():
                bt.run_child("embedkit", bt.DATASETS[ds]["recipe"], overrides, folder, seed)
            folders.append(folder)
            report = peer_eval(args.peer_evals, ds, ("st-schedule",), seed)
            if report is None:
                report = bt.evaluate_once(folder, task, work / "cache", folder.with_suffix(".eval.json"), True)
            member_reports.append(report)
            peer = peer_eval(args.peer_evals, ds, ("st",), seed)
            if peer is not None:
                peers.append(peer)
        soup = work / ("soup-" + "-".join(map(str, group)))
        average_weights(folders, soup)
        report = bt.evaluate(soup, task, work / "cache")
        soup.with_suffix(".eval.json").write_text(json.dumps(report))
        soups.append(report)
        members_all += member_reports
        member_scores = [bt.ndcg(r) for r in member_reports]
        values["soups"][soup.name] = {"seeds": group, "ndcg_at_10": bt.ndcg(report), "members": member_scores,
                                      "members_mean": statistics.fmean(member_scores)}
        print(f"[{ds}] {soup.name}: nDCG@10 {bt.ndcg(report):.4f}, members "
              f"{', '.join(f'{s:.4f}' for s in member_scores)} (mean {statistics.fmean(member_scores):.4f})",
              flush=True)
    values["soup_mean"] = statistics.fmean(bt.ndcg(r) for r in soups)
    values["members_mean"] = statistics.fmean(bt.ndcg(r) for r in members_all)
    values["soup_vs_members"] = verdict_between(members_all, soups, "members", "soups", seed=0)
    if peers:
        values["st_mean"] = statistics.fmean(bt.ndcg(r) for r in peers)
        values["st_seeds"] = len(peers)
        values["soup_vs_st"] = verdict_between(peers, soups, "ST default trainer", "soups", seed=0)
    print(json.dumps({k: v for k, v in values.items() if k != "soups"}, indent=1))
    if args.record:
        from record import write_record

        write_record(args.record, values, command="bench/bench_soup.py " + " ".join(sys.argv[1:]))


if __name__ == "__main__":
    main()
