"""The import rule each layer keeps (docs/architecture.md, "Layers"): imports point down only.

Read from the source with `ast` (nothing is imported), so a new module that reaches up fails
here with its file, line and the import that broke the rule. Imports under `TYPE_CHECKING`
count too: a type that lives in a higher layer is in the wrong place.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "aiaas"

# The value types and rules every layer shares; they import nothing above themselves.
FOUNDATION = {"errors", "ids", "settings", "domain", "specs", "__init__"}

# layer -> the layers it may import besides itself.
ALLOWED: dict[str, set[str]] = {
    "__init__": set(),
    "errors": set(),
    "ids": set(),
    "settings": {"errors"},
    "domain": {"errors", "ids"},
    "specs": {"errors", "ids", "domain"},
    "privacy": FOUNDATION,
    "scheduling": FOUNDATION,
    "storage": FOUNDATION,
    "data": FOUNDATION | {"privacy"},
    "training": FOUNDATION | {"data"},
    "engines": FOUNDATION | {"scheduling"},
    "edge": FOUNDATION,
    "observability": FOUNDATION | {"engines", "scheduling"},
    "protocol": FOUNDATION | {"data"},
    "services": FOUNDATION
    | {
        "storage",
        "engines",
        "training",
        "data",
        "scheduling",
        "privacy",
        "observability",
        "protocol",
        "edge",
    },
    "api": FOUNDATION | {"protocol", "services", "observability", "platform"},
    "console": FOUNDATION | {"api", "protocol", "services", "observability", "platform"},
}
# Job bodies use the services (a job registers its version through RegistryService), not the
# wire schemas.
ALLOWED["workers"] = (ALLOWED["services"] - {"protocol"}) | {"services"}
# The composition root and the entry points wire everything; they may import any layer.
ROOTS = {"app", "platform", "cli", "__main__"}


def _layer(path: Path) -> str:
    rel = path.relative_to(PACKAGE)
    return rel.parts[0].removesuffix(".py")


def _imports(tree: ast.AST) -> list[tuple[int, str]]:
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "aiaas":
                found.extend((node.lineno, alias.name) for alias in node.names)
            elif node.module.startswith("aiaas."):
                found.append((node.lineno, node.module.split(".")[1]))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("aiaas."):
                    found.append((node.lineno, alias.name.split(".")[1]))
    return found


def _violations() -> list[str]:
    broken: list[str] = []
    for path in sorted(PACKAGE.rglob("*.py")):
        layer = _layer(path)
        if layer in ROOTS:
            continue
        if layer not in ALLOWED:
            broken.append(f"{path.relative_to(PACKAGE)}: layer '{layer}' has no import rule")
            continue
        allowed = ALLOWED[layer] | {layer}
        for line, target in _imports(ast.parse(path.read_text(), str(path))):
            if target == "__version__":
                continue
            if target not in allowed:
                broken.append(f"{path.relative_to(PACKAGE)}:{line}: {layer} imports {target}")
    return broken


def test_every_layer_imports_only_the_layers_below_it() -> None:
    broken = _violations()
    assert not broken, "imports against the layers:\n" + "\n".join(broken)


@pytest.mark.parametrize(
    ("layer", "target"),
    [("engines", "services"), ("protocol", "services"), ("api", "engines"), ("specs", "training")],
)
def test_the_rule_refuses_an_upward_import(layer: str, target: str) -> None:
    assert target not in ALLOWED[layer]


def test_the_checker_sees_every_import_form() -> None:
    tree = ast.parse(
        "from aiaas.services.jobs import x\n"
        "import aiaas.engines.llm\n"
        "from aiaas import platform\n"
        "def f():\n    from aiaas.storage import db\n"
    )
    assert [t for _, t in _imports(tree)] == ["services", "engines", "platform", "storage"]
