"""Block specs shared by the Pallas kernel wrappers (inputs in (B, T, H, D) layout).

Two launch layouts (the specs squeeze batch and head, so kernels see 2-D refs):

* ``sequence_specs``: grid (Dv / BV, H, B), one program per (value block,
  head, batch row) over the whole padded sequence (the fused kernels and the
  states kernels of the chunked designs); or grid (2 Dv / BV, H, B) for the
  backward kernels with split sweeps, where programs j and j + Dv / BV share
  value block j;
* ``chunk_specs``: grid (T / C, H, B), one program per chunk (the chunked
  designs' output and gradient kernels).
"""

from __future__ import annotations

from typing import NamedTuple, Optional

from jax.experimental import pallas as pl


class SequenceSpecs(NamedTuple):
  """Specs for grid (j, h, bb) = (value block, head, batch row)."""
  qk: pl.BlockSpec  # (Tp, Dk) rows of q, k (or any (B, Tp, H, Dk) array)
  v: pl.BlockSpec  # (Tp, BV) value block of v, do, o, dv
  b: pl.BlockSpec  # (Tp,) chunk-local cumsums, of a (B, Tp, H) array
  state: pl.BlockSpec  # (Dk, BV) block of a (B, H, Dk, Dv) state
  chunk_states: Optional[pl.BlockSpec]  # (NT, Dk, BV) of (B, H, NT, Dk, Dv), or None


def value_block(j, NV: Optional[int]):
  """The value block of grid index j: j itself, or j mod NV on a split grid."""
  return j if NV is None else j % NV


def sequence_specs(Tp: int, Dk: int, BV: int, NT: Optional[int] = None,
                   NV: Optional[int] = None) -> SequenceSpecs:
  """Specs of the (Dv / BV, H, B) grid; ``NT`` adds the per-chunk state spec.

  With ``NV`` (= Dv / BV) the grid's first axis may be a multiple of NV and
  grid index j reads value block j mod NV (split sweeps).
  """
  return SequenceSpecs(
      qk=pl.BlockSpec((None, Tp, None, Dk), lambda j, h, bb: (bb, 0, h, 0)),
      v=pl.BlockSpec((None, Tp, None, BV), lambda j, h, bb: (bb, 0, h, value_block(j, NV))),
      b=pl.BlockSpec((None, Tp, None), lambda j, h, bb: (bb, 0, h)),
      state=pl.BlockSpec((None, None, Dk, BV),
                         lambda j, h, bb: (bb, h, 0, value_block(j, NV))),
      chunk_states=None if NT is None else pl.BlockSpec(
          (None, None, NT, Dk, BV), lambda j, h, bb: (bb, h, 0, 0, value_block(j, NV))))


class ChunkSpecs(NamedTuple):
  """Specs for grid (c, h, bb) = (chunk, head, batch row)."""
  qk: pl.BlockSpec  # (C, Dk) chunk of q, k
  v: pl.BlockSpec  # (C, Dv) chunk of v, do, o
  b: pl.BlockSpec  # (C,) chunk-local cumsums
  state: pl.BlockSpec  # (Dk, Dv) state of chunk c in a (B, H, NT, Dk, Dv) array


def chunk_specs(C: int, Dk: int, Dv: int) -> ChunkSpecs:
  """Specs of the (T / C, H, B) grid."""
  return ChunkSpecs(
      qk=pl.BlockSpec((None, C, None, Dk), lambda c, h, bb: (bb, c, h, 0)),
      v=pl.BlockSpec((None, C, None, Dv), lambda c, h, bb: (bb, c, h, 0)),
      b=pl.BlockSpec((None, C, None), lambda c, h, bb: (bb, c, h)),
      state=pl.BlockSpec((None, None, None, Dk, Dv), lambda c, h, bb: (bb, h, c, 0, 0)))
