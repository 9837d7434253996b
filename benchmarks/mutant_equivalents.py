"""Survivors of :mod:`benchmarks.mutants` that no test can kill, keyed by ``Site.sid``, each with the reason (at most
10 % of a family's sample): the table the runner scores survivors against."""

EQUIVALENT: dict = {
    "fractal_kernels/ops/pixel_cross_entropy/kernels.py:_ce_rows_kernel:afeb7387:tl.load: drop mask=, other=:0":
        "targets of rows >= M only feed `valid` (and-ed with rmask), `hit` and `bad`, whose every use is masked by "
        "rmask / m2 (loss store, x_t, the gradient store): the results are the same; what remains is an "
        "out-of-bounds read, which the interpreter does not trap (a GPU would read past the tensor silently too)",
    "fractal_kernels/ops/mar_stack/kernels.py:_ln_rows:c2b29332:tl.load: drop mask=, other=:0":
        "the LayerNorm weight of columns >= D only reaches y's columns >= D, whose store is masked by m (cmask): "
        "same results; what remains is a read past the weight row, which the interpreter does not trap",
    "fractal_kernels/ops/mar_stack/kernels.py:_linear:81dc2426:tl.load: drop mask=, other=:0":
        "the bias of columns >= N only reaches acc's columns >= N, whose store (and residual load) is masked by "
        "nm: same results; what remains is a read past the bias row, which the interpreter does not trap",
    "fractal_kernels/ops/ar_stack/kernels.py:_ar_stack_decode_kernel:5f604b10:tl.load: drop mask=, other=:0":
        "the residual of columns >= D (the o-projection's accumulator start) only reaches acc's columns >= D, "
        "whose store is masked by nm: same results; the read stays inside the program's scratch (sA follows sH)",
    "fractal_kernels/ops/ar_stack/kernels.py:_ar_stack_decode_kernel:affd9799:tl.load: drop mask=, other=:0":
        "the final LayerNorm weight of columns >= D only reaches y's columns >= D, whose store is masked by "
        "rmask & cm: same results; what remains is a read past nf_w, which the interpreter does not trap",
    "fractal_kernels/ops/pixel_head/kernels.py:_dot:642e4842:== -> !=:0":
        "equivalent under the interpreter (DOT16 == 2): a 16-bit a with 16-bit w now takes the split, whose mid "
        "and lo terms are exact zeros; an fp32 a now takes the fp32 dot of a and w, the same exact products the "
        "three-term split (exact at 24 bits) sums, in another order (fp32 rounding only). Only a GPU tells them "
        "apart (DOT16 == 1: an fp32 operand in a 16-bit tensor-core dot)",
    "fractal_kernels/ops/pixel_head/kernels.py:_sample_pixels:35ab1b15:& -> |:0":
        "the divisor differs only for rows without a finite logit (e is all zeros there: 0 / 0 = NaN instead of "
        "0) and for padding pixels; the kernel never outputs probabilities, such a row's id is forced to -1 "
        "(idx = where(valid, ...)) and padding pixels are never stored: the outputs are the same",
    "fractal_kernels/ops/skinny_linear/kernels.py:_skinny_linear_kernel:6167aff4:0.0 -> 1.0:0":
        "the RMSNorm weight's fill past K multiplies x's fill there, 0 (loaded under the K mask): any finite fill "
        "gives the same normalised input",
    "fractal_kernels/ops/skinny_linear/kernels.py:_skinny_linear_kernel:ee65452a:0.0 -> 1.0:0":
        "x's fill past K meets the weight's, loaded under the same K mask with fill 0: the products stay 0",
    "fractal_kernels/ops/skinny_linear/kernels.py:_skinny_linear_kernel:7622f3ca:0.0 -> 1.0:0":
        "the weight's fill past K meets x's, loaded under the same K mask with fill 0: the products stay 0",
    "fractal_kernels/ops/skinny_linear/kernels.py:_skinny_linear_kernel:7ddf2a6b:0.0 -> 1.0:0":
        "the gate's fill past K meets x's, loaded under the same K mask with fill 0: the products stay 0",
    "fractal_kernels/ops/fused_linear/kernels.py:_fused_linear_kernel:6167aff4:0.0 -> 1.0:0":
        "the LayerNorm weight's fill past K enters the normalised input only at k >= K, where the weight tile is "
        "loaded as 0: any finite fill gives the same products",
    "fractal_kernels/ops/fused_linear/kernels.py:_fused_linear_kernel:4846f680:0 -> 1:0":
        "equivalent under the interpreter: fp32 weights then take the other branch's plain tl.dot, which the "
        "interpreter computes in fp32 as the ieee dot does; only a GPU tells them apart (TF32 there)",
    "fractal_kernels/ops/fused_linear/kernels.py:_fused_linear_kernel:55c968a6:0.0 -> 1.0:0":
        "the LayerNorm bias's fill past K enters the normalised input only at k >= K, where the weight tile is "
        "loaded as 0: any finite fill gives the same products",
    "fractal_kernels/ops/tiny_attention/kernels.py:_load_rope_rows:8a6c722d:0.0 -> 1.0:0":
        "x's masked-off entries are only used in _rope as x * cos + sign * partner * sin, with cos and sin "
        "loaded under the same mask m and other=0.0 (partner too): the rotated value there is 0 whatever x's "
        "fill, so the outputs are the same",
    "fractal_kernels/ops/tiny_attention/kernels.py:_attn_bwd_dq_kernel:10f7d958:< -> <=:0":
        "q_ok = (offs_m < L) & (offs_m < klen): with klen <= L (L itself, or seqlens checked against L) the "
        "second clause decides alone; with an unchecked klen > L (CUDA without host checks) row L's dq is still "
        "never stored (the store's mask is offs_m < L): the outputs are the same",
    "fractal_kernels/ops/tiny_attention/kernels.py:_attn_bwd_dq_kernel:aade1b2c:0.0 -> 1.0:0":
        "delta of a row outside q_ok only enters ds = p * (dp - delta) * scale, where p is 0 (valid includes "
        "q_ok) and dp is 0 (do loaded under q_ok): ds is 0 whatever the fill, the outputs are the same",
    "fractal_kernels/ops/tiny_attention/kernels.py:_attn_fwd_kernel:e5758995:== -> !=:0":
        "the causal key bound hi: streaming programs (GROUPS == 1) now scan every key block, whose keys past the "
        "diagonal the causal mask zeroes anyway; packed programs (mb = 0, BLOCK_M >= LK) get min(LK, BLOCK_M) = "
        "LK, their bound before: more work, the same outputs",
    "fractal_kernels/ops/pixel_head/phased_kernels.py:_pixel_head_phased_kernel:6b5efbcf:+ -> -:0":
        "write_values is 0 or 1: pix * 0 - write_values is 0 or -1, != 0 exactly when pix * 0 + write_values is "
        "(the flag's sign never mattered): the same mask",
}
