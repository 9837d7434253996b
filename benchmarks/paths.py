"""Where the suite writes: ``benchmarks/results/`` in a source checkout (committed with the code), else
``./fractal-bench-results/`` (an installed ``fractal_bench`` must not write into site-packages)."""
from __future__ import annotations

import os

PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


def in_checkout() -> bool:
    """True when this suite runs from the repo's ``benchmarks/`` folder (a checkout or an editable install)."""
    return os.path.basename(PACKAGE_DIR) == "benchmarks" and os.path.isfile(
        os.path.join(os.path.dirname(PACKAGE_DIR), "setup.py"))


def results_root() -> str:
    """The folder that holds ``<device-slug>/<mode>.{json,md,png}``."""
    if in_checkout():
        return os.path.join(PACKAGE_DIR, "results")
    return os.path.abspath("fractal-bench-results")
