"""The house's layering, checked from the code's imports (grimp, the graph import-linter builds too).

import-linter's contracts (pyproject.toml, `lint-imports` in `make lint`) forbid the wrong direction
between packages; these tests add what contracts cannot say: no import cycle at all, module by module,
and the two places where the load test names a detail of the service instead of importing it.
"""

from __future__ import annotations

import ast
import fnmatch
import inspect
from collections.abc import Callable, Iterable, Mapping

import grimp
import pytest

PACKAGES = ("orchestrator", "export", "stack", "bench", "loadtest", "tests")


@pytest.fixture(scope="module")
def graph() -> grimp.ImportGraph:
    # No cache: a stale cache would hide an import added since (the build takes a fraction of a second).
    return grimp.build_graph(*PACKAGES, cache_dir=None)


def strongly_connected(nodes: Iterable[str], successors: Callable[[str], Iterable[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components with more than one node (iterative: deep chains are fine)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    found: list[list[str]] = []
    for root in sorted(nodes):
        if root in index:
            continue
        work = [(root, iter(sorted(successors(root))))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(successors(child)))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def describe_cycle(
    component: list[str],
    successors: Callable[[str], Iterable[str]],
    chain: Callable[[str, str], tuple[str, ...] | None],
) -> str:
    """One concrete cycle through ``component``: start -> next -> ... -> start."""
    start = component[0]
    following = sorted(m for m in successors(start) if m in component)[0]
    back = chain(following, start) or (following, start)
    return " -> ".join([start, *back])


def test_the_finder_reports_a_cycle_and_only_cycles() -> None:
    edges: Mapping[str, set[str]] = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "e": {"e"}}
    assert strongly_connected(edges, lambda m: edges[m]) == [["a", "b", "c"]]


def test_no_import_cycle_among_modules(graph: grimp.ImportGraph) -> None:
    def successors(module: str) -> set[str]:
        return graph.find_modules_directly_imported_by(module)

    def chain(importer: str, imported: str) -> tuple[str, ...] | None:
        return graph.find_shortest_chain(importer=importer, imported=imported)

    cycles = [describe_cycle(c, successors, chain) for c in strongly_connected(graph.modules, successors)]
    assert not cycles, "expected no import cycle, but found:\n" + "\n".join(cycles)


def test_no_cycle_between_top_level_packages(graph: grimp.ImportGraph) -> None:
    edges: dict[str, set[str]] = {package: set() for package in PACKAGES}
    for module in graph.modules:
        for imported in graph.find_modules_directly_imported_by(module):
            importer_top, imported_top = module.split(".")[0], imported.split(".")[0]
            if importer_top != imported_top:
                edges[importer_top].add(imported_top)
    cycles = strongly_connected(edges, lambda package: edges[package])
    assert not cycles, f"expected no cycle between top-level packages, but these import each other: {cycles}"


def _uvicorn_run_keywords(function: Callable[..., object]) -> dict[str, object]:
    """The constant keyword arguments of the ``uvicorn.run`` call in ``function``, and of the dict
    literal it unpacks into that call (``**OPTIONS``) when the dict is a module constant."""
    module = inspect.getmodule(function)
    tree = ast.parse(inspect.getsource(function))
    calls = [
        node
        for node in ast.walk(tree)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "run"
    ]
    assert len(calls) == 1, f"expected one uvicorn.run call in {function.__qualname__}, found {len(calls)}"
    found: dict[str, object] = {}
    for keyword in calls[0].keywords:
        if keyword.arg is None and isinstance(keyword.value, ast.Name):
            found.update(getattr(module, keyword.value.id))
        elif isinstance(keyword.value, ast.Constant):
            found[str(keyword.arg)] = keyword.value.value
    return found


def test_the_ceiling_app_is_served_as_the_orchestrator_is() -> None:
    """loadtest/ceiling.py serves through stack.launch (the load test imports no service module); the
    comparison with the orchestrator only holds while both serve with the same uvicorn options."""
    from orchestrator.__main__ import serve as orchestrator_serve
    from stack.launch import serve as stack_serve

    ours, theirs = _uvicorn_run_keywords(stack_serve), _uvicorn_run_keywords(orchestrator_serve)
    assert ours == theirs, f"stack.launch.serve passes {ours} to uvicorn.run, but orchestrator's serve passes {theirs}"


def test_the_load_tests_cache_pattern_matches_the_services_cache_keys() -> None:
    """loadtest/cachectl.py flushes the shared cache with a key pattern it writes down instead of importing
    the store's key builder: this keeps the two in step."""
    from loadtest.cachectl import REC_CACHE_PATTERN
    from orchestrator.store import keys

    for user_id in ("0", "42", "user:7@x"):
        assert fnmatch.fnmatchcase(keys.rec_cache(user_id), REC_CACHE_PATTERN), (user_id, REC_CACHE_PATTERN)
    others = [keys.recs("42"), keys.generation("42"), keys.seen("42"), keys.session("42"), keys.popular("home")]
    assert not [k for k in others if fnmatch.fnmatchcase(k, REC_CACHE_PATTERN)], (
        "the pattern must match cache keys only"
    )
