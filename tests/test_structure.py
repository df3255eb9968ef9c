"""The package's structure (docs/development.md, "Python layers" and "The op layer"): imports
run one way, so no module of weighted_loss imports, directly or through others, a module that
imports it back (every import statement counts, those inside functions too); and no code reads
an argument or a gradient by position."""
import ast
import os

import pytest

import weighted_loss

PACKAGE = os.path.dirname(os.path.abspath(weighted_loss.__file__))


def _module_name(path: str) -> str:
    rel = os.path.relpath(path, os.path.dirname(PACKAGE))[:-len(".py")].split(os.sep)
    return ".".join(rel[:-1] if rel[-1] == "__init__" else rel)


def _modules():
    """{module name: source path} of every .py file of the package."""
    out = {}
    for root, _, files in os.walk(PACKAGE):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(root, f)
                out[_module_name(path)] = path
    return out


def import_graph(modules=None):
    """{module: set of the package's modules it imports}."""
    modules = modules or _modules()
    graph = {}
    for name, path in modules.items():
        is_pkg = path.endswith("__init__.py")
        base = name if is_pkg else name.rpartition(".")[0]
        edges = set()
        with open(path) as fh:
            tree = ast.parse(fh.read(), path)
        for node in ast.walk(tree):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    parts = base.split(".")
                    parent = ".".join(parts[:len(parts) - (node.level - 1)])
                    mod = f"{parent}.{node.module}" if node.module else parent
                else:
                    mod = node.module or ""
                # `from . import x`: the module x where x is one, else the package itself
                targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in modules else mod
                           for a in node.names]
            for t in targets:
                while t and t not in modules:  # a.b.c -> a.b: an attribute of a module
                    t = t.rpartition(".")[0]
                if t and t != name:
                    edges.add(t)
        graph[name] = edges
    return graph


def find_cycle(graph):
    """One cycle of the graph as a list of nodes (first == last), or None."""
    state, stack = {}, []

    def visit(n):
        state[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state:
                found = visit(m)
                if found:
                    return found
        stack.pop()
        state[n] = 2
        return None
    for n in sorted(graph):
        if n not in state:
            found = visit(n)
            if found:
                return found
    return None


def test_no_import_cycle_among_the_package_modules():
    graph = import_graph()
    assert "weighted_loss.functional" in graph and "weighted_loss._local" in graph
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_a_cycle():
    # the graph the package had before its layers (issue 35): functional -> _dtensor -> focal ->
    # functional, found; and a graph without one, not
    graph = {"functional": {"_dtensor"}, "_dtensor": {"focal", "distributed"},
             "focal": {"functional"}, "distributed": set()}
    cycle = find_cycle(graph)
    assert cycle[0] == cycle[-1] and set(cycle) == {"functional", "_dtensor", "focal"}
    graph["focal"] = set()
    assert find_cycle(graph) is None


@pytest.mark.parametrize("layer, may_not_import", [
    # the single-device losses know nothing of DTensors, process groups or the entry points
    ("weighted_loss._local", {"weighted_loss._dtensor", "weighted_loss._grouped",
                              "weighted_loss._sharded", "weighted_loss.distributed"}),
    ("weighted_loss._linear_chunks", {"weighted_loss._dtensor", "weighted_loss._grouped",
                                      "weighted_loss._sharded"}),
    ("weighted_loss._options", None),  # a leaf: nothing of the package
    ("weighted_loss._composite", None),  # a leaf: PyTorch's ops only (never a patched name)
    ("weighted_loss._script", None),  # a leaf: the TorchScript stand-ins, PyTorch's ops only
    ("weighted_loss._reweight", None),  # a leaf: the arithmetic around the ops
    ("weighted_loss._ops", {"weighted_loss._forward_ad", "weighted_loss._local"}),
])
def test_layers_import_only_below_them(layer, may_not_import):
    graph = import_graph()
    entries = {"weighted_loss.functional", "weighted_loss.modules", "weighted_loss.focal",
               "weighted_loss.linear", "weighted_loss.vocab_parallel", "weighted_loss.patch",
               "weighted_loss"}
    reached, todo = set(), [layer]
    while todo:  # everything the layer imports, directly or not
        for m in graph[todo.pop()]:
            if m not in reached:
                reached.add(m)
                todo.append(m)
    if may_not_import is None:
        assert not graph[layer], f"{layer} imports {sorted(graph[layer])}"
    else:
        bad = reached & (may_not_import | entries)
        assert not bad, f"{layer} reaches {sorted(bad)}"


def literal_indices(source: str):
    """(line, expression) of every subscript by an integer literal above 0 (an index or a slice
    bound) in ``source``, but of a shape (``x.shape[1]``, ``x.shape[2:]``): what counting
    arguments, needs_input_grad or gradients by position looks like."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Subscript):
            continue
        if isinstance(node.value, ast.Attribute) and node.value.attr == "shape":
            continue
        sl = node.slice
        parts = [sl.lower, sl.upper, sl.step] if isinstance(sl, ast.Slice) else [sl]
        for p in parts:
            if isinstance(p, ast.UnaryOp) and isinstance(p.op, ast.USub):
                p = p.operand  # x[-2]: a position counted from the end
            if isinstance(p, ast.Constant) and type(p.value) is int and p.value > 0:
                found.append((node.lineno, ast.unparse(node)))
                break
    return found


def test_no_argument_is_read_by_position():
    """Autograd rules read their inputs and return their gradients by name (_named.py): an index
    like args[7] or needs_input_grad[10] silently picks the wrong argument once one is added."""
    bad = []
    for name, path in sorted(_modules().items()):
        with open(path) as fh:
            bad += [f"{name}:{line}: {expr}" for line, expr in literal_indices(fh.read())]
    assert not bad, "literal indices in weighted_loss/:\n" + "\n".join(bad)


def test_the_index_finder_finds_indices():
    src = ("a = args[7]\nb = ctx.needs_input_grad[10]\nc = focal[:2]\nd = out[-1]\n"
           "e = x.shape[1]\nf = x.shape[2:]\ng = t[0]\nh = rest[i]\n")
    assert [line for line, _ in literal_indices(src)] == [1, 2, 3, 4]
