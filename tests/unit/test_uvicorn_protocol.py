"""The intake's GuardedProtocol extends uvicorn's internal HttpToolsProtocol (no supported
extension point gives a header deadline or a per-address cap): these tests fail, naming the
class and the member, the day the uvicorn that is installed no longer has the shape the
subclass was written against (pyproject.toml pins uvicorn to the range that has it)."""

from __future__ import annotations

import ast
import hashlib
import inspect
import textwrap
from pathlib import Path

import pytest
import uvicorn
from uvicorn.protocols.http import httptools_impl

from worker.intake import server

# The uvicorn methods GuardedProtocol replaces with its own copies, as uvicorn 0.45 to 0.55
# write them (the digest of their syntax tree, so formatting does not count): a change in
# one is a change GuardedProtocol's copy does not have.
REPLACED = {
    "on_response_complete": "0709ec90",
    "_unset_keepalive_if_required": "4781fe6c",
}


def digest(function: object) -> str:
    tree = ast.parse(textwrap.dedent(inspect.getsource(function)))  # type: ignore[arg-type]
    return hashlib.sha256(ast.dump(tree.body[0]).encode()).hexdigest()[:8]


def members(cls: type) -> tuple[set[str], set[str]]:
    """The methods of ``cls`` and the attributes its methods assign to ``self``, read from
    its source (an instance needs a live connection)."""
    (node,) = ast.parse(textwrap.dedent(inspect.getsource(cls))).body
    assert isinstance(node, ast.ClassDef)
    methods = {f.name for f in node.body if isinstance(f, ast.FunctionDef | ast.AsyncFunctionDef)}
    assigned = {
        target.attr
        for sub in ast.walk(node)
        if isinstance(sub, ast.Assign | ast.AnnAssign | ast.AugAssign)
        for target in (sub.targets if isinstance(sub, ast.Assign) else [sub.target])
        if isinstance(target, ast.Attribute) and is_self(target.value)
    }
    return methods, assigned


def is_self(node: ast.expr) -> bool:
    return isinstance(node, ast.Name) and node.id == "self"


def used(cls: type, base: str) -> set[str]:
    """The attributes ``cls``'s methods read from ``self.<base>`` or a local named ``base``
    (``base=""``: from self)."""
    (node,) = ast.parse(textwrap.dedent(inspect.getsource(cls))).body

    def reads(owner: ast.expr) -> bool:
        if not base:
            return is_self(owner)
        if isinstance(owner, ast.Name):
            return owner.id == base
        return isinstance(owner, ast.Attribute) and owner.attr == base and is_self(owner.value)

    return {
        sub.attr for sub in ast.walk(node) if isinstance(sub, ast.Attribute) and reads(sub.value)
    }


@pytest.mark.parametrize("name", sorted(REPLACED))
def test_the_methods_guarded_protocol_replaces_are_unchanged(name: str) -> None:
    """Each uvicorn method GuardedProtocol replaces is still the code its copy was made from."""
    ours = getattr(server.GuardedProtocol, name)
    theirs = getattr(httptools_impl.HttpToolsProtocol, name, None)
    assert theirs is not None, (
        f"uvicorn {uvicorn.__version__}: HttpToolsProtocol.{name} is gone; "
        f"GuardedProtocol.{name} (worker/intake/server.py) replaces it"
    )
    assert ours is not theirs
    assert REPLACED[name] == digest(theirs), (
        f"uvicorn {uvicorn.__version__} changed HttpToolsProtocol.{name}, which "
        f"GuardedProtocol.{name} (worker/intake/server.py) replaces with its own copy: "
        "review the copy against the new code, then record the new digest here"
    )


def test_uvicorn_still_calls_the_hooks_guarded_protocol_replaces() -> None:
    """uvicorn still calls the replaced hooks where GuardedProtocol expects: every chunk
    received calls _unset_keepalive_if_required, every response end on_response_complete."""
    received = inspect.getsource(httptools_impl.HttpToolsProtocol.data_received)
    assert "self._unset_keepalive_if_required()" in received, (
        f"uvicorn {uvicorn.__version__}: HttpToolsProtocol.data_received no longer calls "
        "_unset_keepalive_if_required, where GuardedProtocol ends a keep-alive pause"
    )
    cycle = inspect.getsource(httptools_impl.RequestResponseCycle)
    assert "self.on_response()" in cycle, (
        f"uvicorn {uvicorn.__version__}: RequestResponseCycle no longer calls on_response "
        "(HttpToolsProtocol.on_response_complete), where GuardedProtocol starts its "
        "keep-alive deadline"
    )


def test_every_inherited_member_guarded_protocol_uses_exists() -> None:
    """Every attribute and method GuardedProtocol reads from its base, and from the
    request cycle, is one uvicorn's HttpToolsProtocol and RequestResponseCycle define."""
    own_methods, own_attributes = members(server.GuardedProtocol)
    base_methods, base_attributes = members(httptools_impl.HttpToolsProtocol)
    inherited = used(server.GuardedProtocol, "") - own_methods - own_attributes - {"guard"}
    missing = inherited - base_methods - base_attributes
    assert inherited  # the check reads something: loop, transport, cycle, ...
    assert set() == missing, (
        f"uvicorn {uvicorn.__version__}: HttpToolsProtocol no longer has {sorted(missing)}, "
        "which GuardedProtocol (worker/intake/server.py) uses"
    )
    cycle_methods, cycle_attributes = members(httptools_impl.RequestResponseCycle)
    from_cycle = used(server.GuardedProtocol, "cycle")
    assert {"response_complete", "more_body", "response_started"} <= from_cycle
    gone = from_cycle - cycle_methods - cycle_attributes
    assert set() == gone, (
        f"uvicorn {uvicorn.__version__}: RequestResponseCycle no longer has {sorted(gone)}, "
        "which GuardedProtocol (worker/intake/server.py) reads"
    )


def test_the_locked_uvicorn_is_inside_the_range_pyproject_allows() -> None:
    """The uvicorn installed is one the pyproject.toml range admits (the range is the one
    whose HttpToolsProtocol has this shape)."""
    from packaging.requirements import Requirement
    from packaging.version import Version

    text = (Path(__file__).resolve().parents[2] / "pyproject.toml").read_text()
    (line,) = [
        part.strip().strip('",')
        for part in text.splitlines()
        if part.strip().startswith('"uvicorn')
    ]
    assert Version(uvicorn.__version__) in Requirement(line).specifier
