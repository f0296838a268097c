"""The package's layering, read from the source (AST): no import cycle, module-level or function-local; a module
never imports one of a higher layer; no module over 600 lines; function-local imports of smoe_lab's own modules
only where the rule allows them (see LAZY_OK and docs/layout.md)."""

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "smoe_lab"
MAX_LINES = 600

# Lowest first. A module may import modules of its own layer or lower ones, never a higher one. Names are module
# prefixes: "data" covers smoe_lab.data and everything under it; the longest matching prefix decides.
LAYERS: list[tuple[str, list[str]]] = [
    ("base", ["errors", "faults", "paths", "atomic", "config", "progress"]),
    ("moe", ["router_health", "moe_routing", "moe_experts", "moe", "expert_weights", "ds.moe"]),
    ("model", ["model", "hf"]),
    ("data", ["data", "cachekey"]),
    ("checkpoint", ["checkpoint", "ds.convert"]),
    ("train", ["loop", "train", "ds", "ds.engine", "router_warmup", "finetune_config"]),
    ("calibrate/reduce", ["calibrate", "reduce", "readouts"]),
    (
        "evaluate",
        [
            "evaluate",
            "protocol",
            "results",
            "profile",
            "inference.ep_profile",
            "inference.ep_worker",
            "inference.scaling",
            "inference",
        ],
    ),
    ("finetune", ["finetune"]),
    (
        "experiments/notebooks",
        [
            "experiments",
            "notebook_params",
            "plots",
            "clusters",
            "widgets",
            "readout_study",
            "router_sweep",
            "replication",
            "inference.figures",
            "inference.study",
            "pipeline",
        ],
    ),
    ("cli", ["cli", "__main__"]),
]

# Function-local imports of smoe_lab's own modules are allowed only for:
# - smoe_lab.ds.moe, which imports the optional deepspeed package when it is imported (model.py builds its layers
#   only for moe_impl: deepspeed, ds/convert.py only when converting to them);
# - the command line (the top layer: nothing imports it, so it cannot close a cycle): a command imports what it
#   runs, so that `smoe-lab --help` and an argument error answer at once instead of after importing the library.
LAZY_OK_TARGETS = ("smoe_lab.ds.moe",)
LAZY_OK_MODULES = ("smoe_lab.cli",)


def _modules() -> dict[str, Path]:
    out = {}
    for p in PKG.rglob("*.py"):
        parts = list(p.relative_to(PKG.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


MODULES = _modules()


def _imports(name: str, path: Path) -> list[tuple[str, bool, int]]:
    """(imported smoe_lab module, inside a function, line) for every import statement in the file."""
    tree = ast.parse(path.read_text())
    pkg = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    local = {
        id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef)) for n in ast.walk(f)
    }
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = ".".join(pkg[: len(pkg) - node.level + 1] + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        elif isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        else:
            continue
        for t in targets:
            while t not in MODULES and "." in t:
                t = t.rsplit(".", 1)[0]
            if t in MODULES and t != name and t.startswith("smoe_lab"):
                found.append((t, id(node) in local, node.lineno))
    return found


GRAPH = {m: _imports(m, p) for m, p in MODULES.items()}


def layer_of(module: str) -> int:
    rel = module.removeprefix("smoe_lab").lstrip(".")
    best, best_len = None, -1
    for i, (_, prefixes) in enumerate(LAYERS):
        for pre in prefixes:
            if (rel == pre or rel.startswith(pre + ".")) and len(pre) > best_len:
                best, best_len = i, len(pre)
    if best is None:
        raise AssertionError(f"{module} is in no layer of tests/test_layering.py's LAYERS: add it")
    return best


def _cycle() -> list[str] | None:
    """One import cycle (module-level and function-local imports together), or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for t, _, _ in GRAPH[m]:
            if state.get(t) == 1:
                return stack[stack.index(t) :] + [t]
            if t not in state and (c := visit(t)):
                return c
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(GRAPH):
        if m not in state and (c := visit(m)):
            return c
    return None


def test_the_layer_table_covers_every_module():
    for m in MODULES:
        if m != "smoe_lab":
            layer_of(m)


def test_no_import_cycle():
    cycle = _cycle()
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_a_module_never_imports_a_higher_layer():
    bad = []
    for m, imports in GRAPH.items():
        if m == "smoe_lab":
            continue
        for t, _, line in imports:
            if layer_of(t) > layer_of(m):
                bad.append(
                    f"{MODULES[m].relative_to(PKG.parent)}:{line}: {m} ({LAYERS[layer_of(m)][0]}) imports "
                    f"{t} ({LAYERS[layer_of(t)][0]})"
                )
    assert not bad, "\n".join(bad)


def test_function_local_imports_only_where_the_rule_allows():
    bad = [
        f"{MODULES[m].relative_to(PKG.parent)}:{line}: {t}"
        for m, imports in GRAPH.items()
        for t, inside, line in imports
        if inside and m not in LAZY_OK_MODULES and not t.startswith(LAZY_OK_TARGETS)
    ]
    assert not bad, "function-local imports of smoe_lab modules:\n" + "\n".join(bad)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_module_over_600_lines(module):
    n = len(MODULES[module].read_text().splitlines())
    assert n <= MAX_LINES, f"{MODULES[module].relative_to(PKG.parent)} has {n} lines (at most {MAX_LINES})"


def test_the_checker_sees_a_cycle_and_an_upward_import(monkeypatch):
    """The checks can fail: a planted edge model -> train closes no cycle but goes up; train -> loop -> train is
    a cycle."""
    planted = dict(GRAPH)
    planted["smoe_lab.loop"] = GRAPH["smoe_lab.loop"] + [("smoe_lab.train", True, 1)]
    monkeypatch.setitem(globals(), "GRAPH", planted)
    assert _cycle() is not None
    assert layer_of("smoe_lab.train") > layer_of("smoe_lab.model")
    with pytest.raises(AssertionError, match="in no layer"):
        layer_of("smoe_lab.nowhere")
