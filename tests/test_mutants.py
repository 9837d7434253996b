"""Self-test of the mutation runner (:mod:`benchmarks.mutants`, issue #27 item 5), the part CI runs.

On a tiny ``@triton.jit`` kernel written to tmp_path with a one-test file: the site enumeration finds every
operator kind, skips the barrier, the annotations and the GPU-only branch; a planted mutant is killed, an
equivalent one survives (and is scored as equivalent only when the table names it). About 20 s: three pytest
runs of one interpreted kernel.
"""
import ast
import pathlib
import textwrap

import pytest

from benchmarks import mutants
from benchmarks.mutant_sites import find_sites

KERNEL = textwrap.dedent('''\
    import triton
    import triton.language as tl


    @triton.jit
    def add_one(x_ptr, y_ptr, n, BLOCK: tl.constexpr, DOT16: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        x = tl.load(x_ptr + offs, mask=offs < BLOCK, other=0.0)  # always true: dropping it is equivalent
        tl.debug_barrier()
        if DOT16 == 2:
            y = x + 1.0
        else:
            y = x * 3.0
        y = tl.where(offs < n, y, 0.0)
        tl.store(y_ptr + offs, y)


    def not_a_kernel(a):
        return a + 1
''')

TEST = textwrap.dedent('''\
    import torch
    from tinykern import add_one


    def test_add_one():
        x = torch.arange(16, dtype=torch.float32)
        y = torch.full((16,), -1.0)
        add_one[(1,)](x, y, 12, BLOCK=16, DOT16=2)
        assert torch.equal(y, torch.where(torch.arange(16) < 12, x + 1, 0.0))
''')


def _sites():
    return find_sites(KERNEL, "tinykern.py")


def _line(text):
    return next(i for i, ln in enumerate(KERNEL.splitlines(), 1) if text in ln)


def _one(sites, line_text, kind):
    (s,) = [s for s in sites if s.line == _line(line_text) and s.kind == kind]
    return s


def test_sites_cover_every_operator_and_skip_barriers_annotations_and_gpu_branches():
    sites = _sites()
    assert {s.kind for s in sites} == {"binop", "cmp", "int", "float", "where", "mask"}
    assert {s.func for s in sites} == {"add_one"}  # plain functions are not Triton's
    assert not [s for s in sites if s.line in (_line("debug_barrier"), _line("def add_one"))]
    gpu = {(s.line, s.desc) for s in sites if s.gpu_only}
    assert gpu == {(_line("x * 3.0"), "* -> /"), (_line("x * 3.0"), "3.0 -> 6.0")}
    where = _one(sites, "tl.where", "where")
    assert "tl.where(offs < n, 0.0, y)" in where.apply(KERNEL)
    mask = _one(sites, "tl.load", "mask")
    assert "x = tl.load(x_ptr + offs)  # always" in mask.apply(KERNEL)
    assert _one(sites, "tl.arange(0, BLOCK)", "int").replacement == "1"
    assert len({s.sid for s in sites}) == len(sites)
    assert all(ast.parse(s.apply(KERNEL)) for s in sites)  # every mutant is still Python
    # the sample never draws a GPU-only site, and it is reproducible
    picked = mutants.sample_sites(sites, "tiny", 100, seed=1)
    assert len(picked) == len(sites) - len(gpu) and not any(s.gpu_only for s in picked)
    assert mutants.sample_sites(sites, "tiny", 3, seed=1) == mutants.sample_sites(sites, "tiny", 3, seed=1)


def test_planted_mutant_is_killed_and_an_equivalent_one_survives(tmp_path: pathlib.Path):
    (tmp_path / "tinykern.py").write_text(KERNEL)
    (tmp_path / "test_tiny.py").write_text(TEST)
    fam = mutants.Family("tiny", "tinykern.py", ("test_tiny.py",))
    sites = _sites()
    planted = _one(sites, "y = x + 1.0", "binop")  # + -> -
    equivalent = _one(sites, "tl.load", "mask")
    reason = {equivalent.sid: "the mask is offs < BLOCK over tl.arange(0, BLOCK): always true"}
    entry = mutants.run_family(fam, root=tmp_path, only=[planted, equivalent], equivalent=reason,
                               log=lambda *_: None)
    status = {r["id"]: r["status"] for r in entry["mutants"]}
    assert status == {planted.sid: "killed", equivalent.sid: "equivalent"}
    assert entry["score"] == 1.0 and entry["equivalent"] == 1
    # the same survivor without its table entry is a survivor, and scores against the family
    entry = mutants.run_family(fam, root=tmp_path, only=[equivalent], equivalent={}, log=lambda *_: None)
    assert entry["survived"] == 1 and entry["score"] == 0.0
    assert (tmp_path / "tinykern.py").read_text() == KERNEL  # the real file is never touched


def test_baseline_must_pass(tmp_path: pathlib.Path):
    (tmp_path / "tinykern.py").write_text(KERNEL.replace("x + 1.0", "x + 2.0"))
    (tmp_path / "test_tiny.py").write_text(TEST)
    fam = mutants.Family("tiny", "tinykern.py", ("test_tiny.py",))
    with pytest.raises(RuntimeError, match="baseline must pass"):
        mutants.run_family(fam, root=tmp_path, only=[], log=lambda *_: None)


def test_every_family_has_enough_sites_and_a_selection():
    for name, fam in mutants.FAMILIES.items():
        source = (mutants.REPO / fam.kernel).read_text()
        sites = [s for s in find_sites(source, fam.kernel) if not s.gpu_only]
        assert len(sites) >= mutants.SAMPLE, name
        assert all((mutants.REPO / t.split("::")[0]).exists() for t in fam.tests if "_mutants.py" not in t), name
        for sid in mutants.EQUIVALENT:  # an equivalence entry must still name a site of its file
            if sid.startswith(fam.kernel + ":"):
                assert sid in {s.sid for s in sites}, sid
