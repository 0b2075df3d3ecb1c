"""The package's layering, function-local imports included: no cycles, no import upwards.

Layers, lowest first (a module imports only from its own layer or below; importing a module of
another package runs that package's `__init__` too, so that counts as an import of the package):

    tree, json_types, quant, config, targeting, activations, gguf_file, tokenizer
    -> ops -> adapter, method -> injection -> methods, peft_format -> sharding -> models
    -> train, checkpoint -> memory -> the `jpeft` facade, finetune -> cli

Imports under `if TYPE_CHECKING:` count too: a cycle for annotations is still a cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import jpeft

ROOT = Path(jpeft.__file__).parent
LAYERS = [
    (
        "jpeft.tree",
        "jpeft.json_types",
        "jpeft.quant",
        "jpeft.config",
        "jpeft.targeting",
        "jpeft.activations",
        "jpeft.gguf_file",
        "jpeft.tokenizer",
        "jpeft.task_arithmetic",
    ),
    ("jpeft.ops",),
    ("jpeft.adapter", "jpeft.method"),
    ("jpeft.injection",),
    (
        "jpeft.methods",
        "jpeft.peft_format",
        "jpeft.model_card",
        "jpeft.weighted_adapter",
        "jpeft.hotswap",
    ),
    ("jpeft.mixed",),
    ("jpeft.sharding",),
    ("jpeft.models", "jpeft.flax"),
    ("jpeft.train", "jpeft.checkpoint"),
    ("jpeft.memory",),
    ("jpeft.export",),
    ("jpeft", "jpeft.finetune", "jpeft.serve"),
    ("jpeft.cli",),
]


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> int:
    """The layer of the longest LAYERS entry that is `module` or a package above it."""
    best, depth = None, -1
    for index, names in enumerate(LAYERS):
        for name in names:
            if (module == name or module.startswith(name + ".")) and name.count(".") > depth:
                best, depth = index, name.count(".")
    assert best is not None, f"{module} is in no layer: add it to LAYERS in this test"
    return best


def imported_modules(path: Path, modules: set[str]) -> set[str]:
    """The jpeft modules `path` imports anywhere (functions and TYPE_CHECKING blocks included)."""
    package = module_name(path) if path.name == "__init__.py" else module_name(path.parent)
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1])
                base = f"{base}.{node.module}" if node.module else base
            for alias in node.names:  # a submodule, or a name defined in `base`
                submodule = f"{base}.{alias.name}"
                found.add(submodule if submodule in modules else base)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text()))
    return {name for name in found if name in modules}


def import_graph() -> dict[str, set[str]]:
    files = {module_name(path): path for path in ROOT.rglob("*.py")}
    return {name: imported_modules(path, set(files)) - {name} for name, path in files.items()}


def packages_run(importer: str, imported: str) -> set[str]:
    """The packages whose `__init__` importing `imported` runs, outside `importer`'s own."""
    parts = imported.split(".")
    return {
        ".".join(parts[:i])
        for i in range(2, len(parts))
        if not importer.startswith(".".join(parts[:i]))
    }


GRAPH = import_graph()


@pytest.mark.parametrize("module", sorted(GRAPH))
def test_imports_go_down_the_layers(module):
    upward = []
    for target in GRAPH[module]:
        for reached in {target} | packages_run(module, target):
            if layer_of(reached) > layer_of(module):
                upward.append(reached)
    assert not upward, f"{module} (layer {layer_of(module)}) imports from above: {sorted(upward)}"


def test_no_import_cycles():
    """Among modules (a package's `__init__` importing its own submodules is not a cycle)."""
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(module: str) -> None:
        state[module] = "open"
        stack.append(module)
        for target in sorted(GRAPH[module]):
            if module == "jpeft" or target.startswith(module + "."):
                continue
            if state.get(target) == "open":
                cycle = stack[stack.index(target) :] + [target]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if target not in state:
                visit(target)
        stack.pop()
        state[module] = "done"

    for module in sorted(GRAPH):
        if module not in state:
            visit(module)


def test_the_model_imports_no_sharding_package():
    model_imports = GRAPH["jpeft.models.llama"]
    assert not any(m.startswith("jpeft.sharding") for m in model_imports), model_imports
