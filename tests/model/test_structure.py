"""The layers of docs/ARCHITECTURE.md, checked: imports flow one way, and the model's algorithm modules hold no speed
code (that lives in model/cpu_speedups.py)."""

import ast
from pathlib import Path

import maskrcnn

SRC = Path(maskrcnn.__file__).parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> dict[str, set[str]]:
    """Package module -> the package modules it imports anywhere in its file (also inside functions)."""
    modules = {_module_name(path): path for path in SRC.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        imported = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative import
                    base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
                imported.add(base)
                imported.update(f"{base}.{alias.name}" for alias in node.names)
        graph[name] = {m for m in imported if m in modules and m != name}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 on the current path, 2 done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_import_cycle_in_the_package():
    graph = _imports()
    # a package's __init__ re-exporting its modules is not a cycle of the modules themselves
    graph = {name: {m for m in deps if not name.startswith(m + ".")} for name, deps in graph.items()}
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))


def test_only_build_and_pretrained_read_the_config_in_model():
    allowed = {"maskrcnn.model.build", "maskrcnn.model.pretrained"}
    for name, deps in _imports().items():
        if name.startswith("maskrcnn.model") and name not in allowed:
            assert "maskrcnn.config" not in deps, name
            assert not any(dep.startswith("maskrcnn.data") for dep in deps), name


def test_algorithm_modules_hold_no_speed_code():
    for module in ("box_head", "mask_head", "rpn", "maskrcnn", "poolers"):
        text = (SRC / "model" / f"{module}.py").read_text()
        for marker in ("ThreadPoolExecutor", "channels_last", "torch.ops.", "_conv_forward", "_version",
                       "_pre_nms_top_n", "def train("):
            assert marker not in text, f"{module}.py: {marker}"


def _imports_of(prefix: str) -> dict[str, set[str]]:
    return {name: deps for name, deps in _imports().items() if name == prefix or name.startswith(prefix + ".")}


def test_layers_run_one_way():
    """cli -> app (the commands' use cases) -> engine / viz / export -> model, data -> config, structures. engine
    never imports viz or app; viz, export, model and data never import app or the command line."""
    def within(dep: str, *layers: str) -> bool:
        return any(dep == f"maskrcnn.{layer}" or dep.startswith(f"maskrcnn.{layer}.") for layer in layers)

    for name, deps in _imports_of("maskrcnn.engine").items():
        assert not [d for d in deps if within(d, "viz", "app", "cli")], name
    for layer in ("viz", "export", "model", "data"):
        for name, deps in _imports_of(f"maskrcnn.{layer}").items():
            assert not [d for d in deps if within(d, "app", "cli")], name
    for layer in ("model", "data"):
        for name, deps in _imports_of(f"maskrcnn.{layer}").items():
            assert not [d for d in deps if within(d, "engine", "viz", "export")], name


def test_the_command_line_calls_use_cases_only():
    allowed = ("maskrcnn.app", "maskrcnn.config", "maskrcnn.errors", "maskrcnn.logs", "maskrcnn.cli")
    deps = {d for name, found in _imports().items() if name == "maskrcnn.cli" or name.startswith("maskrcnn.cli_")
            for d in found}
    assert deps and all(d.startswith(allowed) for d in deps), sorted(deps)
