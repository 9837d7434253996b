"""Install fractal-kernels. Pure Python by default; the CUDA extension (``fractal_kernels._C`` from
``csrc/``) is built only when CUDA is available or asked for:

    FRACTAL_KERNELS_BUILD_CUDA=1 pip install -e . --no-build-isolation   # force (nvcc + torch needed)
    FRACTAL_KERNELS_BUILD_CUDA=0 pip install -e .                        # never
"""
import glob
import os

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def cuda_extensions():
    flag = os.environ.get("FRACTAL_KERNELS_BUILD_CUDA", "auto").lower()
    if flag in ("0", "false", "no"):
        return [], {}
    sources = sorted(glob.glob(os.path.join("csrc", "**", "*.cu"), recursive=True)
                     + glob.glob(os.path.join("csrc", "**", "*.cpp"), recursive=True))
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:
        if flag in ("1", "true", "yes"):
            raise RuntimeError("FRACTAL_KERNELS_BUILD_CUDA=1 needs torch in the build environment: "
                               "pip install -e . --no-build-isolation")
        return [], {}
    wanted = flag in ("1", "true", "yes") or (torch.cuda.is_available() and CUDA_HOME is not None)
    if not wanted:
        return [], {}
    if not sources:
        print("fractal-kernels: no CUDA sources under csrc/ yet; nothing to build")
        return [], {}
    ext = CUDAExtension(
        name="fractal_kernels._C",
        sources=sources,
        include_dirs=[os.path.join(HERE, "csrc")],
        # no --use_fast_math: the kernels must match the reference's expf/logf to ~1e-6
        extra_compile_args={"cxx": ["-O3"],
                            "nvcc": ["-O3", "-lineinfo",
                                     "-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90a,code=sm_90a"]},
    )
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = cuda_extensions()
# The docs site (mkdocs.yml, docs/): pinned to the versions `mkdocs build --strict` was verified with, since a
# newer mkdocstrings/griffe can add warnings, which strict mode turns into failures.
DOCS_REQUIRES = ["mkdocs==1.6.1", "mkdocs-material==9.8.2", "mkdocstrings[python]==1.0.8", "mkdocstrings-python==2.0.11"]

setup(
    name="fractal-kernels",
    version="0.1.0",
    description="Kernels, models and benchmarks for fractal generative models (FractalGen)",
    long_description=open(os.path.join(HERE, "README.md"), encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    # The benchmark suite lives in the repo's benchmarks/ (``python -m benchmarks.cli`` in a checkout) but is
    # installed as ``fractal_bench``: a top-level ``benchmarks`` in site-packages would shadow, or be shadowed
    # by, any other project's. Its modules import each other relatively, so both names work.
    packages=find_packages(include=["fractal_kernels", "fractal_kernels.*", "fractal_models", "fractal_models.*"])
    + ["fractal_bench"] + ["fractal_bench" + p[len("benchmarks"):] for p in find_packages(include=["benchmarks.*"])],
    package_dir={"fractal_bench": "benchmarks"},
    # the C++ source of the CPU kernels is built on first use (fractal_kernels/cpu), and the dispatch reads its
    # policy data (fractal_kernels/policy.py): ship both with the package
    package_data={"fractal_kernels": ["cpu/*.cpp", "data/*.json"]},
    # torch: install the build for your machine first (CPU or CUDA). Supported and tested: torch 2.11-2.13 with
    # the Triton each ships, 3.6-3.9 (pyproject.toml [tool.fractal_kernels.supported]; README "Supported versions").
    # scipy: MAR training draws its mask ratios with scipy's truncnorm on numpy's RNG, as the reference does
    install_requires=["torch>=2.11", "numpy", "scipy", "tqdm"],
    extras_require={
        # the test extra carries the docs tools (tests/test_docs.py builds the site: mkdocs build --strict) and the
        # GPU session's per-test timeout / parallel runner (its dry run exercises them)
        "test": ["pytest", "pytest-benchmark", "hypothesis", "triton>=3.6", "pytest-timeout", "pytest-xdist"]
        + DOCS_REQUIRES,
        "bench": ["pytest-benchmark", "matplotlib"],
        "triton": ["triton>=3.6"],
        # demo data: the photos inside the scikit-image 0.26 wheel (read as files, nothing downloaded)
        "train": ["pillow", "scikit-image==0.26.0"],
        "docs": DOCS_REQUIRES,
    },
    entry_points={"console_scripts": ["fractalgen=fractal_models.cli:main", "fractal-bench=fractal_bench.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
