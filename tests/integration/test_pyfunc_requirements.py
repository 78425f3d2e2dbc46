"""The registered pyfunc declares everything its loader imports, so it loads in a clean environment."""

from __future__ import annotations

import json
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, packages_distributions, requires
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from pipelines.registry import mlflow_client as registry

# Load and predict as `mlflow models predict` does in its fresh environment, with the top-level modules named in
# argv[2] made unimportable (what a clean environment without their distributions looks like); print the modules
# the interpreter did not have at start-up and the predictions.
LOADER = """
import json, sys
from importlib.abc import MetaPathFinder

blocked = set(json.loads(sys.argv[2]))


class Absent(MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in blocked:
            raise ModuleNotFoundError(f"No module named {name!r} (not in the pyfunc's requirements)", name=name)
        return None


sys.meta_path.insert(0, Absent())
before = set(sys.modules)
import mlflow.pyfunc
import pandas as pd
model = mlflow.pyfunc.load_model(sys.argv[1])
out = model.predict(pd.DataFrame({"query": ["cordless drill", "fridge freezer"]}), params={"k": 5})
modules = sorted({name.split(".")[0] for name in set(sys.modules) - before})
print(json.dumps({"modules": modules, "predictions": json.loads(out.to_json(orient="records"))}))
"""
# Top-level names that belong to no distribution: Cython's and C extensions' private modules, multiprocessing's
# __mp_main__, and the module MLflow loads the models-from-code file as.
UNOWNED_OK = ("_", "code_model_", "cython_runtime")


def _load(model_dir: Path, cwd: Path, blocked: set[str]) -> dict:
    run = subprocess.run(
        [sys.executable, "-c", LOADER, str(model_dir), json.dumps(sorted(blocked))],
        cwd=cwd,  # outside the checkout: `pipelines` comes from the model's own code_paths copy
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


def _installed_closure(declared: list[Requirement]) -> set[str]:
    """Every distribution that installing `declared` brings (their requirements, recursively, markers evaluated)."""
    seen: set[str] = set()
    todo = [(r.name, frozenset(r.extras)) for r in declared]
    while todo:
        name, extras = todo.pop()
        key = canonicalize_name(name)
        if key in seen:
            continue
        seen.add(key)
        try:
            reqs = [Requirement(r) for r in requires(name) or []]
        except PackageNotFoundError:
            continue
        for req in reqs:
            if req.marker is None or any(req.marker.evaluate({"extra": e}) for e in extras or {""}):
                todo.append((req.name, frozenset(req.extras)))
    return seen


def test_the_loader_imports_nothing_the_requirements_do_not_install(champion, tmp_path: Path) -> None:
    bundle = registry.download_bundle(champion.paths, champion.model_name, champion.version, tmp_path / "dl")
    model_dir = bundle.parents[1]  # <version>/model: MLmodel, requirements.txt, code/, artifacts/bundle
    declared = [
        Requirement(line)
        for line in (model_dir / "requirements.txt").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    print("declared:", [str(r) for r in declared])
    assert {canonicalize_name(r.name) for r in declared} >= {"bm25s", "pystemmer", "onnxruntime", "tokenizers"}

    full = _load(model_dir, tmp_path, blocked=set())
    imported = set(full["modules"])
    third_party = imported - set(sys.stdlib_module_names) - {"pipelines", "__main__"}
    owners = packages_distributions()
    unowned = sorted(m for m in third_party if m not in owners)
    assert [m for m in unowned if not m.startswith(UNOWNED_OK)] == [], unowned
    covered = _installed_closure(declared)

    def installed(module: str) -> bool:
        return any(canonicalize_name(d) in covered for d in owners[module])

    extra = sorted({d for m in third_party if m in owners and not installed(m) for d in owners[m]})
    print(f"requirements install {len(covered)} distributions; imported here beyond them (optional imports): {extra}")

    # A clean environment, short of a network: every top-level module of a distribution the requirements do not
    # install is unimportable (`pipelines` comes from the model's code_paths). The model must load and answer the same:
    # what the loader imported beyond the requirements can only have been an optional import (numba, orjson ...).
    blocked = {m for m in owners if not installed(m)} - {"pipelines"}
    clean = _load(model_dir, tmp_path, blocked)
    assert clean["predictions"] == full["predictions"]
    assert not set(clean["modules"]) & blocked

    # the loader's own imports are declared by name, not only reached through another package's dependencies
    direct = {"onnxruntime", "tokenizers", "bm25s", "Stemmer", "numpy", "pandas"}
    assert direct <= imported, direct - imported
    assert {canonicalize_name(owners[m][0]) for m in direct} <= {canonicalize_name(r.name) for r in declared}
