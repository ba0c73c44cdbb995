"""The package layers hold: every import, at module level or inside a function, goes from a
higher layer to a lower one (or stays in its package), so there is no cycle between packages.

Read from the source with ``ast``, not by importing, so an import that only runs inside a
function (where cycles hide) counts the same as one at the top of a file."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "strata"

# Bottom to top. A package may import from the layers before its own, never after; packages in
# one layer do not import each other.
LAYERS = [
    ["layout", "files"],
    ["config"],
    ["data"],
    ["cost", "nn"],
    ["models"],
    ["inference", "interop"],
    ["train"],
    ["evals"],
    ["experiments", "serve"],
    ["cli", "strata"],  # the command line; the root package's public API (build_model, ...)
    ["__main__"],
]
LAYER_OF = {package: index for index, layer in enumerate(LAYERS) for package in layer}


def package_of(module: str) -> str | None:
    """``strata.nn.ssd`` -> ``nn``; ``strata`` (the package's own ``__init__``) -> ``strata``."""
    parts = module.split(".")
    if parts[0] != "strata":
        return None
    return parts[1] if len(parts) > 1 else "strata"


def is_package(name: str) -> bool:
    return (PACKAGE / name / "__init__.py").exists() or (PACKAGE / f"{name}.py").exists()


def imports() -> list[tuple[str, str, str, int]]:
    """(importing package, imported package, file, line) for every import between packages."""
    found = []
    for file in sorted(PACKAGE.rglob("*.py")):
        relative = file.relative_to(PACKAGE.parent).with_suffix("")
        module = ".".join(part for part in relative.parts if part != "__init__")
        source = package_of(module)
        for node in ast.walk(ast.parse(file.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module == "strata":
                # ``from strata import cost`` imports a package, ``from strata import build_model`` the root.
                targets = [f"strata.{alias.name}" if is_package(alias.name) else "strata" for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                targets = [node.module]
            else:
                continue
            for target in targets:
                imported = package_of(target)
                if imported and imported != source:
                    found.append((source, imported, str(file.relative_to(PACKAGE.parent)), node.lineno))
    return found


def test_every_package_has_a_layer():
    packages = {p.stem if p.suffix == ".py" else p.name for p in PACKAGE.iterdir() if is_package(p.stem)}
    packages = {"strata" if name == "__init__" else name for name in packages}
    assert packages == set(LAYER_OF), f"packages without a layer: {sorted(packages - set(LAYER_OF))}"


def test_imports_only_go_down():
    upward = [f"{file}:{line}: {source} (layer {LAYER_OF[source]}) imports {imported} (layer {LAYER_OF[imported]})"
              for source, imported, file, line in imports() if LAYER_OF[imported] >= LAYER_OF[source]]
    assert not upward, "\n".join(upward)


def test_the_walk_sees_imports_inside_functions(tmp_path, monkeypatch):
    """The checker itself: an upward import hidden in a function body is found."""
    fake = tmp_path / "strata"
    (fake / "nn").mkdir(parents=True)
    (fake / "train").mkdir()
    (fake / "nn" / "__init__.py").write_text("")
    (fake / "train" / "__init__.py").write_text("")
    (fake / "nn" / "bad.py").write_text("def f():\n    from strata.train.trainer import Trainer\n")
    monkeypatch.setattr(__import__(__name__), "PACKAGE", fake)
    assert ("nn", "train", "strata/nn/bad.py", 2) in imports()
    with pytest.raises(AssertionError, match=r"strata/nn/bad\.py:2: nn \(layer 3\) imports train \(layer 6\)"):
        test_imports_only_go_down()
