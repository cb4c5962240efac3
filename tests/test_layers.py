"""The structure drawn from the code's own imports: layers point one way, no circles, and only the
command line reaches from ``bench`` into ``exporters``."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# Bottom to top; a module may import modules of its own layer or below, never above.
LAYERS = [
    ["bench", "bench.log", "bench.registry", "bench.files", "bench.config"],  # config and files
    [
        "bench.metrics",
        "bench.postprocess",
        "bench.instances",
        "bench.losses",
        "bench.optim",
        "bench.augment",
        "bench.inference",
        "bench.plots",
        "bench.pareto",
        "bench.seg_figures",
        "bench.stats",
        "bench.models",
        "bench.models.classification",
        "bench.models.segmentation",
    ],  # pieces
    ["bench.factories"],  # config sections -> objects
    [
        "bench.tasks",
        "bench.tasks.base",
        "bench.tasks.mnist",
        "bench.tasks.warwick",
        "bench.tasks.folders",
        "bench.tasks.image_folder",
        "bench.tasks.mask_folder",
    ],  # data and metrics per task
    ["bench.spec"],  # specs resolved into validated configs
    ["bench.train", "bench.reference"],  # the training loop (and the textbook loop it is timed against)
    [
        "bench.records",
        "bench.ensemble",
        "bench.store",
        "bench.derived",
        "bench.storage",
        "bench.tracking",
    ],  # records, seed ensembles, run store, runs from others' weights, machines DB, MLflow
    ["bench.grid"],  # who trains which run: kernel locks, or a study in that database
    ["bench.runner", "bench.tune", "bench.study_report", "bench.workers"],  # what trains the runs of a spec
    ["bench.tables"],  # the rows of the published tables, from stored runs
    ["bench.summary", "bench.perf", "bench.rescore", "bench.reproduce"],  # the published tables and speed measurements
    [
        "exporters",
        "exporters.runtime",
        "exporters.metadata",
        "exporters.images",
        "exporters.inputs",
        "exporters.parity",
        "exporters.export",
        "exporters.checkpoints",
        "exporters.benchmark",
        "exporters.report",
        "exporters.rungs",
        "exporters.predict",
        "exporters.tracking",
        "exporters.onnx",
    ],  # deployment
    ["bench.cli", "bench.__main__"],  # the command line
]
LAYER = {m: i for i, layer in enumerate(LAYERS) for m in layer}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def internal_imports(path: Path) -> list[tuple[str, int, bool]]:
    """(imported module, line, inside a function) for every import of a bench/exporters module."""
    tree = ast.parse(path.read_text())
    inside: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            inside |= {id(n) for n in ast.walk(node) if n is not node}
    out = []
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            # `from bench import files` imports the module bench.files; `from bench.x import y` imports bench.x
            names = [
                f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in LAYER else node.module for a in node.names
            ]
        for n in names:
            if n.split(".")[0] in ("bench", "exporters"):
                out.append((n, node.lineno, id(node) in inside))
    return out


def graph() -> dict[str, list[tuple[str, int, bool]]]:
    paths = sorted([*REPO.glob("bench/**/*.py"), *REPO.glob("exporters/**/*.py")])
    return {module_name(p): internal_imports(p) for p in paths}


def test_every_module_has_a_layer():
    assert set(graph()) == set(LAYER), "add new modules to LAYERS"


def test_layers_point_one_way():
    upward = [
        f"{m} (layer {LAYER[m]}) imports {n} (layer {LAYER[n]}) at line {line}"
        for m, imports in graph().items()
        for n, line, _ in imports
        if LAYER[n] > LAYER[m]
    ]
    assert not upward, "\n".join(upward)


def test_no_import_circles():
    g = {m: {n for n, _, _ in imports if n != m} for m, imports in graph().items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for n in sorted(g[m]):
            assert state.get(n) != 1, "import circle: " + " -> ".join([*path, m, n])
            if n not in state:
                visit(n, [*path, m])
        state[m] = 2

    for m in sorted(g):
        if m not in state:
            visit(m, [])


def test_only_the_command_line_reaches_into_exporters_and_imports_lazily():
    g = graph()
    into_exporters = [
        m for m, imports in g.items() if m.startswith("bench") for n, _, _ in imports if n.startswith("exporters")
    ]
    assert into_exporters == ["bench.cli"]
    # Imports inside functions dodge nothing: only the command line has them (its reason: --help and --version
    # answer without loading torch, and only `predict` loads onnxruntime).
    lazy = sorted({m for m, imports in g.items() for _, _, in_function in imports if in_function})
    assert lazy == ["bench.cli"], lazy
