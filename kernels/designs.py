"""Named Pallas kernel designs: how the kernels run, apart from the chunk length.

A design fixes the forward and backward launch parameters (value block, warps,
stages), the forward and backward kernel designs ("fused" or "chunked") and the
two-level split of the sequence. The chunk length C stays the op's
``chunk_size``. The benchmark names its candidates ``c{C}_{design}``, e.g.
``c64_bv64_w8_s3_chunkbwd`` is the design ``bv64_w8_s3_chunkbwd`` at C = 64. So
a design that wins the benchmark can be used by name, both in
``linear_attention(..., pallas_design=...)`` and in the model config's
``attn_pallas_design``, e.g. ``--override=attn_pallas_design=bv64_w8_s3_chunkbwd``.
"""

from __future__ import annotations

import re
from typing import NamedTuple

from .pallas_op import DEFAULT_BWD, DEFAULT_FWD, KernelConfig


class PallasDesign(NamedTuple):
  """Everything ``pallas_linear_attention`` takes besides the inputs and the chunk.

  Attributes:
    fwd: forward launch parameters.
    bwd: backward launch parameters.
    num_segments: two-level split of the sequence (``segments``); 1 = none.
    backward: "fused" or "chunked" (``pallas_bwd_chunked``).
    forward: "fused" or "chunked" (``pallas_fwd_chunked``).
    split_sweeps: the backward's two sweeps in separate programs.
    decay_grad: "difference" or "pairs", the backward's form of dG.
  """
  fwd: KernelConfig = DEFAULT_FWD
  bwd: KernelConfig = DEFAULT_BWD
  num_segments: int = 1
  backward: str = "fused"
  forward: str = "fused"
  split_sweeps: bool = False
  decay_grad: str = "difference"

  def kwargs(self) -> dict:
    """The keyword arguments of ``pallas_linear_attention`` for this design."""
    return dict(fwd_config=self.fwd, bwd_config=self.bwd, num_segments=self.num_segments,
                backward=self.backward, forward=self.forward, split_sweeps=self.split_sweeps,
                decay_grad=self.decay_grad)


_W8 = KernelConfig(block_v=64, num_warps=8, num_stages=2)
_W8S3 = KernelConfig(block_v=64, num_warps=8, num_stages=3)
_W4S3 = KernelConfig(block_v=64, num_warps=4, num_stages=3)
PALLAS_DESIGNS = {
    "bv64_w4_s2": PallasDesign(),  # the default
    "bv64_w4_s2_seg4": PallasDesign(num_segments=4),
    "bv64_w4_s2_seg16": PallasDesign(num_segments=16),
    "bv32_w4_s2": PallasDesign(*[KernelConfig(block_v=32, num_warps=4, num_stages=2)] * 2),
    "bv64_w8_s2": PallasDesign(_W8, _W8),
    "bv64_w8_s3": PallasDesign(_W8S3, _W8S3),
    # Three stages keep one chunk's loads in flight during the compute (with two, the
    # compiled loop waits for every load at the top of each step; WORKSPACE.md).
    "bv64_w4_s3": PallasDesign(_W4S3, _W4S3),
    "bv128_w8_s2": PallasDesign(*[KernelConfig(block_v=128, num_warps=8, num_stages=2)] * 2),
    # Chunk-parallel backward (with the default forward), 8 warps: with 4 the grads
    # kernel spills at D = 128. Three stages for the states kernel's chunk loop; bv128
    # walks no value blocks.
    "bv64_w8_s3_chunkbwd": PallasDesign(DEFAULT_FWD, _W8S3, backward="chunked"),
    "bv128_w8_s3_chunkbwd": PallasDesign(
        DEFAULT_FWD, KernelConfig(block_v=128, num_warps=8, num_stages=3),
        backward="chunked"),
    "bv64_w8_s2_chunkbwd": PallasDesign(_W8, _W8, backward="chunked"),
    # The backward's forward sweep (dq) and reverse sweep (dk, dv) in separate
    # programs: 2 Dv / BV programs per (head, batch row), each with a serial chain of
    # T / C steps instead of 2 T / C. With 4 warps two programs fit on one SM (255
    # registers, 97 KB of shared memory at D = 128); with 8 warps only one.
    "bv64_w4_s2_split": PallasDesign(split_sweeps=True),
    "bv64_w8_s3_chunkbwd_split": PallasDesign(DEFAULT_FWD, _W8S3, backward="chunked",
                                              split_sweeps=True),
    # Chunk-parallel forward (states kernel, then one program per chunk), with the
    # default backward.
    "bv64_w4_s3_chunkfwd": PallasDesign(_W4S3, DEFAULT_BWD, forward="chunked"),
    "bv64_w8_s2_chunkfwd": PallasDesign(_W8, _W8, forward="chunked"),
    # The default with dG formed without the diagonal pairs (``decay_grad="pairs"``):
    # float32 accuracy for the dg of strongly decaying heads, for 16-26% more
    # backward instructions (ptxas); not yet timed on a GPU.
    "bv64_w4_s2_pairs": PallasDesign(decay_grad="pairs"),
    "bv64_w8_s3_chunkbwd_pairs": PallasDesign(DEFAULT_FWD, _W8S3, backward="chunked",
                                              decay_grad="pairs"),
}
DEFAULT_DESIGN = "bv64_w4_s2"  # what pallas_linear_attention runs by default

_BENCH_NAME = re.compile(r"c(\d+)_(.+)")


def resolve_design(name: str, chunk_size: int, *, design_arg: str = "pallas_design",
                   chunk_arg: str = "chunk_size") -> PallasDesign:
  """The design called ``name``, checked against the chunk length.

  Args:
    name: "default", a key of ``PALLAS_DESIGNS``, or a benchmark candidate name
      ``c{C}_{design}`` whose C equals ``chunk_size``.
    chunk_size: the op's chunk length C.
    design_arg, chunk_arg: what the caller calls the two settings, for the
      errors (the model config's ``attn_pallas_design`` / ``attn_chunk_size``).

  Returns:
    the ``PallasDesign``.

  Raises:
    ValueError: an unknown name (listing the designs), or a benchmark name for
      another chunk length (naming the chunk_size to pass).
  """
  if not isinstance(name, str):
    raise ValueError(f"{design_arg} must be a design name (str), got {name!r}")
  if name == "default":
    return PALLAS_DESIGNS[DEFAULT_DESIGN]
  if name in PALLAS_DESIGNS:
    return PALLAS_DESIGNS[name]
  m = _BENCH_NAME.fullmatch(name)
  if m and m.group(2) in PALLAS_DESIGNS:
    if int(m.group(1)) != chunk_size:
      raise ValueError(
          f"{design_arg} {name!r} is the benchmark's chunk-{m.group(1)} candidate, but "
          f"{chunk_arg}={chunk_size}; pass {chunk_arg}={m.group(1)}, or the design name "
          f"{m.group(2)!r} to run it at chunk {chunk_size}")
    return PALLAS_DESIGNS[m.group(2)]
  raise ValueError(
      f"unknown {design_arg} {name!r}; choose 'default', one of {sorted(PALLAS_DESIGNS)}, "
      f"or a benchmark name 'c<chunk>_<design>' such as 'c{chunk_size}_{DEFAULT_DESIGN}'")
