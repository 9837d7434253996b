"""Kernel launches and host<->device syncs per image of ``generate``, counted exactly on a CPU, plus a labelled
roofline MODEL (FLOPs, bytes, hardware floors, a launch term) for the five published configs.

``python -m benchmarks.launches`` writes ``benchmarks/results/launches/launches.{json,md,png}``;
``--tiny`` runs the three tiny configs only (what CI runs, a few minutes).

How a launch is counted (one classification, :func:`classify`, tested on small programs in
``tests/test_launches.py``):

* The run executes on the CPU under two modes. A ``TorchDispatchMode`` sees every ATen op *after* the
  composite decompositions PyTorch makes on every device (``aten::linear`` reaches it as ``t`` + ``addmm``,
  ``layer_norm`` as ``native_layer_norm``, ``softmax`` as ``_softmax``, ``matmul`` as views + ``bmm``), i.e.
  at the level where a backend kernel runs; each op there is classified:

  - ``NON_LAUNCHING``: views, metadata and allocations (view, reshape aliases, expand, t, transpose, permute,
    select, slice, as_strided, unsqueeze, squeeze, unbind, split, detach, alias, empty*, lift_fresh, ...): 0.
  - ``CUDA_MULTI``: ops whose CUDA implementation launches several kernels or synchronises, from the ATen
    sources (``multinomial`` with one sample: the ``max``/``min`` validity check and the zero-row check, each
    read with ``.item()``, then ``exponential_``, ``div``, ``argmax``: 11 kernels, 2 D2H copies, 2 syncs;
    ``nonzero``: count, D2H copy of the count + sync, select; ``constant_pad_nd``: fill + copy; ``sort`` on a
    row of <= 4096: copy + in-place sort; ``_local_scalar_dense`` (``item``, ``bool``, ``int`` of a tensor):
    a D2H copy + sync; ...).
  - ``index``/``index_put_`` with a boolean index add a ``nonzero`` (data-dependent shape: a sync).
  - every other ATen op: **one launch** (pointwise, reduction, GEMM, copy, fill, RNG). A cuBLAS GEMM is
    counted as one launch (split-K or a separate bias copy can add one on some shapes: the count is then a
    lower bound for GEMMs). An op whose outputs are all empty launches nothing (TensorIterator/GEMM early
    exits).
  - ops of our custom namespace (``fractal_kernels::``): their Python implementation is re-run under the mode,
    so what counts is what they launch -- the ATen ops of their launcher (usually none: ``contiguous`` of
    contiguous tensors, ``empty``) plus one launch per Triton kernel call (``kernel[grid](...)``, hooked at the
    Triton launcher, named ``triton:<kernel>``). What the Triton interpreter does inside a kernel is not counted.

* Functions that PyTorch decomposes on a CPU but runs as one fused kernel on CUDA are counted at the
  ``TorchFunctionMode`` level (``CUDA_FUSED_FUNCTIONS``: ``F.rms_norm`` -> ``_fused_rms_norm``, one kernel on
  CUDA builds of torch >= 2.9, a decomposition on the CPU build).

* Host vs device. The run stands in for a CUDA run with the model on the GPU: a tensor is *host* when the
  code would leave it on the CPU there -- made by a factory without ``device=`` (``torch.rand(B, L)`` for the
  MAR orders from the CPU generator, ``torch.randint`` seeds), moved with ``.cpu()``, a plain tensor attribute
  of a module (the pixel head's mean/std, the AR RoPE table: not moved by ``model.to``), or computed from
  host tensors only. Host ops launch nothing. ``.to(<device>)`` / ``torch.tensor(..., device=)`` of host data is
  one H2D copy and a sync (PyTorch's blocking copies call ``cudaStreamSynchronize``; ``non_blocking=True``: no
  sync); ``.cpu()``/``.tolist()``/``.numpy()``/``item`` of device data are one D2H copy and a sync. Copies
  count as launches (``memcpy_h2d``/``memcpy_d2h``: stream work with a launch's host cost) and are also
  reported alone. Premise: every explicit device argument in the model code means the model's device.

* Syncs: D2H reads (``item``/``bool``/``int``/``tolist``/``.cpu()``), blocking H2D copies, and the
  data-dependent shapes (``nonzero``, boolean indexing, ``masked_select``, ``unique``, ``repeat_interleave``
  without ``output_size``).

Exact for the published configs without running them at full width, reductions each tested exactly:

1. **Narrow clones** (:func:`narrow_clone`): the same levels, patch grids, depths, steps, condition counts,
   guiding pixels and head counts, every head 8 wide (the MAR guiding-pixel heads, 128 wide in the model, too).
   No code path branches on the width or the head dim (the kernels pad the head dim to a power of two inside;
   the pixel-head kernel takes 16..128 wide heads alike); the head count does matter (one head makes some
   reshapes views), so it is kept. Each level's ``fused_stack`` is pinned to what the width rule decides at
   the original width (:func:`pin_fused_stacks`: a clone fuses the levels its original fuses, and no other).
   Test: a clone and its original give identical counts (tiny configs, also with a lowered width limit).
2. **Memoised sub-level calls** (``memo=True``): every call below level 0 (a level's ``sample``, a pixel head's
   ``sample``) with the same structural key (level, rows, guided or not, cfg type, schedule, settings) launches
   the same ops, so it is executed once per key and replayed (its counts added again) afterwards. Test: memo
   on == memo off, exactly, on the tiny configs, reference loop and fast engine.
   And **count-only kernels** (``execute_kernels=False``): a Triton launch is recorded and its body skipped
   (the custom op's outputs are zero-filled: valid pixel ids), since nothing downstream branches on values.
   Test: executed == count-only on the tiny configs.

3. **Depth**: every generator level is counted 1 and 2 blocks deep and extrapolated to its depth
   (:func:`combine_depths`: a level's own counts are affine in its own depth).
4. **Batch**: the published configs are counted at batch 1; launches/copies/syncs per batch do not depend on
   the batch (:func:`at_batch`), so a batch-B row is the batch-1 count / B per image.

The first call of a model builds a few per-module tables (the MAR step tables, the pixel heads' packed
weights); the counted call is the second (steady state), the first call's extra launches are reported apart.

The package, by layer: :mod:`.classification` (which op launches what; host tensors; the counters),
:mod:`.hooks` (the dispatch/function modes and the Triton hook: :func:`counting`), :mod:`.models` (the levels,
narrow clones, :func:`count_generate`), :mod:`.roofline_model` (the MODEL), :mod:`.runs` (one config's counts,
the extrapolations, the published run's pieces), :mod:`.tables` (the document, markdown, plot, lever analysis),
:mod:`.cli` (``main``). Everything is importable from the package itself, as before the split.
"""
from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # the kernel backend on a CPU: before triton is imported

from .classification import (BOOL_INDEX_OPS, CUDA_FUSED_FUNCTIONS, CUDA_MULTI, CUSTOM_NAMESPACES,  # noqa: E402
                             FACTORIES, HOST_DEVICE, NON_LAUNCHING, SYNC_KINDS, Counts, _DATA_FACTORIES,
                             _FACTORY_NAMES, _HOST, _OP_NAMES, _REAL_DEVICE, _device_property, _is_host_device,
                             _mark_host, _tensors, classify, is_host, op_name)
from .hooks import (_ACTIVE, _DispatchCounter, _FunctionCounter, _patch_triton, _State,  # noqa: E402
                    counting)
from .models import (_host_attributes, _levels, _narrow_width, _skey, count_generate, instrumented,  # noqa: E402
                     narrow_clone, one_thread, pin_fused_stacks, summarize_counts)
from .roofline_model import (BYTES, CALIBRATION, HARDWARE, LAUNCH_COST_S, SCORE_BYTES_REF,  # noqa: E402
                             SYNC_COST_S, _block_shapes, _linear_params, _params, floors, predict_s_per_image,
                             roofline)
from .runs import (PUBLISHED, SAMPLING, TINY, assemble_jobs, at_batch, combine_depths, job_file,  # noqa: E402
                   level_depths, published_jobs, run_config, run_job, run_jobs)
from .tables import (BLOCK_LAUNCHES, _fmt, _level_order, _si, build_document, lever_analysis,  # noqa: E402
                     markdown, plot, timing_note)
from .cli import main  # noqa: E402
