"""Imports go one way (DESIGN.md): cli -(HTTP)-> daemon -> {manager, agent} -> {dataplane, runtime} and the
leaves {model, ipam, pki, store}. A module may import only what its layer allows."""
import ast
from pathlib import Path

import netweft

ROOT = Path(netweft.__file__).parent
LEAVES = {"model", "ipam", "pki", "store", "errors", "validate", "metrics", "apiclient", "http"}

# package -> the netweft packages it must never import
FORBIDDEN = {
    "cli": {"daemon", "manager", "agent", "dataplane", "dns", "plugins"},
    "daemon": {"cli", "lab"},
    "manager": {"cli", "daemon", "agent", "dataplane", "runtime", "lab", "dns", "plugins"},
    "agent": {"cli", "daemon", "manager", "runtime", "lab", "plugins"},
    "dns": {"cli", "daemon", "manager", "agent", "lab", "plugins"},
    "plugins": {"daemon", "manager", "agent", "dataplane", "runtime", "lab"},
    "dataplane": {"cli", "daemon", "manager", "agent", "runtime", "lab", "dns", "plugins"},
    "runtime": {"cli", "daemon", "manager", "agent", "dataplane", "lab", "dns", "plugins"},
    "lab": {"cli", "daemon", "manager", "agent"},
}
for leaf in LEAVES:
    FORBIDDEN[leaf] = {"cli", "daemon", "manager", "agent", "dataplane", "runtime", "lab", "dns", "plugins"}


def imports(path: Path, package: str | None = None) -> set[str]:
    """netweft packages a module imports (first component after netweft.). Relative imports are resolved
    against the module's package (its dotted path under netweft's parent, unless given)."""
    if package is None:
        package = ".".join(path.relative_to(ROOT.parent).with_suffix("").parts[:-1])
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names] if node.module == "netweft" \
                else [node.module]
        elif isinstance(node, ast.ImportFrom) and node.level > 0:
            parts = package.split(".")
            base = ".".join(parts[:len(parts) - (node.level - 1)] + ([node.module] if node.module else []))
            names = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] == "netweft" and len(parts) > 1:
                out.add(parts[1])
    return out


def test_imports_go_one_way():
    wrong = []
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT)
        pkg = rel.parts[0].removesuffix(".py")
        for target in imports(path) & FORBIDDEN.get(pkg, set()):
            wrong.append(f"{rel} imports netweft.{target}")
    assert not wrong, "imports against the one-way rule:\n" + "\n".join(wrong)


def test_the_rule_catches_a_wrong_import(tmp_path):
    bad = tmp_path / "x.py"
    bad.write_text("from netweft.daemon.engine import Engine\nfrom netweft import pki\n")
    assert imports(bad, "netweft.agent") == {"daemon", "pki"}


def test_the_rule_resolves_relative_imports(tmp_path):
    bad = tmp_path / "x.py"
    bad.write_text("from ..daemon.engine import Engine\nfrom .. import agent\nfrom . import watch\n")
    assert imports(bad, "netweft.manager") == {"daemon", "agent", "manager"}


def test_no_test_module_name_is_used_twice():
    # `make test` collects tests/unit and tests/integration in one run: a shared basename fails collection.
    import pathlib
    root = pathlib.Path(__file__).resolve().parents[1]
    names = [p.name for d in ("unit", "integration") for p in (root / d).glob("test_*.py")]
    assert sorted({n for n in names if names.count(n) > 1}) == []
