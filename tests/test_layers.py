"""The package's structure: no import cycle among shoal's modules (imports inside functions count), and
every import points inward: command line -> Ray -> front ends -> engine -> core and runner -> models -> kernels."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "shoal"
SHARED = {"shoal.errors", "shoal.config", "shoal.sampling_params", "shoal.outputs"}  # plain data, any layer
LAYERS = [  # innermost first; a module may import its own layer and the layers before it
    ("kernels", ("shoal.kernels",)),
    ("models", ("shoal.models",)),
    ("core and runner", ("shoal.core", "shoal.runner")),
    ("engine", ("shoal.engine",)),
    (
        "front ends",
        (
            "shoal.llm",
            "shoal.sessions",
            "shoal.executor",
            "shoal.batch_generation",
            "shoal.server",
            "shoal.cli_args",
        ),
    ),  # fmt: skip
    ("Ray", ("shoal.ray",)),  # replicas of the front ends
    ("command line", ("shoal.cli", "shoal.server.cli")),
    ("package", ("shoal",)),
]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imports_of(path: Path) -> set[str]:
    """Every shoal module this file imports, at the top or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        found |= {n for n in names if n in MODULES and n.startswith("shoal")}
    return found


GRAPH = {name: imports_of(path) for name, path in MODULES.items()}


def layer_of(module: str) -> int:
    matches = [(len(p), i) for i, (_, prefixes) in enumerate(LAYERS) for p in prefixes
               if module == p or module.startswith(p + ".")]  # fmt: skip
    return max(matches)[1]


def test_the_checks_see_real_imports():
    assert "shoal.engine.core" in GRAPH["shoal.engine.llm_engine"]
    assert "shoal.kernels.backend" in GRAPH["shoal.models.llama"]


def test_no_import_cycle():
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(GRAPH[module]):
            if state.get(target) == 1:
                pytest.fail("import cycle: " + " -> ".join(path[path.index(target) :] + [module, target]))
            if target not in state:
                visit(target, path + [module])
        state[module] = 2

    for module in sorted(GRAPH):
        if module not in state:
            visit(module, [])


def test_imports_point_inward():
    wrong = [
        f"{module} ({LAYERS[layer_of(module)][0]}) imports {target} ({LAYERS[layer_of(target)][0]})"
        for module, targets in GRAPH.items()
        if module not in SHARED
        for target in targets
        if target not in SHARED and layer_of(target) > layer_of(module)
    ]
    assert not wrong, "\n".join(wrong)


def test_shared_modules_import_only_each_other_and_kernels():
    for module in SHARED:
        outside = {t for t in GRAPH[module] if t not in SHARED and layer_of(t) > 0}
        assert not outside, (module, outside)


def test_the_server_depends_on_the_engine_client_protocol_and_async_llm_provides_it(tiny_llama):
    import asyncio

    from shoal.engine.async_llm import AsyncLLM
    from shoal.engine.protocol import EngineClient

    engine = AsyncLLM(tiny_llama, kv_cache_memory=4 << 20)
    try:
        assert isinstance(engine, EngineClient)
    finally:
        asyncio.run(engine.shutdown())
    assert all(
        "Any" not in line
        for line in (PACKAGE / "server" / "app.py").read_text().splitlines()
        if "engine:" in line
    )
