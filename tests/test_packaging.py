"""Packaging pieces testable from the checkout (the installed wheel itself: .ci/wheel_smoke.sh)."""
import ast
import pathlib

from fractal_kernels import dispatch, policy

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_suite_installs_as_fractal_bench_not_benchmarks():
    """setup.py maps the repo's benchmarks/ to the package fractal_bench; the suite imports itself relatively,
    so neither name is hard-coded inside it."""
    setup = (REPO / "setup.py").read_text()
    assert 'package_dir={"fractal_bench": "benchmarks"}' in setup
    assert '"fractal-bench=fractal_bench.cli:main"' in setup and '"benchmarks", "benchmarks.*"' not in setup
    for path in sorted((REPO / "benchmarks").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                assert node.module.split(".")[0] not in ("benchmarks", "fractal_bench"), (path.name, node.module)
            if isinstance(node, ast.Import):
                assert all(a.name.split(".")[0] not in ("benchmarks", "fractal_bench") for a in node.names), path.name


def test_checkout_results_stay_in_the_repo():
    from benchmarks import paths
    assert paths.in_checkout() and paths.results_root() == str(REPO / "benchmarks" / "results")


def test_promote_writes_what_the_overlay_decided_into_the_package_data(tmp_path, monkeypatch):
    from benchmarks import policy_data
    monkeypatch.setattr(policy, "PACKAGE_DIR", str(tmp_path / "pkg"))
    monkeypatch.setenv("FRACTAL_HOME", str(tmp_path / "home"))
    policy.write_document(policy.package_path(policy.VERIFIED), {"ops": ["tiny_attention"], "runs": {}})
    policy.write_document(policy.package_path(policy.CROSSOVER), {"A": {"bfloat16": {"64": 256}}})
    policy.write_document(policy.overlay_path(policy.VERIFIED),
                          {"ops": ["sample_logits"], "runs": {"tiny_attention": {"passed": False}}})
    policy.write_document(policy.overlay_path(policy.CROSSOVER), {"B": {"bfloat16": {"80": 192}}})
    try:
        before = policy.reload()
        assert len(policy_data.promote()) == 2
        (tmp_path / "home" / policy.VERIFIED).unlink()
        (tmp_path / "home" / policy.CROSSOVER).unlink()
        after = policy.reload()  # the package alone now decides as package + overlay did
        assert after.verified == before.verified == {"sample_logits"}
        assert after.crossover == before.crossover
        assert set(after.verified_source.values()) == {policy.package_path(policy.VERIFIED)}
    finally:
        monkeypatch.undo()
        dispatch.reload()


def test_supported_versions_declared_alike():
    """pyproject.toml's supported range, setup.py's lower bounds, the README's line and the docs' table say the same
    (issue 29)."""
    import re as _re
    root = pathlib.Path(__file__).resolve().parents[1]
    py = (root / "pyproject.toml").read_text()
    table = py.split("[tool.fractal_kernels.supported]", 1)[1].split("\n[", 1)[0]
    ranges = dict(_re.findall(r'^(torch|triton) = "([^"]+)"', table, _re.M))
    assert ranges == {"torch": ">=2.11,<2.14", "triton": ">=3.6,<3.10"}
    setup = (root / "setup.py").read_text()
    assert '"torch>=2.11"' in setup and '"triton>=3.6"' in setup
    readme = (root / "README.md").read_text()
    assert "torch 2.11–2.13" in readme and "3.6–3.9" in readme
    table = (root / "docs" / "getting-started.md").read_text()
    assert "**2.11 – 2.13**" in table and "**3.6 – 3.9**" in table
