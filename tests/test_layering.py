"""The house rules, read off the source (every ``import`` statement, lazy ones inside functions included; the
bodies of ``if TYPE_CHECKING:`` are skipped, they never run):

- layers import downwards only: nothing in ``fractal_kernels`` imports ``fractal_models``, so the kernel library
  installs, imports and tests without the models above it;
- no import cycle among the modules of either package;
- the fast engine (``fractal_models.engine``) imports ``fractal_kernels``, ``fractal_models.layers`` and itself
  only, never the paper's modules, which call into it.
"""
import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ("fractal_kernels", "fractal_models")


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _import_nodes(tree: ast.AST):
    found, stack = [], [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)  # the guarded body is for type checkers only
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        stack.extend(ast.iter_child_nodes(node))
    return sorted(found, key=lambda n: (n.lineno, n.col_offset))


def _module_name(path: pathlib.Path, root: pathlib.Path = ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imported_modules(path: pathlib.Path, root: pathlib.Path = ROOT):
    """(line, absolute dotted name) of every import in ``path``: ``from a import b`` yields ``a.b`` (``b`` a
    submodule or a name defined in ``a``), relative imports are resolved against ``path``'s package."""
    tree = ast.parse(path.read_text(), filename=str(path))
    here = _module_name(path, root)
    package = here if path.name == "__init__.py" else here.rpartition(".")[0]
    for node in _import_nodes(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        else:
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            for alias in node.names:
                yield node.lineno, f"{mod}.{alias.name}" if mod else alias.name


def _graph(root: pathlib.Path = ROOT, packages=PACKAGES):
    files = {_module_name(p, root): p for pkg in packages for p in sorted((root / pkg).rglob("*.py"))}
    edges = {}
    for mod, path in files.items():
        targets = set()
        for _, name in _imported_modules(path, root):
            # the most specific module of ours the name refers to (``a.b.func`` -> ``a.b``)
            while name and name not in files:
                name = name.rpartition(".")[0]
            if name and name != mod:
                targets.add(name)
        edges[mod] = targets
    return edges


def _cycles(edges):
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index, low, on_stack, stack, out, counter = {}, {}, set(), [], [], [0]
    for start in edges:
        if start in index:
            continue
        work = [(start, iter(sorted(edges[start])))]
        index[start] = low[start] = counter[0]; counter[0] += 1
        stack.append(start); on_stack.add(start)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = counter[0]; counter[0] += 1
                    stack.append(w); on_stack.add(w)
                    work.append((w, iter(sorted(edges[w]))))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop(); on_stack.discard(w); comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))
    return out


def test_fractal_kernels_never_imports_fractal_models():
    files = sorted((ROOT / "fractal_kernels").rglob("*.py"))
    assert len(files) > 10  # the scan sees the package
    bad = [f"{p.relative_to(ROOT)}:{line}: {mod}" for p in files for line, mod in _imported_modules(p)
           if mod == "fractal_models" or mod.startswith("fractal_models.")]
    assert not bad, "fractal_kernels imports the model layer above it:\n" + "\n".join(bad)


def test_neither_package_imports_the_benchmarks():
    """``benchmarks`` sits above both packages: the cost model writes package data that ``fractal_kernels`` reads,
    it is never imported by it."""
    files = sorted(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py"))
    bad = [f"{p.relative_to(ROOT)}:{line}: {mod}" for p in files for line, mod in _imported_modules(p)
           if mod == "benchmarks" or mod.startswith("benchmarks.")]
    assert not bad, "a package imports the benchmarks above it:\n" + "\n".join(bad)


def test_no_import_cycles_in_either_package():
    edges = _graph(packages=PACKAGES + ("benchmarks",))
    assert "fractal_models.engine.mar" in edges and "fractal_kernels.dispatch" in edges  # the scan sees both
    assert "benchmarks.costmodel.launch" in edges  # and the benchmarks
    cycles = _cycles(edges)
    assert not cycles, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in cycles)


def test_the_engine_never_imports_the_paper_modules():
    allowed = ("fractal_models.engine", "fractal_models.layers")
    files = sorted((ROOT / "fractal_models" / "engine").rglob("*.py"))
    assert len(files) >= 4
    bad = [f"{p.relative_to(ROOT)}:{line}: {mod}" for p in files for line, mod in _imported_modules(p)
           if mod.split(".")[0] == "fractal_models" and not any(mod == a or mod.startswith(a + ".") for a in allowed)]
    assert not bad, "the fast engine imports the paper's modules (they call into it, not the reverse):\n" + \
        "\n".join(bad)


def test_the_scan_detects_an_upward_import(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("def g():\n    from fractal_models.mar import MAR\n    import fractal_models\n")
    assert [m for _, m in _imported_modules(f, tmp_path)] == ["fractal_models.mar.MAR",
                                                              "fractal_models"]


def test_the_scan_detects_a_cycle_and_skips_type_checking_imports(tmp_path):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from pkg import b\n")
    (pkg / "b.py").write_text("def f():\n    from .c import g\n")  # lazy and relative: still an edge
    (pkg / "c.py").write_text("import pkg.a\n")
    (pkg / "d.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.e import X\n")
    (pkg / "e.py").write_text("from pkg.d import Y\n")
    edges = _graph(tmp_path, ("pkg",))
    assert edges["pkg.b"] == {"pkg.c"} and edges["pkg.d"] == set()
    assert _cycles(edges) == [["pkg.a", "pkg.b", "pkg.c"]]


MAX_LINES = 450  # one sitting; an exception would be listed here with the reason


# benchmarks modules over the limit, each with its reason (issue #28 item 6: launches and aot are packages of
# modules of <= 450 lines now, benchmarks/launches/ and benchmarks/aot/)
LONG_BENCHMARKS = {"benchmarks/attention.py": "one line over: to split with the others"}


def test_no_module_is_too_long_to_read_in_one_sitting():
    long = {str(p.relative_to(ROOT)): n for pkg in PACKAGES + ("benchmarks",)
            for p in sorted((ROOT / pkg).rglob("*.py"))
            if (n := len(p.read_text().splitlines())) > MAX_LINES and str(p.relative_to(ROOT)) not in LONG_BENCHMARKS}
    assert not long, f"modules over {MAX_LINES} lines (split them by layer): {long}"


def _docs_layout_paths():
    # the tree in docs/layout.md ("## The tree"); it lived in the README before the docs site
    text = (ROOT / "docs" / "layout.md").read_text()
    block = text.split("## The tree", 1)[1].split("```", 2)[1]
    paths = []
    for line in block.splitlines():
        first = line.split("  ", 1)[0].strip()
        if "/" not in first:
            continue
        if "{" in first:  # fractal_models/{mar,ar}.py
            head, rest = first.split("{", 1)
            names, tail = rest.split("}", 1)
            paths += [head + n + tail for n in names.split(",")]
        else:
            paths.append(first)
    return paths


def test_docs_layout_matches_the_tree():
    paths = _docs_layout_paths()
    assert len(paths) > 10
    missing = [p for p in paths if "<" not in p and not (ROOT / p).exists()]
    assert not missing, f"docs/layout.md's tree names paths that do not exist: {missing}"
    listed = [p.rstrip("/") for p in paths]
    templates = [p.split("<", 1)[0] for p in paths if "<" in p]  # fractal_kernels/ops/<family>/ covers ops/*
    package_dirs = sorted({str(i.parent.relative_to(ROOT)) for pkg in PACKAGES for i in (ROOT / pkg).rglob("__init__.py")})
    unlisted = [d for d in package_dirs
                if not any(l == d or l.startswith(d + "/") for l in listed) and not any(d.startswith(t) for t in templates)]
    assert not unlisted, f"packages missing from docs/layout.md's tree: {unlisted}"
