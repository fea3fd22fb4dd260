"""qvd/ imports one way: each module only from the layers below it (the README's table), so never in a cycle, and
never from the host glue (nodes/), the demo (qvd_demo/) or ComfyUI."""
import ast
from pathlib import Path

QVD = Path(__file__).resolve().parent.parent / "qvd"
# Bottom to top, as in the README's "Where things are" table.
LAYERS = (("errors",), ("config",), ("identity", "safefile", "kernels", "timesteps", "callgraph"), ("quantizers",), ("scri", "htdq"),
          ("calibrate",), ("delta",), ("modules",), ("quantize",), ("verify",), ("io",), ("__init__",))


def _unit(path: Path) -> str:
    rel = path.relative_to(QVD).with_suffix("")
    return rel.parts[0]  # a subpackage (kernels/) is one unit


def _imports(path: Path) -> set[str]:
    """qvd units ``path`` imports (relative imports resolved; a subpackage's own modules are one unit)."""
    tree = ast.parse(path.read_text())
    here = path.relative_to(QVD).parent.parts
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = list(here[: len(here) - node.level + 1])
                parts = base + (node.module.split(".") if node.module else [])
                names = [parts + [a.name] for a in node.names] if not node.module else [parts]
            elif node.module and node.module.split(".")[0] in ("qvd", "nodes", "qvd_demo", "comfy"):
                names = [node.module.split(".")]
            else:
                continue
            for p in names:
                if node.level == 0 and p[0] != "qvd":
                    out.add("!" + ".".join(p))
                elif node.level == 0:
                    out.add(p[1] if len(p) > 1 else "__init__")
                elif node.level > len(here) + 1:
                    out.add("!" + ".".join(p))
                else:
                    out.add(p[0] if p else "__init__")
        elif isinstance(node, ast.Import):
            for a in node.names:
                top = a.name.split(".")
                if top[0] in ("nodes", "qvd_demo", "comfy"):
                    out.add("!" + a.name)
                elif top[0] == "qvd":
                    out.add(top[1] if len(top) > 1 else "__init__")
    return out


def _graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for path in QVD.rglob("*.py"):
        unit = _unit(path)
        graph.setdefault(unit, set()).update(u for u in _imports(path) if u != unit)
    return graph


def test_every_qvd_module_has_a_layer():
    assert set(_graph()) == {u for layer in LAYERS for u in layer}


def test_qvd_imports_only_from_lower_layers():
    """Strictly lower: an import within a layer or upwards fails, so does every import cycle."""
    graph = _graph()
    assert {"calibrate", "modules", "identity", "scri"} <= graph["quantize"] and "kernels" in graph["htdq"]  # parsed
    rank = {u: i for i, layer in enumerate(LAYERS) for u in layer}
    bad = [(u, v) for u, vs in graph.items() for v in vs if v.startswith("!") or rank[v] >= rank[u]]
    assert not bad, f"imports against the layering (module, imported): {bad}"
