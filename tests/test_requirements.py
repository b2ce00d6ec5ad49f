"""What ComfyUI installs is what the nodes need.

ComfyUI-Manager installs ``requirements.txt`` into ComfyUI's own Python, so it lists exactly the packages the
nodes import: every third-party module that ComfyUI loads through this pack (``__init__.py``, ``nodes/``,
``encoders/``, ``adapters/``, ``workflows/run.py`` and whatever they reach through package-relative or
first-party imports) is provided by a package listed there, and every package listed there provides such a
module. The training package's imports are covered by ``requirements.txt`` and ``requirements-training.txt``
together, and the training file lists nothing the nodes already get or training does not import.

The check is static (``ast``). What counts as an import:

- every ``import`` / ``from ... import`` statement anywhere in a module, at its top or inside a function
  (a function's import runs when a person uses that feature);
- ``require("module", ...)`` from ``encoders/optional.py`` with a literal name: the nodes import cv2,
  mediapipe, insightface, onnxruntime, timm and transformers lazily this way, and a node that uses them
  needs them installed just the same (``require`` only words the error better);
- an import that loads another package: ``torch.utils.tensorboard`` needs ``tensorboard``, torchmetrics'
  FID Inception needs ``torch_fidelity`` (``NEEDS``).

Not counted: the standard library; ComfyUI's own modules (the top-level names of the ComfyUI checkout) and
torch, torchvision and numpy, which ComfyUI's requirements install; and the training metrics that are
optional by design (``OPTIONAL``), which must then be imported only inside ``try`` with an ``except
ImportError`` that tells the user what to install. Module names map to packages through the installed
distributions' metadata (``importlib.metadata.packages_distributions()``), so both files must be installed.

``requirements-facetorch.txt`` (facetorch, for ``training.evaluate --facetorch``) is installed with ``--no-deps``,
because facetorch declares torch<2.4: it must then name everything facetorch's import needs beyond the other two
files and their own dependencies, which is checked against facetorch's imports and its packages' metadata.
"""

from __future__ import annotations

import ast
import functools
import re
import sys
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest

from workflows import run

ROOT = Path(__file__).resolve().parents[1]
FIRST_PARTY = {"adapters", "encoders", "hosts", "nodes", "training", "workflows"}
FROM_COMFYUI_REQUIREMENTS = {"torch", "torchvision", "numpy"}  # requirements.txt's header says so
NEEDS = {"torch.utils.tensorboard": "tensorboard", "torchmetrics.image.fid.NoTrainInceptionV3": "torch_fidelity"}
OPTIONAL = {"pyiqa": "the LIQE metric (training/metrics.py: pip install pyiqa)",
            "pytorch_fid": "FID's pytorch-fid backend (training/metrics.py: pip install pytorch-fid)",
            "facetorch": "Arc2Face-Exp's Em. Acc., AU-MSE and VA-MSE (training/facetorch_metrics.py: "
                         "pip install --no-deps -r requirements-facetorch.txt)"}


def node_modules() -> list[Path]:
    """What ComfyUI loads: the pack, its nodes and everything they stand on (ComfyUI never loads the diffusers host)."""
    return [ROOT / "__init__.py", ROOT / "workflows" / "run.py", ROOT / "hosts" / "__init__.py",
            *sorted(path for folder in ("nodes", "encoders", "adapters", "hosts/comfyui") for path in (ROOT / folder).rglob("*.py"))]


def training_modules() -> list[Path]:
    return [*sorted((ROOT / "training").rglob("*.py")), ROOT / "hosts" / "diffusers.py"]


def listed(requirements: str) -> set[str]:
    """The normalised package names a requirements file lists."""
    names = set()
    for line in (ROOT / requirements).read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            names.add(normalise(re.match(r"[A-Za-z0-9._-]+", line).group()))
    return names


def normalise(distribution: str) -> str:
    return re.sub(r"[-_.]+", "-", distribution).lower()


def repository_files(parts: list[str]) -> set[Path]:
    """The repository files that importing a dotted name under ROOT runs: each package's ``__init__`` on the way
    and the module itself (a trailing name that is no file, such as an imported function, adds nothing)."""
    files = set()
    for end in range(1, len(parts) + 1):
        base = ROOT.joinpath(*parts[:end])
        files.update(path for path in (base.with_suffix(".py"), base / "__init__.py") if path.is_file())
    return files


class Imports(ast.NodeVisitor):
    """The imports of one module: the dotted names outside this repository (each with whether an ``except
    ImportError`` guards it), and the repository files it reaches."""

    def __init__(self, path: Path):
        self.path = path
        self.package = path.parent.relative_to(ROOT).parts
        self.external: list[tuple[str, bool]] = []  # (dotted name, guarded by `except ImportError`)
        self.reached: set[Path] = set()
        self.guarded = 0

    def visit_Try(self, node: ast.Try) -> None:
        catches_import_error = any(
            handler.type is not None and any(isinstance(name, ast.Name) and name.id in ("ImportError", "ModuleNotFoundError")
                                             for name in ast.walk(handler.type))
            for handler in node.handlers)
        self.guarded += catches_import_error
        for statement in node.body:
            self.visit(statement)
        self.guarded -= catches_import_error
        for part in (*node.handlers, *node.orelse, *node.finalbody):
            self.visit(part)

    def absolute(self, name: str) -> None:
        top = name.split(".")[0]
        if top in FIRST_PARTY and not (top == "nodes" and self.path == ROOT / "workflows" / "run.py"):
            self.reached.update(repository_files(name.split(".")))  # run.py's `nodes` is ComfyUI's nodes.py
        else:
            self.external.append((name, self.guarded > 0))

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self.absolute(alias.name)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.level == 0:
            for alias in node.names:
                self.absolute(f"{node.module}.{alias.name}")
            return
        base = list(self.package[:len(self.package) - (node.level - 1)]) + (node.module.split(".") if node.module else [])
        for alias in node.names:  # the alias may be a module: `from . import module`
            self.reached.update(repository_files([*base, alias.name]))

    def visit_Call(self, node: ast.Call) -> None:
        function = node.func.id if isinstance(node.func, ast.Name) else getattr(node.func, "attr", None)
        if function in ("require", "import_module") and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str):
            self.absolute(node.args[0].value)
        self.generic_visit(node)


def imports_reached(start: list[Path], comfyui_modules: set[str]) -> dict[str, list[tuple[str, bool]]]:
    """{third-party top-level module: [(importing file, guarded), ...]} over ``start`` and every repository
    module it reaches."""
    found: dict[str, list[tuple[str, bool]]] = {}
    seen, todo = set(), list(start)
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        visitor = Imports(path)
        visitor.visit(ast.parse(path.read_text(), filename=str(path)))
        todo.extend(visitor.reached - seen)
        for name, guarded in visitor.external:
            needed = {name.split(".")[0]} | {module for prefix, module in NEEDS.items()
                                             if name == prefix or name.startswith(prefix + ".")}
            for module in needed - set(sys.stdlib_module_names) - comfyui_modules:
                found.setdefault(module, []).append((str(path.relative_to(ROOT)), guarded))
    return found


@functools.cache
def installed() -> dict[str, list[str]]:
    return packages_distributions()


def providers(module: str) -> set[str]:
    """The packages (normalised names) whose installed files hold top-level module ``module``."""
    return {normalise(distribution) for distribution in installed().get(module, [])}


@pytest.fixture(scope="module")
def comfyui_modules() -> set[str]:
    """ComfyUI's own top-level modules, and the packages its requirements install that requirements.txt leaves to it."""
    comfyui = run.find_comfyui()
    if comfyui is None:
        pytest.skip("no ComfyUI found: set COMFYUI_PATH (its top-level modules are what the nodes may import)")
    comfyui_requirements = {normalise(re.match(r"[A-Za-z0-9._-]*", line).group())
                            for line in (comfyui / "requirements.txt").read_text().splitlines()}
    assert FROM_COMFYUI_REQUIREMENTS <= comfyui_requirements
    own = {path.stem if path.suffix == ".py" else path.name for path in comfyui.iterdir()
           if path.suffix == ".py" or (path.is_dir() and not path.name.startswith("."))}
    return own | FROM_COMFYUI_REQUIREMENTS


def uncovered(found: dict, requirements: set[str]) -> dict[str, list[str]]:
    """Modules that no listed package provides, with the files that import them (optional ones left out)."""
    return {module: sorted({file for file, _ in places}) for module, places in found.items()
            if module not in OPTIONAL and not providers(module) & requirements}


@pytest.mark.comfyui
def test_requirements_txt_is_what_the_nodes_import(comfyui_modules):
    found = imports_reached(node_modules(), comfyui_modules)
    assert {"cv2", "mediapipe", "insightface", "safetensors"} <= set(found)  # lazy and eager imports both seen
    requirements = listed("requirements.txt")
    assert uncovered(found, requirements) == {}, "imported by the nodes but not provided by requirements.txt"
    unused = {package for package in requirements if not any(package in providers(module) for module in found)}
    assert unused == set(), "listed in requirements.txt, which ComfyUI installs, but no node imports them"


@pytest.mark.comfyui
def test_training_imports_are_covered_by_both_requirement_files(comfyui_modules):
    found = imports_reached(training_modules(), comfyui_modules)
    assert {"accelerate", "tensorboard", "torch_fidelity", "lpips"} <= set(found)
    nodes, training = listed("requirements.txt"), listed("requirements-training.txt")
    assert uncovered(found, nodes | training) == {}, "imported by training/ but in neither requirements file"
    assert nodes & training == set(), "listed in both files"
    unused = {package for package in training if not any(package in providers(module) for module in found)}
    assert unused == set(), "listed in requirements-training.txt but training/ imports none of their modules"
    for module in OPTIONAL.keys() & found.keys():
        assert all(guarded for _, guarded in found[module]), \
            f"{module} ({OPTIONAL[module]}) is optional, so it is imported only under `except ImportError`: {found[module]}"


def requirement_lines(requirements: str) -> list[str]:
    lines = (line.strip() for line in (ROOT / requirements).read_text().splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def test_pyproject_lists_the_two_requirement_files():
    """pyproject's dependencies are requirements.txt and its "training" extra requirements-training.txt, line for
    line, so an install from the project metadata (the ComfyUI registry, pip) gets what the files say."""
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["dependencies"] == requirement_lines("requirements.txt")
    assert project["optional-dependencies"]["training"] == requirement_lines("requirements-training.txt")


def dependency_closure(packages) -> set[str]:
    """The installed packages ``packages`` need, themselves included (normalised names; markers and extras as
    declared, evaluated for this Python)."""
    from importlib.metadata import PackageNotFoundError, requires

    from packaging.requirements import Requirement

    seen, todo = set(), [(name, ()) for name in packages]
    while todo:
        name, extras = todo.pop()
        if (key := normalise(name)) in seen:
            continue
        seen.add(key)
        try:
            declared = requires(name) or []
        except PackageNotFoundError:
            continue
        for line in declared:
            requirement = Requirement(line)
            if requirement.marker is None or any(requirement.marker.evaluate({"extra": e}) for e in ("", *extras)):
                todo.append((requirement.name, tuple(requirement.extras)))
    return seen


def test_facetorch_file_is_complete_without_dependencies():
    """``pip install --no-deps -r requirements-facetorch.txt`` (what .ci/run and the README do) leaves nothing out:
    every module facetorch imports, and every dependency its listed packages declare, is listed there or comes with
    requirements.txt, requirements-training.txt or ComfyUI's torch, torchvision and numpy. facetorch's own
    declarations are left aside only where they are no import: its torch<2.4 (it runs on ours), pip and
    googleapis-common-protos."""
    import facetorch

    facetorch_file = listed("requirements-facetorch.txt")
    assert "facetorch==0.6.2" in requirement_lines("requirements-facetorch.txt")
    others = dependency_closure([*listed("requirements.txt"), *listed("requirements-training.txt"),
                                 *FROM_COMFYUI_REQUIREMENTS])
    available = others | facetorch_file
    imported = set()
    for path in Path(facetorch.__file__).parent.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                imported.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                imported.add(node.module.split(".")[0])
    imported -= set(sys.stdlib_module_names) | {"facetorch"}
    assert {"hydra", "gdown", "codetiming", "timm"} <= imported
    assert {module for module in imported if not providers(module) & available} == set(), \
        "facetorch imports these, but nothing installed with --no-deps -r requirements-facetorch.txt provides them"
    assert not {"google", "pip"} & imported  # why its googleapis-common-protos and pip need not be listed
    from importlib.metadata import requires

    from packaging.requirements import Requirement

    declared = [Requirement(line) for line in requires("facetorch")]
    direct = [r.name for r in declared if normalise(r.name) not in {"torch", "pip", "googleapis-common-protos"}
              and (r.marker is None or r.marker.evaluate({"extra": ""}))]
    needed = dependency_closure([*direct, *(package for package in facetorch_file if package != "facetorch")])
    assert needed - available == set(), "needed by facetorch (its dependencies' dependencies included) but neither " \
                                         "listed in requirements-facetorch.txt nor installed by the other files"
    assert "facetorch" not in tomllib_project().get("optional-dependencies", {}), \
        "an extra would let pip resolve facetorch's torch<2.4 and replace torch"
    assert '--no-deps -r "$facetorch_requirements"' in (ROOT / ".ci" / "run").read_text()


def tomllib_project() -> dict:
    import tomllib

    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
