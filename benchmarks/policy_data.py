"""The dispatch policy files (``fractal_kernels.policy``): show them, or promote what a GPU run recorded in the
overlay into the package data of this checkout, to commit it.

    python -m benchmarks.policy_data show
    FRACTAL_HOME=/path/to/gpu-run/fractal_home python -m benchmarks.policy_data promote

``promote`` merges exactly as the loader applies an overlay (an op the overlay decides follows it; a device
entry of the overlay replaces the package's), so the checkout then decides as the GPU run did.
"""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from fractal_kernels import dispatch, policy


def promote() -> List[str]:
    written = []
    for name, merge in ((policy.VERIFIED, policy.merge_verified), (policy.CROSSOVER, policy.merge_crossover)):
        top, status = policy.read_document(policy.overlay_path(name))
        if top is None:
            print(f"{policy.overlay_path(name)}: {status}; {name} unchanged")
            continue
        base = policy.read_document(policy.package_path(name))[0]
        written.append(policy.write_document(policy.package_path(name), merge(base, top)))
    dispatch.reload()
    return written


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.policy_data", description=__doc__.split("\n\n")[0])
    p.add_argument("action", choices=("show", "promote"))
    args = p.parse_args(argv)
    if args.action == "promote":
        for path in promote():
            print(f"wrote {path}")
    print("\n".join(policy.describe()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
