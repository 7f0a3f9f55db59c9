"""The package's layers (docs/design.md, "Layers"): a module imports only from its own layer or
the layers below it, and at module level. An import of the package inside a function is how a
cycle hides; the one allowed is the package's lazy `transformer_mt.Translator`."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "transformer_mt"

# Lowest first. A module belongs to the layer of its first path part under the package.
LAYERS = (
    ("errors", "config", "files", "devices", "metrics", "plots"),  # foundations
    ("data",),  # corpora, tokenizers, vocabularies, batches
    ("model",),  # the networks
    ("checkpoint",),  # the file format of a trained model
    ("inference",),  # search, Translator, export
    ("train",),  # the training job
    ("cli", "configs", "serve"),  # entry points, their Hydra configs, the HTTP server
)
LAZY_ALLOWED = {"__init__.py"}  # `from transformer_mt import Translator` without importing torch


def layer_of(module: str) -> int:
    """Layer index of a dotted name under the package ("data.vocab" → 1)."""
    head = module.split(".")[0]
    for index, names in enumerate(LAYERS):
        if head in names:
            return index
    raise AssertionError(f"transformer_mt.{module} is in no layer: add it to LAYERS")


def package_imports(tree: ast.AST) -> list[tuple[ast.stmt, str, bool]]:
    """(node, imported module under the package, whether inside a function) of every import."""
    found = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inside = in_function or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef)
            if isinstance(child, ast.ImportFrom) and child.module:
                if child.module == "transformer_mt":
                    found.extend((child, alias.name, inside) for alias in child.names)
                elif child.module.startswith("transformer_mt."):
                    found.append((child, child.module.removeprefix("transformer_mt."), inside))
            elif isinstance(child, ast.Import):
                for alias in child.names:
                    if alias.name.startswith("transformer_mt."):
                        found.append((child, alias.name.removeprefix("transformer_mt."), inside))
            visit(child, inside)

    visit(tree, False)
    return found


MODULES = sorted(path for path in PACKAGE.rglob("*.py") if "__pycache__" not in path.parts)


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_a_module_imports_only_from_its_layer_or_below_and_at_module_level(path):
    relative = path.relative_to(PACKAGE)
    tree = ast.parse(path.read_text(), filename=str(path))
    if relative.parts == ("__init__.py",):
        own = len(LAYERS)  # the package's face may lazily offer anything
    else:
        own = layer_of(".".join(relative.with_suffix("").parts))
    for node, module, in_function in package_imports(tree):
        where = f"{relative}:{node.lineno} imports transformer_mt.{module}"
        assert not in_function or str(relative) in LAZY_ALLOWED, f"{where} inside a function"
        assert layer_of(module) <= own, f"{where}, a layer above its own"


def test_the_checker_sees_an_upward_and_a_hidden_import():
    """The rule above can fail: a model module importing the trainer inside a function."""
    source = "def f():\n    from transformer_mt.train.trainer import Trainer\n"
    ((node, module, in_function),) = package_imports(ast.parse(source))
    assert (module, in_function) == ("train.trainer", True)
    assert layer_of(module) > layer_of("model.layers")
