"""The layout's rules, read from the source: which part may import which.

The tree is the architecture (README "Layout"): `fabric/core` is pure, the store and
the wire sit on it, the roles (origin, hook, site agent, worker) sit on those and
never import each other, and only the CLI and the demo import `agents`. Each rule is
checked on every import statement, including those inside functions.
"""

from __future__ import annotations

import ast
import importlib
import inspect
from pathlib import Path

import pytest

from fabric import errors

ROOT = Path(__file__).resolve().parents[1]
MAX_LINES = 450  # a longer module says why in its docstring, in a paragraph starting "Length:"


def _modules(*parts: str) -> list[Path]:
    return sorted(p for part in parts for p in (ROOT / part).rglob("*.py"))


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """Every module `path` imports (absolute names; relative imports resolved)."""
    tree = ast.parse(path.read_text(), str(path))
    package = _module_name(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = ".".join(package[: len(package) - node.level + 1])
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module or ""
            found.add(module)
            found.update(f"{module}.{a.name}" for a in node.names)  # `from fabric import wire`
    return found


def _violations(paths: list[Path], forbidden: tuple[str, ...]) -> list[str]:
    out = []
    for p in paths:
        for name in sorted(_imports(p)):
            if any(name == f or name.startswith(f + ".") for f in forbidden):
                out.append(f"{p.relative_to(ROOT)} imports {name}")
    return out


ROLES = {
    "fabric.origin": ("fabric.hook", "agents"),
    "fabric.hook": ("fabric.origin", "agents"),
    "agents.site": ("fabric.origin", "fabric.hook", "agents.worker"),
    "agents.worker": ("fabric.origin", "fabric.hook", "agents.site"),
}


def test_core_imports_nothing_of_the_store_the_wire_the_roles_or_io_libraries():
    forbidden = ("fabric.store", "fabric.wire", "fabric.origin", "fabric.hook", "fabric.cli", "fabric.demo",
                 "fabric.publish", "fabric.pull", "fabric.transfer", "fabric.gc", "fabric.fsck",
                 "fabric.s3source", "agents", "aiohttp", "boto3", "botocore", "torch")
    assert _violations(_modules("fabric/core"), forbidden) == []


@pytest.mark.parametrize("role", sorted(ROLES))
def test_no_role_imports_another_role(role):
    assert _violations(_modules(role.replace(".", "/")), ROLES[role]) == []


def test_only_the_cli_and_the_demo_import_agents():
    paths = [p for p in _modules("fabric") if p.relative_to(ROOT).parts[1] not in ("cli", "demo")]
    assert _violations(paths, ("agents",)) == []


def test_only_the_worker_imports_torch():
    paths = [p for p in _modules("fabric", "agents") if "agents/worker" not in p.as_posix()]
    lazy_ok = {"fabric/demo/stream.py"}  # computes the expected answers with torch when it is installed
    assert [v for v in _violations(paths, ("torch", "safetensors.torch"))
            if v.split(" ")[0] not in lazy_ok] == []


def test_fabric_keeps_at_most_20_modules_at_its_top_level():
    top = sorted(p.name for p in (ROOT / "fabric").glob("*.py"))
    assert len(top) <= 20, top


def test_every_module_opens_with_a_docstring_and_long_ones_say_why():
    missing, long = [], []
    for p in _modules("fabric", "agents"):
        text = p.read_text()
        if not text.strip():
            continue  # an empty package marker
        doc = ast.get_docstring(ast.parse(text))
        if not doc:
            missing.append(str(p.relative_to(ROOT)))
        elif text.count("\n") > MAX_LINES and "Length:" not in doc:
            long.append(f"{p.relative_to(ROOT)} ({text.count(chr(10))} lines)")
    assert missing == [] and long == []


def _defined_exceptions() -> list[tuple[str, str]]:
    found = []
    for p in _modules("fabric", "agents"):
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.ClassDef) and any(
                    (isinstance(b, ast.Name) and (b.id.endswith(("Error", "Exception")) or b.id in _FABRIC_ERRORS))
                    or (isinstance(b, ast.Attribute) and b.attr.endswith(("Error", "Exception")))
                    for b in node.bases):
                found.append((str(p.relative_to(ROOT)), node.name))
    return found


_FABRIC_ERRORS = {name for name, obj in vars(errors).items()
                  if inspect.isclass(obj) and issubclass(obj, BaseException)}


def test_every_error_class_lives_in_fabric_errors():
    elsewhere = [f"{path}: {name}" for path, name in _defined_exceptions() if path != "fabric/errors.py"]
    assert elsewhere == []


def test_from_code_knows_every_fabric_error():
    for name in _FABRIC_ERRORS:
        cls = getattr(errors, name)
        if issubclass(cls, errors.FabricError) and cls is not errors.FabricError and "code" in vars(cls):
            e = errors.from_code(cls.code, "message")
            assert type(e) is cls, (name, type(e))


def test_public_names_import_from_the_package():
    fabric = importlib.import_module("fabric")
    for name in ("publish", "pull", "open_store", "Manifest"):
        assert callable(getattr(fabric, name)), name
