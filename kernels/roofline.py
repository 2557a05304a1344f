"""FLOP and byte model of chunked linear attention, and a small roofline.

Ported from the kernels spec's ``roofline.py`` and §7 formulas. Per (batch,
head), sequence T, key dim K, value dim V, chunk C; matmul FLOPs are 2 M N K,
elementwise work is ignored; activations have ``elem_bytes`` bytes per element
(2 for bf16), the log-decay and its gradient 4:

  F_fwd = 2 T [C (K + V) + 2 K V]        (Q K^T, A V, Q S, K^T V)
  F_bwd = 6 T C (K + V) + 10 T K V       (about 2.5-3x the forward)
  B_fwd = e T (2K + 2V) + 4 T            read q, k, v, g; write o (state on chip)
  B_bwd = e T (2K + 2V) + e T (2K + V) + 8 T   read q, k, v, do; write dq, dk, dv; g, dg

Causal softmax attention (the anchor): F = 2 B H T^2 D forward (half of
4 B H T^2 D), backward 2.5x the forward (FlashAttention's count).

The achieved fraction of the roofline is t_floor / t_measured with
t_floor = max(bytes / bandwidth, flops / peak).
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class DevicePeak:
  """Ceilings of one accelerator.

  Attributes:
    flops: dense bf16 matmul throughput (FLOP/s).
    bandwidth: HBM bandwidth (bytes/s).
    source: where the numbers come from.
  """
  flops: float
  bandwidth: float
  source: str


# H100: measured on the project's H100 SXM (8192^3 bf16 GEMM; D2D copy), spec §7.
# H200: vendor data sheet (dense bf16, HBM3e), not measured here.
PEAKS = {
    "H100": DevicePeak(800e12, 3.0e12, "measured (kernels spec §7)"),
    "H200": DevicePeak(989e12, 4.8e12, "data sheet"),
}


# Variants whose ceilings differ from the SXM cards of ``PEAKS`` (lower clocks or
# power, other memory): unknown rather than wrong.
OTHER_VARIANTS = ("PCIe", "NVL")


def device_peak(device_kind: str) -> DevicePeak | None:
  """The ceilings for a ``jax.Device.device_kind``, or None when unknown (e.g. CPU).

  Only the SXM cards of ``PEAKS`` are known: an "H100 PCIe" or "H100 NVL" gives None.
  """
  if any(v in device_kind for v in OTHER_VARIANTS):
    return None
  for key, peak in PEAKS.items():
    if key in device_kind:
      return peak
  return None


def fwd_flops(B, H, T, K, V, C):
  """F_fwd = B H 2 T [C (K + V) + 2 K V] (spec §7)."""
  return B * H * 2 * T * (C * (K + V) + 2 * K * V)


def bwd_flops(B, H, T, K, V, C):
  """F_bwd = B H [6 T C (K + V) + 10 T K V] (spec §7)."""
  return B * H * (6 * T * C * (K + V) + 10 * T * K * V)


def fwd_bytes(B, H, T, K, V, C, *, elem_bytes=2, materialise_h=False, h_bytes=2):
  """B_fwd = B H [e T (2K + 2V) + 4 T (+ 2 (T/C) K V h_bytes)] (spec §7)."""
  qkvo = elem_bytes * T * (2 * K + 2 * V)
  h = 2 * (T // C) * K * V * h_bytes if materialise_h else 0
  return B * H * (qkvo + 4 * T + h)


def bwd_bytes(B, H, T, K, V, C, *, elem_bytes=2, grads_f32=False):
  """B_bwd = B H [e T (2K + 2V) + e' T (2K + V) + 8 T], e' = 4 for f32 grads (spec §7)."""
  del C  # the minimal-bytes model does not depend on the chunk
  ins = elem_bytes * T * (2 * K + 2 * V)
  outs = (4 if grads_f32 else elem_bytes) * T * (2 * K + V)
  return B * H * (ins + outs + 8 * T)


def softmax_causal_flops(B, H, T, D, *, backward=False):
  """Causal softmax attention: 2 B H T^2 D forward, 2.5x that for the backward."""
  f = 2 * B * H * T * T * D
  return f * 2.5 if backward else f


def softmax_bytes(B, H, T, D, *, elem_bytes=2, backward=False):
  """Minimal HBM traffic of fused attention: q, k, v, o (+ do, dq, dk, dv)."""
  return B * H * T * D * elem_bytes * (8 if backward else 4)


def roofline_fraction(flops, nbytes, seconds, peak: DevicePeak | None):
  """t_floor / t_measured, t_floor = max(bytes / bandwidth, flops / peak); None if unknown."""
  if peak is None or seconds <= 0:
    return None
  return max(nbytes / peak.bandwidth, flops / peak.flops) / seconds
