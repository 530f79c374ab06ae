"""The layers hold: no module of fetalpipe/ imports, at the top or inside a function, a module that imports it back."""

import ast
import os

PACKAGE_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "fetalpipe")


def module_name(path: str) -> str:
    relative = os.path.relpath(path, os.path.dirname(PACKAGE_DIR))[: -len(".py")].replace(os.sep, ".")
    return relative[: -len(".__init__")] if relative.endswith(".__init__") else relative


def import_graph() -> dict[str, set[str]]:
    """module -> the fetalpipe modules it imports anywhere in its source (top level or lazily, in a function)."""
    modules = {}
    for root, _, names in os.walk(PACKAGE_DIR):
        for name in names:
            if name.endswith(".py"):
                modules[module_name(os.path.join(root, name))] = os.path.join(root, name)
    graph = {}
    for module, path in modules.items():
        imported = set()
        for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
            if isinstance(node, ast.Import):
                imported.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                imported.add(node.module)
                imported.update(f"{node.module}.{alias.name}" for alias in node.names)  # `from fetalpipe import storage`
        graph[module] = {name for name in imported if name in modules and name != module and name != "fetalpipe"}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as [a, b, ..., a], or None (depth-first search with colours)."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for child in sorted(graph[node]):
            if state.get(child) == "open":
                return stack[stack.index(child):] + [child]
            if child not in state:
                found = visit(child)
                if found:
                    return found
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_the_package_import_graph_has_no_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


# The subpackages in the order README's "How the code is laid out" lists them: each imports only itself and earlier ones.
LAYERS = ("runtime", "measure", "data", "model", "pipeline")


def test_each_subpackage_imports_only_itself_and_the_layers_below():
    upward = []
    for module, imported in import_graph().items():
        if module.count(".") < 2:  # fetalpipe, fetalpipe.cli and the subpackages' __init__ files
            continue
        layer = LAYERS.index(module.split(".")[1])
        upward += [f"{module} -> {name}" for name in imported if name.count(".") >= 2 and LAYERS.index(name.split(".")[1]) > layer]
    assert not upward, "imports from a later layer: " + ", ".join(sorted(upward))


def test_the_cycle_finder_finds_a_planted_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_trainings_ray_data_steps_come_from_a_module_that_imports_no_torch():
    """A Ray Data task imports the module that defines the function it runs. Each step training hands to `map_batches`
    comes from pipeline.preprocess, which imports no torch: torch's import took 3 s a task worker on the 2-core AVX2 VM,
    twice per training stage, when one of them lived in pipeline.train."""
    import subprocess
    import sys

    from fetalpipe.pipeline import preprocess

    steps = []
    for node in ast.walk(ast.parse(open(os.path.join(PACKAGE_DIR, "pipeline", "train.py"), encoding="utf-8").read())):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "map_batches":
            step = node.args[0].args[0] if isinstance(node.args[0], ast.Call) else node.args[0]  # functools.partial(step, ...)
            steps.append(step.id)
    assert len(steps) >= 6
    defined_elsewhere = [name for name in steps if getattr(getattr(preprocess, name, None), "__module__", None) != preprocess.__name__]
    assert not defined_elsewhere, f"steps not defined in {preprocess.__name__}: {defined_elsewhere}"
    imports = subprocess.run([sys.executable, "-c", "import sys, fetalpipe.pipeline.preprocess; print('torch' in sys.modules)"],
                             capture_output=True, text=True, check=True)
    assert imports.stdout.strip() == "False"
