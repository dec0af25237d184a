"""The package is a house by stage: every import points down, and nothing circles.

Each folder of t5x_like/ is one stage of a run, listed below from the ground floor
up. A module may import its own stage and the stages below it, never above, and the
module graph has no cycle, counting imports inside functions and under
TYPE_CHECKING too (a lazy import is a circle held apart, not removed).
"""

from __future__ import annotations

import ast
import pathlib

import t5x_like

# Ground floor first. The foundation is the four top-level modules every stage uses.
STAGES = ("foundation", "config", "models", "finetuning", "data", "parallel", "reporting", "hf",
          "checkpointing", "decoding", "evaluation", "training", "launch")
FOUNDATION = {"errors", "storage", "run_dir", "tree_paths"}
PACKAGE_ROOT = pathlib.Path(t5x_like.__file__).parent


def _module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(PACKAGE_ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _stage(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1 or parts[1] in FOUNDATION:
        return "foundation"
    return parts[1]


def _imports(path: pathlib.Path, modules: set[str]) -> set[str]:
    """Every t5x_like module `path` imports, wherever the import statement sits."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [f"{node.module}.{alias.name}" for alias in node.names] + [node.module]
        else:
            continue
        for name in names:
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name and name.startswith("t5x_like."):
                found.add(name)
    return found


def _graph() -> dict[str, set[str]]:
    # Links (configs/, data/vocab) lead outside the package; launch/ is a real folder.
    paths = [p for p in PACKAGE_ROOT.rglob("*.py")
             if not any(part in ("configs", "vocab") for part in p.parts)]
    modules = {_module_name(p) for p in paths}
    return {_module_name(p): _imports(p, modules) - {_module_name(p)} for p in paths}


def test_every_stage_is_a_known_folder():
    assert {_stage(m) for m in _graph()} <= set(STAGES)


def test_imports_point_down():
    upward = [f"{module} ({_stage(module)}) imports {target} ({_stage(target)})"
              for module, targets in _graph().items() for target in targets
              if STAGES.index(_stage(target)) > STAGES.index(_stage(module))]
    assert not upward, "\n".join(upward)


def test_no_module_cycles():
    graph = _graph()
    done, on_path, cycles = set(), [], []

    def visit(module):
        if module in on_path:
            cycles.append(" -> ".join(on_path[on_path.index(module):] + [module]))
            return
        if module in done:
            return
        on_path.append(module)
        for target in sorted(graph.get(module, ())):
            visit(target)
        on_path.pop()
        done.add(module)

    for module in sorted(graph):
        visit(module)
    assert not cycles, "\n".join(cycles)
