"""Layers import downwards only: nothing in ``fractal_kernels`` imports ``fractal_models`` (lazy imports inside
functions included), so the kernel library installs, imports and tests without the models above it."""
import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _imported_modules(path: pathlib.Path):
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):  # every import statement, at any depth
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.lineno, node.module


def test_fractal_kernels_never_imports_fractal_models():
    files = sorted((ROOT / "fractal_kernels").rglob("*.py"))
    assert len(files) > 10  # the scan sees the package
    bad = [f"{p.relative_to(ROOT)}:{line}: {mod}" for p in files for line, mod in _imported_modules(p)
           if mod == "fractal_models" or mod.startswith("fractal_models.")]
    assert not bad, "fractal_kernels imports the model layer above it:\n" + "\n".join(bad)


def test_the_scan_detects_an_upward_import(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("def g():\n    from fractal_models.mar import MAR\n    import fractal_models\n")
    assert [m for _, m in _imported_modules(f)] == ["fractal_models.mar", "fractal_models"]
