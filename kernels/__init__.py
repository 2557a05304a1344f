"""Causal linear attention kernels for qsf-jax, installed as ``qsf_jax.kernels``.

This folder lives at the repository top level (``kernels/``) and is mapped into
the project namespace by ``pyproject.toml`` (``package-dir``), so it is imported
as ``import qsf_jax.kernels`` and never as a top-level ``kernels`` package.

Public API::

  from qsf_jax.kernels import linear_attention
  o = linear_attention(q, k, v, log_decay, impl="auto")          # (B, T, H, Dv)
  o, S_T = linear_attention(q, k, v, initial_state=S_0, return_final_state=True)
  o = linear_attention(q, k, v, pallas_design="bv64_w8_s3_chunkbwd")  # a named design

computes o_t = sum_{s<=t} exp(G_t - G_s)(q_t . k_s) v_s + q_t^T exp(G_t) S_0
with G_t = sum_{r<=t} g_r (see ``qsf_jax.kernels.op`` for impls and numerics).
The benchmark runs as ``python -m qsf_jax.kernels.bench``.
"""

from .chunked_xla import chunked_linear_attention
from .designs import DEFAULT_DESIGN, PALLAS_DESIGNS, PallasDesign, resolve_design
from .op import IMPLS, linear_attention, resolve_impl
from .pallas_op import DEFAULT_BWD, DEFAULT_FWD, KernelConfig, pallas_linear_attention
from .reference import reference_linear_attention, scan_linear_attention

__all__ = [
    "IMPLS",
    "DEFAULT_BWD",
    "DEFAULT_DESIGN",
    "DEFAULT_FWD",
    "KernelConfig",
    "PALLAS_DESIGNS",
    "PallasDesign",
    "chunked_linear_attention",
    "linear_attention",
    "pallas_linear_attention",
    "reference_linear_attention",
    "resolve_design",
    "resolve_impl",
    "scan_linear_attention",
]
