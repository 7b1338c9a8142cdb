"""The import graph of gemma_keras, read from the source: no module imports, directly or
through others, a module that imports it back, counting imports inside functions too (they
hide a cycle from Python, not from a reader); the model core needs nothing from generation/.

Pure source reading (no import), so one backend's pass runs it.
"""

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "gemma_keras"

pytestmark = pytest.mark.once("jax")


def modules():
    """{dotted name: path} of every module of the package (a package by its __init__)."""
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def imported(name, path, known):
    """[(module imported, line, inside a function)] for every gemma_keras import in `path`.
    `from a.b import c` names the module a.b.c when that is a module, else a.b; a
    module's enclosing packages (which Python imports first) are not counted."""
    tree = ast.parse(path.read_text(), str(path))
    inside = {id(node) for fn in ast.walk(tree)
              if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef))
              for node in ast.walk(fn)}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the module's package
                package = name.split(".") if path.name == "__init__.py" else \
                    name.split(".")[:-1]
                package = package[:len(package) - node.level + 1]
                base = ".".join(package + ([base] if base else []))
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base
                       for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:  # a name inside a module: the module
                target = target.rpartition(".")[0]
            if target and target != name and target != "gemma_keras":
                out.append((target, node.lineno, id(node) in inside))
    return out


def graph():
    known = modules()
    return {name: imported(name, path, known) for name, path in known.items()}


def cycles(edges):
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in {t for t, _, _ in edges[v]}:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def describe(edges, component):
    members = set(component)
    return "; ".join(f"{a} -> {b} (line {line}{', inside a function' if inner else ''})"
                     for a in component for b, line, inner in edges[a] if b in members)


def reachable(edges, start):
    seen, todo = set(), [start]
    while todo:
        for target, _, _ in edges[todo.pop()]:
            if target not in seen:
                seen.add(target)
                todo.append(target)
    return seen


def test_the_import_graph_has_no_cycle():
    edges = graph()
    assert len(edges) > 40  # the whole package was read
    found = cycles(edges)
    assert not found, "import cycles: " + " | ".join(describe(edges, c) for c in found)


def test_the_model_core_imports_nothing_from_generation():
    edges = graph()
    for core in ("gemma_keras.backbone", "gemma_keras.layers.kv_cache",
                 "gemma_keras.layers.attention"):
        needs = sorted(m for m in reachable(edges, core) if m.startswith("gemma_keras.generation"))
        assert not needs, f"{core} reaches {needs}"


def test_the_cycle_finder_sees_a_cycle_through_a_function_import(tmp_path):
    # The finder itself, on a two-module package whose cycle hides in a function.
    package = tmp_path / "gemma_keras"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from gemma_keras.b import g\n")
    (package / "b.py").write_text("def g():\n    from gemma_keras import a\n")
    known = {"gemma_keras": package / "__init__.py", "gemma_keras.a": package / "a.py",
             "gemma_keras.b": package / "b.py"}
    edges = {name: imported(name, path, known) for name, path in known.items()}
    assert edges["gemma_keras.b"] == [("gemma_keras.a", 2, True)]
    assert cycles(edges) == [["gemma_keras.a", "gemma_keras.b"]]


DECODE_STATE = ("cache", "column", "next_position", "logits")


def test_decode_state_is_written_by_its_owner_only():
    # GenerationSession owns a running decode's cache, column, positions and logits (read-only
    # properties); strategies hand back what their compiled loops return through its methods.
    found = []
    for name, path in modules().items():
        if name == "gemma_keras.generation.session":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            targets = (node.targets if isinstance(node, ast.Assign) else
                       [node.target] if isinstance(node, (ast.AugAssign, ast.AnnAssign)) else [])
            for target in targets:
                for item in ast.walk(target):
                    if (isinstance(item, ast.Attribute)
                            and item.attr.lstrip("_") in DECODE_STATE
                            and "session" in ast.unparse(item.value)):
                        found.append(f"{path.name}:{node.lineno}: {ast.unparse(target)}")
    assert not found, f"decode state written outside generation/session.py: {found}"


def test_every_pass_over_a_cache_goes_through_model_step():
    # generation/steps.model_step is the one forward primitive over a KV cache: no other
    # module calls the backbone with cache= (the backbone and its layers take it).
    found = []
    for name, path in modules().items():
        if name in ("gemma_keras.generation.steps", "gemma_keras.backbone") or \
                name.startswith("gemma_keras.layers"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and any(k.arg == "cache" for k in node.keywords) \
                    and "backbone" in ast.unparse(node.func):
                found.append(f"{path.name}:{node.lineno}")
    assert not found, f"the backbone called with a cache outside model_step: {found}"
