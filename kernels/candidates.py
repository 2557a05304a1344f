"""The benchmark's candidates: Pallas launch configurations and the work of a row.

A candidate is a chunk length C plus a named kernel design (``designs``); the
benchmark (``bench``), the GPU checks (``gpu_check``) and the register report
(``ptxas_report``) all name them ``c{C}_{design}``. ``row_work`` is the FLOP and
byte count (kernels spec §7) that turns a measured time into TFLOP/s, GB/s and a
fraction of the roofline.
"""

from __future__ import annotations

from typing import NamedTuple

from . import roofline
from .designs import DEFAULT_DESIGN, PALLAS_DESIGNS, PallasDesign
from .pallas_op import KernelConfig


class Candidate(NamedTuple):
  """One benchmarked configuration: the chunk, then the fields of a ``PallasDesign``."""
  chunk: int
  fwd: KernelConfig
  bwd: KernelConfig
  num_segments: int = 1  # two-level split of the sequence, see ``segments``
  backward: str = "fused"  # "fused" or "chunked", see ``pallas_bwd_chunked``
  forward: str = "fused"  # "fused" or "chunked", see ``pallas_fwd_chunked``
  split_sweeps: bool = False  # the backward's two sweeps in separate programs
  decay_grad: str = "difference"  # the backward's dG form, see ``pallas_linear_attention``

  def kwargs(self) -> dict:
    """The keyword arguments of ``pallas_linear_attention`` for this candidate."""
    return dict(chunk_size=self.chunk, **PallasDesign(*self[1:]).kwargs())


# Launch configurations swept on GPU (name "c{chunk}_{design}" -> Candidate); the
# designs, with their reasons, are in ``designs.PALLAS_DESIGNS``. C = 128 halves the
# chunk states that the chunked designs write and read.
_SWEPT = ((64, "bv64_w4_s2"), (64, "bv64_w4_s2_seg4"), (64, "bv64_w4_s2_seg16"),
          (64, "bv32_w4_s2"), (64, "bv64_w8_s3"), (64, "bv64_w4_s3"), (64, "bv128_w8_s2"),
          (128, "bv64_w8_s2"), (64, "bv64_w8_s3_chunkbwd"), (64, "bv128_w8_s3_chunkbwd"),
          (128, "bv64_w8_s2_chunkbwd"), (64, "bv64_w4_s3_chunkfwd"),
          (128, "bv64_w8_s2_chunkfwd"), (64, "bv64_w4_s2_split"),
          (64, "bv64_w8_s3_chunkbwd_split"), (64, "bv64_w4_s2_pairs"),
          (64, "bv64_w8_s3_chunkbwd_pairs"))
PALLAS_CONFIGS = {f"c{c}_{name}": Candidate(c, *PALLAS_DESIGNS[name]) for c, name in _SWEPT}
DEFAULT_CONFIG = f"c64_{DEFAULT_DESIGN}"  # what pallas_linear_attention runs by default
# "logsigmoid": g = logsigmoid(N(0, 1)) (the spec's benchmark); "none": log_decay=None
# (plain causal linear attention, the QSF measurement term; the kernels skip all decay work).
DECAYS = ("logsigmoid", "none")


def row_work(impl, mode, B, T, H, D, elem_bytes):
  """(flops, bytes) of the roofline model (spec §7) for one row."""
  bwd = mode == "fwdbwd"
  if impl == "softmax":
    flops = roofline.softmax_causal_flops(B, H, T, D)
    flops += roofline.softmax_causal_flops(B, H, T, D, backward=True) if bwd else 0
    nbytes = roofline.softmax_bytes(B, H, T, D, elem_bytes=elem_bytes)
    nbytes += roofline.softmax_bytes(B, H, T, D, elem_bytes=elem_bytes, backward=True) if bwd else 0
    return flops, nbytes
  C = 64
  flops = roofline.fwd_flops(B, H, T, D, D, C) + (roofline.bwd_flops(B, H, T, D, D, C) if bwd else 0)
  nbytes = roofline.fwd_bytes(B, H, T, D, D, C, elem_bytes=elem_bytes)
  nbytes += roofline.bwd_bytes(B, H, T, D, D, C, elem_bytes=elem_bytes) if bwd else 0
  return flops, nbytes
