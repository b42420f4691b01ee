"""The package layout is the architecture: imports point one way (docs/architecture.md: Layers).

core ← runtime, core ← tools; proxy_worker ← server; server, proxy_worker ← benchmarks; the
library never imports the tests. Inside the server, the request path (``server.gateway``) imports
none of start-up, the embedded default or ``tune``: what it needs from them travels in
``GatewayConfig``. Checked on every import statement, top-level or inside a function,
so a lazy import cannot hide an edge either."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SERVER = {"server.gateway", "server.startup", "server.embedded", "server.tune"}

# what each layer may import from the project (besides itself)
ALLOWED = {
    "proxy_worker.core": set(),
    "proxy_worker.runtime": {"proxy_worker.core"},
    "proxy_worker.tools": {"proxy_worker.core"},
    "server": {"proxy_worker.core", "proxy_worker.runtime", "proxy_worker.tools", *SERVER},
    "server.gateway": {"proxy_worker.core", "proxy_worker.runtime", "server"},
    **{
        role: {"proxy_worker.core", "proxy_worker.runtime", "proxy_worker.tools", "server", *SERVER}
        for role in SERVER - {"server.gateway"}
    },
    "benchmarks": {"proxy_worker.core", "proxy_worker.runtime", "proxy_worker.tools", "server", *SERVER},
}


def layer(parts: list[str]) -> str | None:
    """The layer a dotted module path (without the ``antidistill.`` prefix) belongs to."""
    if not parts:
        return None
    if parts[0] == "proxy_worker":
        return ".".join(parts[:2]) if len(parts) > 1 and parts[1] in ("core", "runtime", "tools") else "proxy_worker"
    if parts[0] == "server":
        return ".".join(parts[:2]) if len(parts) > 1 and ".".join(parts[:2]) in SERVER else "server"
    return parts[0] if parts[0] in ("benchmarks", "tests") else None


def imported_layers(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        for name in names:
            parts = name.split(".")
            if parts[0] == "antidistill":
                parts = parts[1:]
            elif parts[0] != "tests":
                continue
            if (target := layer(parts)) is not None:
                found.add(target)
    return found


def modules() -> list[Path]:
    return sorted(p for folder in ("proxy_worker", "server", "benchmarks") for p in (ROOT / folder).rglob("*.py"))


def test_imports_point_one_way() -> None:
    wrong = []
    for path in modules():
        own = layer(list(path.relative_to(ROOT).with_suffix("").parts))
        own = "proxy_worker.core" if own == "proxy_worker" else own  # its __init__ holds a docstring only
        if bad := imported_layers(path) - ALLOWED[own] - {own}:
            wrong.append(f"{path.relative_to(ROOT)} ({own}) imports {sorted(bad)}")
    assert not wrong, "\n".join(wrong)


def test_the_checker_sees_a_wrong_way_edge(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from antidistill.benchmarks.load import run_load\n    import tests.helpers\n")
    assert imported_layers(module) == {"benchmarks", "tests"}


def test_the_gateway_may_not_reach_start_up(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    module.write_text("from antidistill.server.startup.kv_plan import plan\nfrom antidistill.server import tiers\n")
    assert imported_layers(module) == {"server.startup", "server"}
    assert imported_layers(module) - ALLOWED["server.gateway"] == {"server.startup"}
