"""The rooms of executor/ import one another one way: no circle, and the engine's rooms never reach Jina."""

import ast
from pathlib import Path

EXECUTOR = Path(__file__).resolve().parents[2] / "executor"
# The engine and everything it stands on: no Jina, no docarray, no web server.
ENGINE_ROOMS = {"engine", "errors", "validation", "sampling", "sequence", "scheduler", "kv_manager", "kv_cache", "kv_pool",
                "model_runner", "output", "detok", "grammar", "tools", "model", "gguf_model", "speculation",
                "quantize", "int4", "attention", "token_packing", "step_threads"}


def imports() -> dict:
    """module -> (modules of executor/ it imports, top-level packages it imports), wherever the import is."""
    graph = {}
    for path in EXECUTOR.glob("*.py"):
        ours, packages = set(), set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                ours.update([node.module] if node.module else [alias.name for alias in node.names])
            elif isinstance(node, ast.ImportFrom) and node.module:
                packages.add(node.module.split(".")[0])
                if node.module.startswith("executor."):
                    ours.add(node.module.split(".")[1])
            elif isinstance(node, ast.Import):
                packages.update(alias.name.split(".")[0] for alias in node.names)
        graph[path.stem] = ({m.split(".")[0] for m in ours} - {path.stem}, packages)
    return graph


def test_no_import_circle_in_executor():
    graph = {module: ours for module, (ours, _) in imports().items()}
    state = {}

    def visit(module, path):
        if state.get(module) == "done":
            return
        assert state.get(module) != "open", f"import circle: {' -> '.join(path + [module])}"
        state[module] = "open"
        for imported in sorted(graph.get(module, ())):
            visit(imported, path + [module])
        state[module] = "done"

    for module in sorted(graph):
        visit(module, [])


def test_the_engine_rooms_import_no_jina_and_no_adapter():
    graph = imports()
    assert ENGINE_ROOMS <= graph.keys(), ENGINE_ROOMS - graph.keys()
    for module in ENGINE_ROOMS:
        ours, packages = graph[module]
        assert not packages & {"jina", "docarray", "schemas", "fastapi", "aiohttp"}, (module, packages)
        assert ours <= ENGINE_ROOMS, (module, ours - ENGINE_ROOMS)


def test_each_room_opens_with_what_its_one_job_is():
    for module in ENGINE_ROOMS:
        docstring = ast.get_docstring(ast.parse((EXECUTOR / f"{module}.py").read_text()))
        assert docstring and len(docstring) > 80, module
