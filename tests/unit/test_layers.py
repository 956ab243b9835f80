"""The layers of worker/, read from the source with ``ast`` (imports inside functions
and under ``if TYPE_CHECKING:`` included): every import goes down the ranks below, no two
layers import each other, no module imports itself back (so every folder reads top-down),
and redis-py's exceptions are named in worker/store only (each layer's ``__init__``
docstring says what it owns and may import).

A case the code breaks today is listed in an allow-list below with its reason; an entry
that no longer occurs fails the test too, so the list shrinks as the code is fixed.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import redis.exceptions

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "worker"

# A layer is ``worker.<first part>``; it may import only layers of a lower rank (and any
# module of its own package). ``worker`` itself is worker/__init__.py, the public API: it
# re-exports errors and the producer, and the CLI reads its ``__version__``.
RANKS = {
    "errors": 0,
    "settings": 1,
    "store": 2,
    "observability": 3,
    "producer": 4,
    "worker": 5,
    "delivery": 6,
    "intake": 6,  # same rank as delivery: neither may import the other
    "testing": 7,
    "cli": 8,
    "__main__": 9,  # python -m worker
}

# (importing module, imported module) -> why it is allowed for now. Empty: every import
# goes down the ranks.
ALLOWED_UPWARD: dict[tuple[str, str], str] = {}

# (layer, the redis-py exception it names) -> why it is allowed for now. Each of these
# lets a redis-py error through the store layer, which should hand on only StoreError or
# ConfigError (worker/store/__init__.py). Keyed by layer, not module, so that moving code
# within a package does not touch this list.
ALLOWED_REDIS_ERRORS: dict[tuple[str, str], str] = {
    ("worker.producer", "redis.RedisError"): (
        "Producer's retry loop catches redis-py errors and translates them itself "
        "instead of receiving StoreError from worker.store"
    ),
    ("worker.observability", "redis.RedisError"): (
        "the metrics' scrape-time collector catches redis-py errors around stats.snapshot"
    ),
    ("worker.intake", "redis.RedisError"): (
        "the intake's enqueue and /health catch redis-py errors from its asyncio client"
    ),
    ("worker.cli", "redis.RedisError"): (
        "the CLI's error mapping catches and translates redis-py errors (and stats --watch)"
    ),
    ("worker.testing", "redis.ConnectionError"): (
        "RedisProcess polls a bare redis-server it started until it answers PING"
    ),
    ("worker.testing", "redis.BusyLoadingError"): (
        "RedisProcess polls a bare redis-server it started until it has loaded its AOF"
    ),
    ("worker.testing", "redis.RedisError"): (
        "SentinelCluster asks bare Sentinels and nodes it started for their view, where "
        "any failure means 'not yet'"
    ),
}

REDIS_ERRORS = frozenset(
    name
    for name, value in vars(redis.exceptions).items()
    if isinstance(value, type) and issubclass(value, BaseException)
)


@dataclass(frozen=True)
class Module:
    name: str
    path: Path
    is_package: bool

    @property
    def layer(self) -> str:
        return layer_of(self.name)

    @property
    def tree(self) -> ast.Module:
        return ast.parse(self.path.read_text(), str(self.path))


@dataclass(frozen=True)
class Import:
    source: str
    target: str
    line: int


def layer_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


@cache
def modules() -> dict[str, Module]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        is_package = parts[-1] == "__init__"
        name = ".".join(parts[:-1] if is_package else parts)
        found[name] = Module(name, path, is_package)
    return found


class _ImportCollector(ast.NodeVisitor):
    """Every import of a worker module in one module, wherever it is: at module level,
    inside a function (run when called) or under ``if TYPE_CHECKING:`` (never run). All
    count: a deferred import is still a dependency for a reader, and a TYPE_CHECKING one is
    a real import away from a cycle. ``from x import y`` names the submodule ``x.y`` when
    there is one, else ``x``; a relative import is resolved. The parent packages Python runs
    first (worker/store/__init__.py for ``worker.store.calls``) are not counted: that is
    the import system's order, not the module's dependency."""

    def __init__(self, module: Module) -> None:
        self.module = module
        self.imports: list[Import] = []

    def _add(self, target: str, node: ast.stmt) -> None:
        if target == "worker" or target.startswith("worker."):
            self.imports.append(Import(self.module.name, target, node.lineno))

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self._add(alias.name, node)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        base = node.module or ""
        if node.level:
            package = self.module.name.split(".")
            if not self.module.is_package:
                package = package[:-1]
            package = package[: len(package) - (node.level - 1)]
            base = ".".join([*package, *([base] if base else [])])
        for alias in node.names:
            submodule = f"{base}.{alias.name}"
            self._add(submodule if submodule in modules() else base, node)


@cache
def imports() -> tuple[Import, ...]:
    found: list[Import] = []
    for module in modules().values():
        collector = _ImportCollector(module)
        collector.visit(module.tree)
        found += collector.imports
    return tuple(found)


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """The cycles of ``graph``: its strongly connected components of more than one node
    (or a node with an edge to itself), each sorted (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in sorted(graph.get(node, ())):
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1 or node in graph.get(node, ()):
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(components)


def test_every_module_is_in_a_ranked_layer() -> None:
    """A new subpackage or top-level module of worker/ is given its rank here first."""
    assert set() == {m.layer for m in modules().values()} - set(RANKS)
    assert set() == set(RANKS) - {m.layer for m in modules().values()}


def test_imports_go_down_the_layers() -> None:
    """Every import of a worker module from another layer names a lower rank; delivery and
    intake (one rank) never import each other; within one package anything goes."""
    found: dict[tuple[str, str], list[int]] = {}
    for imp in imports():
        source, target = layer_of(imp.source), layer_of(imp.target)
        if source != target and RANKS[target] >= RANKS[source]:
            found.setdefault((imp.source, imp.target), []).append(imp.line)
    unexpected = {pair: lines for pair, lines in found.items() if pair not in ALLOWED_UPWARD}
    assert {} == unexpected, "imports up (or across) the layers: (module, imported): lines"
    assert set() == set(ALLOWED_UPWARD) - set(found), "allowed, but no longer imported"


def test_no_cycles_between_layers() -> None:
    """No two layers import each other, even through others or inside functions."""
    graph: dict[str, set[str]] = {}
    for imp in imports():
        source, target = layer_of(imp.source), layer_of(imp.target)
        if source != target:
            graph.setdefault(source, set()).add(target)
    assert [] == strongly_connected(graph)


def folder_of(module: str) -> str:
    """The folder a module's file is in, as a package: ``worker.store`` for
    worker/store/calls.py and worker/store/__init__.py, ``worker`` for worker/errors.py."""
    found = modules().get(module)
    return module if found is not None and found.is_package else module.rpartition(".")[0]


def module_graph() -> dict[str, dict[str, int]]:
    """importing module -> imported module -> the line of its first such import, for every
    import of one worker module by another (see :class:`_ImportCollector`)."""
    graph: dict[str, dict[str, int]] = {}
    for imp in imports():
        if imp.target != imp.source:
            targets = graph.setdefault(imp.source, {})
            targets[imp.target] = min(imp.line, targets.get(imp.target, imp.line))
    return graph


def cycles(graph: dict[str, dict[str, int]]) -> list[str]:
    """One cycle of each strongly connected component of ``graph``, shortest from the
    component's first module, as ``a:line -> b:line -> a`` (the line where each imports
    the next)."""
    found = []
    for component in strongly_connected({s: set(t) for s, t in graph.items()}):
        members, start = set(component), component[0]
        previous: dict[str, str] = {}
        frontier, seen = [start], {start}
        while start not in previous and frontier:  # breadth first, back to start
            step = []
            for node in frontier:
                for succ in sorted(graph.get(node, {})):
                    if succ in members and (succ == start or succ not in seen):
                        previous.setdefault(succ, node)
                        seen.add(succ)
                        step.append(succ)
            frontier = step
        back, node = [], previous[start]
        while node != start:
            back.append(node)
            node = previous[node]
        path = [start, *reversed(back)]  # start, ..., the module that imports start
        hops = [f"{a}:{graph[a][b]}" for a, b in zip(path, [*path[1:], start], strict=True)]
        rest = sorted(members - set(path))  # in the same tangle, off this cycle
        found.append(" -> ".join([*hops, start]) + (f" (also: {', '.join(rest)})" if rest else ""))
    return found


def test_no_cycles_inside_a_folder() -> None:
    """Every folder reads top-down: no module imports itself back through the other
    modules of its folder, not even by an import inside a function or under
    ``if TYPE_CHECKING:`` (what both sides need goes to a module of its own, or is passed
    in)."""
    graph = {
        source: {t: line for t, line in targets.items() if folder_of(t) == folder_of(source)}
        for source, targets in module_graph().items()
    }
    found = cycles(graph)
    assert [] == found, "modules of one folder that import each other:\n" + "\n".join(found)


def test_no_cycles_between_modules() -> None:
    """Nor does any module of worker/ import itself back through other folders (imports
    inside functions and under ``if TYPE_CHECKING:`` included)."""
    found = cycles(module_graph())
    assert [] == found, "modules that import each other:\n" + "\n".join(found)


def _redis_error_names(tree: ast.Module) -> Iterator[tuple[str, int, str]]:
    """(redis-py exception, line, where) for every time ``tree`` names one: imported from
    redis or redis.exceptions, or read as an attribute of a redis module (in an
    ``except`` clause, an ``isinstance`` check, an annotation or anywhere else)."""
    aliases = {"redis"}  # local names bound to redis, redis.asyncio, redis.exceptions...
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == "redis.exceptions":
                    yield "redis.exceptions", node.lineno, "import"
                if alias.name.split(".")[0] == "redis" and alias.asname:
                    aliases.add(alias.asname)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "redis":
            for alias in node.names:
                if alias.name == "exceptions":
                    aliases.add(alias.asname or alias.name)
                    yield "redis.exceptions", node.lineno, "import"
                elif alias.name in REDIS_ERRORS:
                    yield f"redis.{alias.name}", node.lineno, "import"
    contexts: dict[int, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ExceptHandler) and node.type is not None:
            for inner in ast.walk(node.type):
                contexts.setdefault(id(inner), "except")
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id in ("isinstance", "issubclass")
        ):
            for inner in ast.walk(node):
                contexts.setdefault(id(inner), node.func.id)
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and node.attr in REDIS_ERRORS
            and (
                (isinstance(node.value, ast.Name) and node.value.id in aliases)
                or (isinstance(node.value, ast.Attribute) and node.value.attr == "exceptions")
            )
        ):
            yield f"redis.{node.attr}", node.lineno, contexts.get(id(node), "other")


def test_redis_errors_are_named_only_in_the_store() -> None:
    """Above worker/store no module imports redis.exceptions or names a redis-py
    exception (``except redis.RedisError``, ``isinstance(exc, redis.ConnectionError)``):
    the store hands on StoreError or ConfigError, never redis-py's own errors."""
    found: dict[tuple[str, str], list[str]] = {}
    for module in modules().values():
        if RANKS[module.layer] > RANKS["store"]:
            layer = module.name if module.layer == "worker" else f"worker.{module.layer}"
            for name, line, where in _redis_error_names(module.tree):
                found.setdefault((layer, name), []).append(f"{module.name}:{line} ({where})")
    unexpected = {key: at for key, at in found.items() if key not in ALLOWED_REDIS_ERRORS}
    assert {} == unexpected, "redis-py exceptions above the store: (layer, name): where"
    assert set() == set(ALLOWED_REDIS_ERRORS) - set(found), "allowed, but no longer named"


def _may_import(docstring: str, layer: str) -> set[str] | None:
    """The layers a package's docstring says it may import (``May import: ...``), or None
    when it says nothing."""
    match = re.search(r"May import:(.*?)(?:\bNever\b|\bNothing\b|\n\n|$)", docstring, re.S)
    if match is None:
        return None
    text = " ".join(match.group(1).split())
    if below := re.match(r"every layer below the (\w+)", text, re.I):
        top = RANKS[below.group(1).lower()]
        return {name for name, rank in RANKS.items() if rank < top and name != layer}
    if text.lower().startswith("every layer"):
        return {name for name, rank in RANKS.items() if rank < RANKS[layer]}
    return {layer_of(name) for name in re.findall(r"``(worker(?:\.\w+)*)``", text)}


def test_each_layer_imports_only_what_its_docstring_allows() -> None:
    """The ``May import:`` line of each layer's ``__init__`` docstring is kept true: it
    names only lower layers, and the layer's modules import nothing else."""
    checked = []
    for module in modules().values():
        if not module.is_package or module.name == "worker":
            continue
        allowed = _may_import(ast.get_docstring(module.tree) or "", module.layer)
        if allowed is None:
            continue
        checked.append(module.layer)
        assert set() == {name for name in allowed if RANKS[name] >= RANKS[module.layer]}
        beyond = sorted(
            f"{imp.source}:{imp.line} imports {imp.target}"
            for imp in imports()
            if layer_of(imp.source) == module.layer
            and layer_of(imp.target) not in {module.layer, *allowed}
            and (imp.source, imp.target) not in ALLOWED_UPWARD
        )
        assert [] == beyond, f"worker/{module.layer}/__init__.py: May import: {sorted(allowed)}"
    assert {"settings", "store", "observability", "delivery", "intake"} <= set(checked)
