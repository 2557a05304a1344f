"""Causal linear attention with optional scalar decay: the public op.

Per batch row b and head h, with log-decays g_t <= 0, G_t = sum_{r<=t} g_r and an
optional initial state S_0 (kernels spec §1.1, scale 1, no feature map):

  o_t = sum_{s<=t} exp(G_t - G_s) (q_t . k_s) v_s  +  q_t^T (exp(G_t) S_0)
  S_T = sum_s exp(G_T - G_s) k_s v_s^T  +  exp(G_T) S_0

i.e. the recurrence S_t = exp(g_t) S_{t-1} + k_t v_t^T, o_t = S_t^T q_t. With
g = 0 this is plain causal linear attention; a per-head constant g gives
RetNet-style retention; per-step g gives simple GLA / Mamba-2-style decay.
Feature maps, scaling and normalisers stay in the model layer.

Layout is (batch, time, heads, dim), as in ``jax.nn.dot_product_attention``.

Implementations (``impl=``):

| impl        | algorithm                                             | cost          | use                  |
| ----------- | ----------------------------------------------------- | ------------- | -------------------- |
| "reference" | quadratic masked form, global cumsum                  | O(T^2) memory | tests, tiny inputs   |
| "scan"      | token-by-token recurrence, ``lax.scan``               | O(T) serial   | ground truth, decode |
| "xla"       | chunked jnp: intra-chunk matmuls + chunk-state scan   | O(T C)        | CPU path, baseline   |
| "pallas"    | fused Triton kernels (fwd + bwd, ``custom_vjp``)      | O(T C)        | GPU; CPU with interpret=True |
| "auto"      | "pallas" on GPU (16/32-bit, D <= 256), else "xla"    |               | default              |

Numerics (spec §1.4): decay stays in log space with chunk-local cumsums; the
exponent is masked to -inf before the exp, so every evaluated exponent is <= 0
and nothing overflows; accumulation and states are float32 (float64 for float64
inputs); bf16/f16 inputs are used as matmul operands with float32 accumulation;
32-bit matmuls request IEEE precision (no TF32). Outputs come back in the input
dtype; the final state is float32 (float64 for float64 inputs).

Domain: g <= 0 (-inf allowed). A concrete log_decay with a NaN or a positive
entry is refused; traced values (under jit or grad) are not checked, and there a
positive g can overflow. The chunked impls ("xla", "pallas") raise g to ``decay_floor(dtype)``
(2 ln eps of the accumulation dtype: -31.9 for float32 accumulation, -72.1 for
float64) before the chunk-local cumsum. Crossing such a step scales a term by at
most e^{floor} = eps^2 instead of e^{g}, below the accumulation's resolution, and
-inf resets work. Without it a single reset g = -1e4 left every later exponent
of its chunk with an absolute error of eps * 1e4 (1e-3 relative error in
float32). The gradient of a clamped g is 0 (its true value is below e^{floor}
times the output scale). "reference" and "scan" use g as given.

"xla" forms each exponent as a segment sum, sum_{j<r<=i} g_r (Mamba-2's
``segsum``), and autodiff then gives each dg_r as a sum over the pairs that
step r decays. "pallas" forms the exponents as differences of chunk-local
cumsums, b_i - b_j, and dg, as in FLA, from q_t . dq_t - k_t . dk_t and a
reverse cumsum (kernels spec §1.3). That costs it accuracy in three places:
- the exponents of a chunk carry an absolute rounding error of about
  eps * |sum of g over the chunk so far|, so several floor-sized resets followed
  by weak decay in one chunk cost accuracy (float32, a 64-step chunk whose first
  8 or 32 steps are g = -30 and the rest g = -0.01: relative RMS error in o of
  1.3e-5 and 3.0e-5 for "pallas" in interpret mode, 1.2e-7 for "xla");
- the undecayed diagonal pairs (t, t) enter q_t . dq_t and k_t . dk_t at the
  size of the output and cancel only to rounding, so in a strongly decaying
  head (dg about e^{g} of the other gradients) that rounding dominates dg.
  ``pallas_linear_attention(..., decay_grad="pairs")`` (designs
  "bv64_w4_s2_pairs", "bv64_w8_s3_chunkbwd_pairs") leaves them out of both
  dot products and adds them to dq and dk afterwards;
- with a final-state cotangent, <S_T, dS_T> enters dG at the last step and the
  reverse cumsum cancels its undecayed last pair against k_T . dk_T in the
  same way (with either form).
Measured (float32, B=1, T=256, H=4, Dk=Dv=16, chunk 64, an initial state, g
constant per head at -0.1, -2, -5, -8, interpret mode; relative RMS error of each
head's dg against float64): without a final-state cotangent, 9.9e-7, 3.1e-6,
1.5e-4, 1.1e-3 ("difference") and 1.4e-6, 3.4e-6, 1.0e-6, 2.2e-6 ("pairs");
with a random dS_T, 8.6e-7, 7.7e-6, 1.1e-4, 1.0e-3 and 5.9e-7, 3.1e-6, 2.4e-5,
1.4e-4; "xla" and "scan" 1.3e-7 to 2.6e-7 in both. Training through the output
alone has no final-state cotangent.

float16 inputs run "xla" and "pallas" in float32 (the output is cast back):
their chunk states are matmul operands and can exceed float16's range (65504)
while the output does not.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from qsf_jax import _checks

from . import _validate
from ._validate import decay_floor  # noqa: F401 (public: op.decay_floor)
from .chunked_xla import chunked_linear_attention
from .designs import PallasDesign, resolve_design
from .pallas_op import pallas_linear_attention
from .reference import reference_linear_attention, scan_linear_attention

IMPLS = ("auto", "reference", "scan", "xla", "pallas")
_PALLAS_DTYPES = ("float16", "bfloat16", "float32")


_PALLAS_MAX_HEAD_DIM = 256  # larger fp32 (Dk, BV) states would not fit in registers


def resolve_impl(impl: str, dtype, *, head_dim: int = 0, chunk_size: int = 64) -> str:
  """Maps ``impl`` to a concrete impl; "auto" is "pallas" only where the kernels apply.

  Args:
    impl: one of ``IMPLS``.
    dtype: the q/k/v dtype.
    head_dim: the larger of Dk and Dv.
    chunk_size: the requested chunk.

  Returns:
    "pallas" for "auto" on a GPU backend with float16/bfloat16/float32 inputs,
    head dims <= 256 and a power-of-two chunk >= 16; "xla" for any other "auto";
    ``impl`` itself otherwise.
  """
  _checks.check_choice("impl", impl, IMPLS)
  if impl != "auto":
    return impl
  pallas_ok = (jax.default_backend() == "gpu"
               and str(jax.numpy.dtype(dtype)) in _PALLAS_DTYPES
               and head_dim <= _PALLAS_MAX_HEAD_DIM
               and isinstance(chunk_size, int) and chunk_size >= 16
               and not chunk_size & (chunk_size - 1))
  return "pallas" if pallas_ok else "xla"


@functools.partial(jax.jit, static_argnames=("impl", "chunk_size", "interpret",
                                             "return_final_state", "design"))
def _run(q, k, v, log_decay, initial_state, *, impl, chunk_size, interpret,
         return_final_state, design: PallasDesign):
  """Jitted dispatch; returns (o, S_T), with S_T None unless requested."""
  # "xla" and "pallas" raise g to decay_floor themselves (_validate.floor_log_decay).
  if impl in ("xla", "pallas"):
    if q.dtype == jnp.float16:  # float16 states overflow; run in float32
      o, S_T = _run(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32),
                    log_decay, initial_state, impl=impl, chunk_size=chunk_size,
                    interpret=interpret, return_final_state=return_final_state,
                    design=design)
      return o.astype(q.dtype), S_T
  if impl == "pallas":
    return pallas_linear_attention(q, k, v, log_decay, initial_state, chunk_size=chunk_size,
                                   interpret=interpret,
                                   return_final_state=return_final_state, **design.kwargs())
  if impl == "reference":
    o, S_T = reference_linear_attention(q, k, v, log_decay, initial_state)
  elif impl == "scan":
    o, S_T = scan_linear_attention(q, k, v, log_decay, initial_state)
  else:
    o, S_T = chunked_linear_attention(q, k, v, log_decay, initial_state,
                                      chunk_size=chunk_size)
  return o, (S_T if return_final_state else None)


def linear_attention(q, k, v, log_decay=None, *, initial_state=None,
                     return_final_state=False, chunk_size=64, impl="auto",
                     interpret=False, pallas_design="default"):
  """Causal linear attention with optional per-step scalar decay.

  Kernels spec §1.1: o_t = sum_{s<=t} exp(G_t - G_s)(q_t . k_s) v_s
  + q_t^T exp(G_t) S_0 and S_T = sum_s exp(G_T - G_s) k_s v_s^T + exp(G_T) S_0,
  with G_t = sum_{r<=t} g_r (see the module docstring for impls and numerics).
  Differentiable in q, k, v, log_decay and initial_state: reverse mode (grad,
  vjp, jacrev) for every impl; forward mode (jvp, jacfwd, hessian) for
  "reference", "scan" and "xla" only. "pallas" runs its own backward kernels
  (a ``jax.custom_vjp``), through which JAX cannot push tangents ("can't apply
  forward-mode autodiff (jvp) to a custom_vjp function"); since impl="auto" is
  "pallas" on a GPU, pass impl="xla" there for forward mode.

  Args:
    q: queries (B, T, H, Dk), float16/bfloat16/float32/float64.
    k: keys (B, T, H, Dk), same dtype as q.
    v: values (B, T, H, Dv), same dtype as q.
    log_decay: per-step log-decays g <= 0 (B, T, H), any float dtype; None
      means no decay (g = 0).
    initial_state: state S_0 entering the sequence (B, H, Dk, Dv), e.g. the
      final state of a previous call; None means zeros.
    return_final_state: also return S_T, for chunked prefill and decoding.
    chunk_size: chunk length C for "xla" and "pallas" (a power of two >= 16
      for "pallas"); T need not be a multiple of it.
    impl: "auto", "reference", "scan", "xla" or "pallas".
    interpret: run the Pallas kernels in interpret mode (CPU); only used by
      impl="pallas".
    pallas_design: how the Pallas kernels run (launch parameters, fused or
      chunked forward and backward): "default", a name in
      ``designs.PALLAS_DESIGNS``, or a benchmark name ``c{chunk_size}_{design}``
      (``python -m qsf_jax.kernels.bench`` prints them). Every design computes
      the same function within the dtype's tolerance, not to the bit: with
      bf16 inputs the segmented designs (``num_segments > 1``) build each
      segment's state from decay-scaled keys rounded to bf16
      (``segments.entering_states``, as "xla" does; final-state relative RMS
      error 7e-4 against 9e-7 at B1 T256 H2 D32). Only used where impl
      resolves to "pallas", but checked always.

  Returns:
    o (B, T, H, Dv) in the input dtype, or (o, S_T) with S_T (B, H, Dk, Dv)
    in float32 (float64 for float64 inputs) if ``return_final_state``.

  Raises:
    ValueError: for bad shapes or dtypes (naming the argument and shapes), an
      unknown impl or pallas_design, a bad chunk_size, or float64 input with
      impl="pallas".
      (impl="pallas" without interpret=True on CPU fails in ``pallas_call``;
      exporting it for CUDA from a CPU host works, see ``lowering``.)
  """
  q, k, v, log_decay, initial_state = _validate.validate_inputs(
      q, k, v, log_decay, initial_state)
  return_final_state = _checks.check_flag("return_final_state", return_final_state)
  interpret = _checks.check_flag("interpret", interpret)
  chunk_size = _validate.check_chunk_size(chunk_size, power_of_two=False)
  impl = resolve_impl(impl, q.dtype, head_dim=max(q.shape[-1], v.shape[-1]),
                      chunk_size=chunk_size)
  _validate.check_chunk_size(chunk_size, power_of_two=impl == "pallas")
  design = resolve_design(pallas_design, chunk_size)
  if impl == "pallas" and str(q.dtype) not in _PALLAS_DTYPES:
    raise ValueError(
        f"impl='pallas' supports q/k/v dtypes {list(_PALLAS_DTYPES)}, got {q.dtype} "
        f"(q shape {tuple(q.shape)}); use impl='xla' or 'reference' for float64")
  if q.shape[0] == 0 or q.shape[2] == 0:
    impl = "xla"  # nothing to launch kernels for; the jnp form handles empty axes
  o, S_T = _run(q, k, v, log_decay, initial_state, impl=impl, chunk_size=chunk_size,
                interpret=interpret, return_final_state=return_final_state,
                design=design)
  return (o, S_T) if return_final_state else o
