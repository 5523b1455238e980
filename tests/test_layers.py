"""The package's structure, read from its source: every module imports only its own folder and the folders below it,
no import circle, no private name across modules, no module over 400 lines.

The layers, bottom to top (a module of layer i may import layers <= i; the same folder imports freely if acyclic):
root shared modules, kernels, ops, loss, reward, data, model, rollout, rl, eval, train, analysis, planning,
integrations, cli. The package root's `__init__` (the public API) is above them all: no module imports it.
"""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "dsrl_fast"
KERNELS = PACKAGE.parent / "kernels"  # shipped as dsrl_fast.kernels
LAYERS = ("<root>", "kernels", "ops", "loss", "reward", "data", "model", "rollout", "rl", "eval", "train",
          "analysis", "planning", "integrations", "cli")
MAX_LINES = 400


def _modules() -> dict[str, Path]:
    """Module name -> source file, for dsrl_fast and its kernels."""
    found = {}
    for base, prefix in ((PACKAGE, "dsrl_fast"), (KERNELS, "dsrl_fast.kernels")):
        for path in base.rglob("*.py"):
            if "kernels" in path.relative_to(base).parts and base == PACKAGE:
                continue  # a dsrl_fast/kernels link to the repository's kernels/ (some checkouts have one)
            parts = path.relative_to(base).with_suffix("").parts
            name = ".".join((prefix, *parts))
            found[name.removesuffix(".__init__")] = path
    return found


MODULES = _modules()


def _imports(name: str, path: Path) -> list[tuple[str, list[str]]]:
    """(imported dsrl_fast module, names taken from it) for every import in the file, function-level ones too."""
    out = []
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(alias.name, []) for alias in node.names if alias.name.startswith("dsrl_fast")]
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([module] if module else []))
            if not module.startswith("dsrl_fast"):
                continue
            for alias in node.names:
                submodule = f"{module}.{alias.name}"
                out.append((submodule, []) if submodule in MODULES else (module, [alias.name]))
    return out


def _owner(module: str) -> str:
    """The nearest module of the package that `module` names (an attribute path resolves to its module)."""
    while module not in MODULES and "." in module:
        module = module.rpartition(".")[0]
    return module


def _layer(module: str) -> int:
    parts = module.split(".")
    if len(parts) == 1:
        return len(LAYERS)  # the public API facade
    folder = parts[1] if (PACKAGE / parts[1]).is_dir() or parts[1] == "kernels" else "<root>"
    return LAYERS.index(folder)


EDGES = {name: {(_owner(m), tuple(names)) for m, names in _imports(name, path)} for name, path in MODULES.items()}


def test_every_folder_has_a_layer() -> None:
    folders = {p.name for p in PACKAGE.iterdir() if p.is_dir() and p.name not in {"__pycache__"}} | {"kernels"}
    assert folders - {"presets"} <= set(LAYERS), f"folders without a layer: {sorted(folders - set(LAYERS))}"


def test_no_import_runs_up_a_layer() -> None:
    up = sorted(f"{m} (layer {LAYERS[_layer(m)] if _layer(m) < len(LAYERS) else 'api'}) imports {t}"
                for m, targets in EDGES.items() for t, _ in targets
                if t != m and _layer(t) > _layer(m) and m != "dsrl_fast")
    assert not up, "\n".join(up)


def test_no_import_circle() -> None:
    graph = {m: {t for t, _ in targets if t != m and t in MODULES} for m, targets in EDGES.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (circle := visit(nxt)):
                return circle
        stack.pop()
        state[node] = 2
        return None

    for module in sorted(graph):
        if module not in state and (circle := visit(module)):
            pytest.fail("import circle: " + " -> ".join(circle))


def test_no_private_name_crosses_a_module() -> None:
    private = sorted(f"{m} takes {n} from {t}" for m, targets in EDGES.items() for t, names in targets
                     for n in names if t != m and n.startswith("_") and not n.startswith("__"))
    assert not private, "\n".join(private)


def test_no_module_is_over_the_size_limit() -> None:
    sizes = {m: len(p.read_text().splitlines()) for m, p in MODULES.items()}
    large = sorted(f"{m}: {n} lines" for m, n in sizes.items() if n > MAX_LINES)
    assert not large, "\n".join(large)


def test_the_package_holds_only_modules_and_presets() -> None:
    """No merge leftovers (*.orig, *.rej) or other stray files ship inside the package."""
    import subprocess

    tracked = subprocess.run(["git", "ls-files", "dsrl_fast", "kernels"], cwd=PACKAGE.parent, capture_output=True,
                             text=True, check=False).stdout.split()
    if not tracked:
        pytest.skip("not a git checkout (an sdist or an installed copy): nothing to compare")
    stray = [f for f in tracked if not f.endswith(".py") and not f.startswith("dsrl_fast/train/presets/")]
    assert not stray, stray


def test_the_checker_sees_a_planted_violation(tmp_path: Path) -> None:
    """The parser resolves relative, function-level and attribute imports (else the tests above pass vacuously)."""
    source = tmp_path / "probe.py"
    source.write_text("def f():\n    from ..train.trainer import train\n    from dsrl_fast.loss import policy_loss\n"
                      "    import dsrl_fast.cli.app\n")
    found = {_owner(m) for m, _ in _imports("dsrl_fast.ops.probe", source)}
    assert found == {"dsrl_fast.train.trainer", "dsrl_fast.loss.policy_loss", "dsrl_fast.cli.app"}
    assert _layer("dsrl_fast.train.trainer") > _layer("dsrl_fast.ops.gemm")
