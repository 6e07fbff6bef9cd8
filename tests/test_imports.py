"""Layering: a module imports only from its own layer or a lower one; clients never import djinnd."""
import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parent.parent
LAYERS = [  # lowest first
    {"libdjinn.protocol", "libdjinn.paths", "djinnd.config", "djinnd.session", "djinnd.metrics"},
    {"djinnd.model", "djinnd.memory"},
    {"djinnd.engine"},
    {"djinnd.server"},
    {"djinnd.daemon", "djinnd.cli", "djinnd.__main__", "djinnd.preflight"},
]


def layer_of(module: str):
    for i, names in enumerate(LAYERS):
        if any(module == n or module.startswith(n + ".") for n in names):
            return i
    return None


def imports(path: pathlib.Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            yield node.module


def test_layers_are_respected():
    bad = []
    for path in list(ROOT.glob("djinnd/**/*.py")) + list(ROOT.glob("libdjinn/*.py")):
        module = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        for target in imports(path):
            if module.startswith("libdjinn") and target.startswith("djinnd"):
                bad.append(f"{module} -> {target} (clients never import the daemon)")
            mine, theirs = layer_of(module), layer_of(target)
            if mine is not None and theirs is not None and theirs > mine:
                bad.append(f"{module} -> {target}")
            if {module.split(".")[1:2][0] if "." in module else "", target.split(".")[1:2][0] if "." in target else ""} == {"model", "memory"}:
                bad.append(f"{module} -> {target} (model and memory never import each other)")
    assert not bad, bad
