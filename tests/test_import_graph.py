"""The package's import graph has no cycle, counting imports inside functions:
a function-local import that dodges a cycle at load time still ties the two
modules together."""
import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "fused_softmax_ce"
NAME = PACKAGE.name


def module_name(path):
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(node, module, is_package, modules):
    """The package modules an Import/ImportFrom node names."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        base = node.module or ""
        if node.level:
            parent = module.split(".") if is_package else module.split(".")[:-1]
            parent = parent[: len(parent) - (node.level - 1)]
            base = ".".join(parent + ([base] if base else []))
        # `from pkg import sub` imports the submodule pkg.sub where there is one.
        names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
    found = set()
    for name in names:
        while name and name not in modules:  # a name inside a module: that module
            name = name.rpartition(".")[0]
        if name and name != module:
            found.add(name)
    return found


def import_graph():
    sources = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    # Compiled modules (_C) import nothing of the package.
    compiled = {module_name(p.with_name(p.name.split(".")[0] + ".py"))
                for pattern in ("*.so", "*.pyd") for p in PACKAGE.rglob(pattern)}
    modules = set(sources) | compiled
    graph = {module: set() for module in compiled}
    for module, path in sources.items():
        tree = ast.parse(path.read_text(), str(path))
        is_package = path.name == "__init__.py"
        graph[module] = set()
        for node in ast.walk(tree):  # every node, function bodies included
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                graph[module] |= imported(node, module, is_package, modules)
    return graph


def find_cycle(graph):
    """One cycle as a list of modules (first repeated last), or None."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_graph_sees_function_local_imports():
    graph = import_graph()
    assert f"{NAME}.functional" in graph and graph[f"{NAME}.functional"]


def test_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_parallel_imports_machinery_only():
    api = {f"{NAME}.{name}" for name in ("functional", "linear", "module")} | {NAME}
    graph = import_graph()
    for module, targets in graph.items():
        if module.startswith(f"{NAME}.parallel"):
            assert not targets & api, f"{module} imports the API files {sorted(targets & api)}"
