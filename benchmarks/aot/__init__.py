"""Ahead-of-time resource report and gate: what the GPU compiler makes of every Triton launch the library does.

    python -m benchmarks.aot                 # full set, sm_90a + sm_80 -> benchmarks/results/aot/full.{json,md}
    python -m benchmarks.aot --ci            # the CI subset (CI_SUBSET)             -> .../ci.{json,md}
    python -m benchmarks.aot --ci --check    # + exit 1 listing every budget violation not in KNOWN_OVER_BUDGET
    python -m benchmarks.aot --docs          # summary.md (+ docs/benchmarks.md's aot-table block) from the latest results
    python -m benchmarks.aot --list          # the captured specializations only (seconds, nothing compiled)
    fractal-bench --aot [same options]

How: the public ops (tiny_attention*, their backward through autograd, tiny_attention_decode, sample_logits,
pixel_head_sample, pixel_cross_entropy / pixel_log_probs) run with ``backend="triton"`` on CPU tensors that
report ``device == cuda``, inside ``fractal_kernels._target.target_arch(arch)``; ``JITFunction.run`` records each
launch, bound by Triton's own binder for that target, instead of running it (:mod:`benchmarks.aot_capture`).
So when a launcher changes tiles, ``num_warps`` or ``num_stages`` per arch, this report sees it. Each unique
specialization is then compiled with ``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))``
(sm_90 compiles as sm_90a: Triton appends the "a" from capability 90 on, so wgmma is available) in a fresh
``TRITON_CACHE_DIR`` (cold), with ptxas's ``-v`` report, ``metadata.shared`` and the SASS (cuobjdump in the
wheel). Budgets are :data:`BUDGETS`; limits :data:`ARCHS`.

The gate (``tests/test_aot_gate.py``) compiles :data:`CI_SUBSET`. :data:`KNOWN_OVER_BUDGET` lists, per
(kernel, case, arch), the budgets that row breaks today; the target is an empty dict. The gate fails on any
violation not listed *and* on any listed one that no longer happens (stale), so the list hides nothing.

Seeded regression (to see the gate fail): ``FRACTAL_AOT_SEED_REGRESSION=decode_num_stages_3`` makes every decode
launch ``num_stages=3``; the general form is ``KERNEL[,CONSTEXPR=VALUE...]:OPTION=INT`` (e.g.
``_attn_fwd_kernel,DECODE=True,DOT_F32=False:num_stages=4``). ``FRACTAL_AOT_IGNORE_KNOWN=1`` checks as if
KNOWN_OVER_BUDGET were empty (what the gate will do once the kernel fixes are in).

The package, by layer: :mod:`.budgets` (budgets, limits, the gate's lists and checks), :mod:`.caselist` (the
cases and their capture), :mod:`.compiling` (cold compiles in worker processes; :func:`run`), :mod:`.report`
(JSON, markdown, the docs table), :mod:`.cli` (``main``). Everything is importable from the package itself, as
before the split.
"""
from __future__ import annotations

from .budgets import (ARCHS, BUDGETS, CI_SUBSET, KNOWN_OVER_BUDGET, REG_ALLOC_UNIT, SMEM_RESERVED_PER_CTA,
                      describe, gate_problems, known_over_budget, occupancy, row_key, violations)
from .caselist import (SEED_HI_LO, SEED_LO_SMALL, Case, _ar_block_stack_decode_cases, _attention_cases,
                       _mar_stack_cases, _parse_seed_regression, _pixel_head_cases, _pixel_head_weights,
                       _sampler_ce_cases, _spec_id, capture, cases)
from .compiling import (SCHEMA_VERSION, _PTXAS_REGS, _PTXAS_SPILL, _compile_job, _count, _cpu_seconds, _git,
                        _ptxas_versions, _warm_worker, compile_spec, disassemble, run)
from .report import (DOCS_PAGE, RESULTS_DIR, TABLE_END, TABLE_START, _atomic_write, _sig_short, known_literal,
                     latest_doc, markdown, summary_table, update_docs_table, write)
from .cli import main
