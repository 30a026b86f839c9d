"""The package's layers, read from the code (ast): every import points down.

custom_llm.py (the entry) → config → llm, knowledge, voice, agora (the domain) → core
                            serving (HTTP) ───────────────────────────────────→ core
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "custom_llm_server"
DOMAIN = ("llm", "knowledge", "voice", "agora")


def imports_of(path: Path) -> set[str]:
    """The modules a file imports, absolute (relative imports resolved against its package)."""
    parts = path.relative_to(ROOT).with_suffix("").parts
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = ".".join(parts[: len(parts) - node.level]) if node.level else ""
            module = ".".join(filter(None, (base, node.module)))
            found |= {module} | {f"{module}.{alias.name}" for alias in node.names}
    return found


def layer(module: str) -> str | None:
    """The layer a module of ours is in ("core", "serving", "llm"...), "entry", or None (not ours)."""
    if module == "custom_llm":
        return "entry"
    parts = module.split(".")
    if parts[0] != PACKAGE:
        return None
    return parts[1] if len(parts) > 1 else "package"


def our_imports() -> dict[Path, set[str]]:
    """Each module of the package, with the layers it imports (its own excluded)."""
    found = {}
    for path in sorted((ROOT / PACKAGE).rglob("*.py")):
        own = layer(".".join(path.relative_to(ROOT).with_suffix("").parts))
        found[path] = {layer(m) for m in imports_of(path)} - {None, own, "package"}
    return found


def test_the_modules_are_found():
    modules = our_imports()
    assert len(modules) > 30
    assert {layer(".".join(p.relative_to(ROOT).with_suffix("").parts)) for p in modules} >= {
        "core", "serving", "config", *DOMAIN
    }  # fmt: skip


def test_the_core_imports_nothing_of_ours_nor_the_web_framework():
    for path, layers in our_imports().items():
        if path.parent.name == "core":
            assert not layers, f"{path.name} imports {layers}"
            assert not {m.split(".")[0] for m in imports_of(path)} & {"fastapi", "starlette", "uvicorn"}, path.name


def test_serving_imports_only_the_core():
    for path, layers in our_imports().items():
        if path.parent.name == "serving":
            assert layers <= {"core"}, f"{path.name} imports {layers}"


def test_the_domain_imports_only_the_core():
    """llm, knowledge, voice and agora know nothing of HTTP, of the settings, or of each other: the
    config layer wires them (config/build.py)."""
    for path, layers in our_imports().items():
        if path.parent.name in DOMAIN:
            assert layers <= {"core"}, f"{path.parent.name}/{path.name} imports {layers}"


def test_the_settings_import_nothing_of_ours():
    assert not our_imports()[ROOT / PACKAGE / "config" / "settings.py"]


def test_config_never_imports_the_http_layer():
    for path, layers in our_imports().items():
        if path.parent.name == "config":
            assert "serving" not in layers, path.name


def test_nothing_imports_the_entry():
    for path in [*(ROOT / PACKAGE).rglob("*.py"), *(ROOT / "bench").glob("*.py")]:
        assert "custom_llm" not in imports_of(path), path


def test_every_module_says_what_it_owns_first():
    for path in (ROOT / PACKAGE).rglob("*.py"):
        doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8")))
        assert doc and len(doc.splitlines()[0]) > 20, f"{path} has no first line saying what it owns"


def test_no_test_or_bench_edits_the_import_path():
    for path in [*(ROOT / "tests").glob("*.py"), *(ROOT / "bench").glob("*.py")]:
        edits = re.search(r"sys\.path(\.insert|\.append|\[[^\]]*\]\s*=)", path.read_text(encoding="utf-8"))
        assert not edits, path
