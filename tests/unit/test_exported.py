"""The public API is what ``worker.__all__`` says (like httpx's test_exported_members):
every name in it is importable from ``worker``, and every public name ``worker/__init__.py``
binds is in it."""

from __future__ import annotations

import ast
from pathlib import Path

import worker

INIT = Path(worker.__file__)


def _bound_in_init() -> set[str]:
    """Names ``worker/__init__.py`` binds at module level (imports, assignments, defs),
    except the ``annotations`` of ``from __future__ import annotations``."""
    names: set[str] = set()
    for node in ast.parse(INIT.read_text()).body:
        if isinstance(node, ast.ImportFrom) and node.module == "__future__":
            continue
        if isinstance(node, ast.Import | ast.ImportFrom):
            names |= {(a.asname or a.name).split(".")[0] for a in node.names}
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Assign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names |= {n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)}
    return names


def test_every_name_in_all_is_importable_from_worker() -> None:
    """``from worker import X`` works for each X in ``__all__``, once each, and
    ``from worker import *`` gives exactly those names."""
    assert len(set(worker.__all__)) == len(worker.__all__), "a name is listed twice"
    assert [] == [name for name in worker.__all__ if not hasattr(worker, name)]
    namespace: dict[str, object] = {}
    exec("from worker import *", namespace)  # noqa: S102 - a fixed string, the point of the test
    assert set(worker.__all__) == set(namespace) - {"__builtins__"}


def test_every_public_name_of_worker_init_is_in_all() -> None:
    """A name ``worker/__init__.py`` makes public (no leading underscore), and
    ``__version__``, is exported; ``__all__`` names nothing else."""
    public = {
        name
        for name in _bound_in_init()
        if (not name.startswith("_") or name == "__version__") and name != "__all__"
    }
    assert sorted(public) == sorted(worker.__all__)


def test_exported_errors_share_the_common_base() -> None:
    """Every exception class the package exports is a ForwarderError."""
    errors = [
        value
        for value in (getattr(worker, name) for name in worker.__all__)
        if isinstance(value, type) and issubclass(value, BaseException)
    ]
    assert len(errors) >= 5
    assert [] == [e.__name__ for e in errors if not issubclass(e, worker.ForwarderError)]


def test_every_public_exception_class_of_the_package_is_a_forwarder_error() -> None:
    """An exception class any module of ``worker`` defines is a ForwarderError unless its
    name is private (``_``-named: control flow that never leaves its module), so
    ``except ForwarderError`` catches everything the package raises on purpose."""
    import importlib
    import pkgutil

    outside: list[str] = []
    for module_info in pkgutil.walk_packages(worker.__path__, "worker."):
        if module_info.name.endswith("__main__"):
            continue
        module = importlib.import_module(module_info.name)
        for name, value in vars(module).items():
            if (
                isinstance(value, type)
                and issubclass(value, BaseException)
                and value.__module__ == module.__name__
                and not name.startswith("_")
                and not issubclass(value, worker.ForwarderError)
            ):
                outside.append(f"{module.__name__}.{name}")
    assert [] == sorted(outside)
