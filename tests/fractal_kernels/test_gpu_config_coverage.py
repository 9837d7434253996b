"""The GPU-configuration tests leave no kernel out (issue #27, item 1): every case group of ``benchmarks.aot`` is
captured by ``tests/fractal_kernels/gpu_configs.py`` and every kernel those cases launch has its code-path fields
there, so each has a ``test_every_aot_configuration_is_exercised`` (in ``ops/test_*_gpu_configs.py``). A new
kernel or case group fails here until it gets one."""
from benchmarks import aot

from tests.fractal_kernels import gpu_configs


def test_every_aot_group_and_kernel_is_covered():
    assert {c.group for c in aot.cases()} == set(gpu_configs.GROUPS)
    assert gpu_configs.aot_kernels() == set(gpu_configs.CODE_PATH)
