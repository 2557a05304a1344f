"""Pallas-Triton causal linear attention: ``pallas_call`` wiring and ``custom_vjp``.

Forward (kernels spec §1.2) and backward (§1.3) run as one fused kernel each
(``pallas_kernels``) or, selected by ``forward``/``backward="chunked"``, as a
states kernel plus a chunk-parallel kernel (``pallas_fwd_chunked``,
``pallas_bwd_chunked``); the decay gradient is finished in XLA (spec §3.2:
Triton has no reverse cumsum):

  dG_t = q_t . dq_t - k_t . dk_t  (+ <S_T, dS_T> at t = T - 1),
  dg_t = sum_{r >= t} dG_r.

The Triton backend is selected explicitly with ``plgpu.CompilerParams`` (spec
§3.5: without it jax 0.10.x lowers ``pallas_call`` on GPU to Mosaic GPU).
``interpret=True`` runs the same kernels as XLA ops on CPU. The wrapper pads T
to a multiple of the chunk and Dk, Dv to powers of two >= 16 with zeros, which
changes neither the outputs nor the state, and slices the results back.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from qsf_jax import _checks

from . import partitioning, segments
from ._validate import (check_chunk_size, floor_log_decay, next_power_of_two, pad_axis,
                        round_up, validate_inputs)
from .pallas_bwd_chunked import bwd_call_chunked
from .pallas_fwd_chunked import fwd_call_chunked
from .pallas_kernels import bwd_call_fused, fwd_call_fused

_F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class KernelConfig:
  """Launch parameters of one Triton kernel.

  Attributes:
    block_v: value-dim tile BV (power of two >= 16; clipped to the padded Dv).
      The grid is (Dv / BV, H, B); smaller BV gives more programs.
    num_warps: Triton warps per program.
    num_stages: Triton software-pipelining stages of the chunk loop.
  """
  block_v: int = 64
  num_warps: int = 4
  num_stages: int = 2

  def __post_init__(self):
    # Interpret mode ignores warps and stages, so a bad value would only fail on a GPU.
    for name in ("block_v", "num_warps", "num_stages"):
      _checks.check_int(name, getattr(self, name), 1)
    if self.block_v < 16 or self.block_v & (self.block_v - 1):
      raise ValueError(f"block_v must be a power of two >= 16, got {self.block_v}")
    if self.num_warps & (self.num_warps - 1):
      raise ValueError(f"num_warps must be a power of two, got {self.num_warps}")


DEFAULT_FWD = KernelConfig(block_v=64, num_warps=4, num_stages=2)
DEFAULT_BWD = KernelConfig(block_v=64, num_warps=4, num_stages=2)
BACKWARDS = ("fused", "chunked")  # backward kernel designs, see pallas_linear_attention
FORWARDS = ("fused", "chunked")  # forward kernel designs, see pallas_linear_attention
DECAY_GRADS = ("difference", "pairs")  # dG forms, see pallas_linear_attention


@dataclasses.dataclass(frozen=True)
class _Static:
  """Hashable static settings of one traced call (non-differentiable)."""
  chunk: int
  fwd: KernelConfig
  bwd: KernelConfig
  interpret: bool
  return_final_state: bool
  backward: str = "fused"
  forward: str = "fused"
  split_sweeps: bool = False
  decay_grad: str = "difference"


def _precision(dtype):
  """IEEE float32 dots for float32 operands (Triton defaults f32 dots to TF32)."""
  return jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == _F32 else None


def _block_v(cfg: KernelConfig, Dv: int) -> int:
  bv = min(int(cfg.block_v), Dv)
  if bv < 16 or bv & (bv - 1):
    raise ValueError(f"block_v must be a power of two >= 16, got {cfg.block_v}")
  return bv


def _local_cumsum(g_BTH, C):
  """Chunk-local inclusive cumsum b of the log-decay in float32 (spec §1.4); None for None."""
  if g_BTH is None:
    return None
  B, Tp, H = g_BTH.shape
  return jnp.cumsum(g_BTH.astype(_F32).reshape(B, Tp // C, C, H), axis=2).reshape(B, Tp, H)


def _launch(kernel, grid, in_specs, out_specs, out_shape, tuning, interpret: bool, name: str,
            cost):
  """``pl.pallas_call`` on the Triton backend with one kernel's launch settings.

  Args:
    kernel: the kernel body (a ``functools.partial`` of a kernel function).
    grid: launch grid, e.g. ``(NV, H, B)``.
    in_specs, out_specs, out_shape: the block specs and output shapes.
    tuning: the ``KernelConfig`` of this direction (``num_warps``, ``num_stages``).
    interpret: run the kernel with the Pallas interpreter (CPU).
    name: kernel name in profiles.
    cost: ``pl.CostEstimate`` for XLA's scheduler.

  Returns:
    the callable ``pallas_call`` returns.
  """
  return pl.pallas_call(
      kernel, grid=grid, in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
      compiler_params=plgpu.CompilerParams(num_warps=tuning.num_warps,
                                           num_stages=tuning.num_stages),
      interpret=interpret, name=name, cost_estimate=cost)


def _launcher(tuning: KernelConfig, interpret: bool):
  """The ``launch`` callback of the kernel wrappers, with one direction's settings."""
  return lambda kernel, grid, ins, outs, shapes, name, cost: _launch(
      kernel, grid, ins, outs, shapes, tuning, interpret, name, cost)


def _present(*xs):
  return tuple(x for x in xs if x is not None)


def _fill(arrays, present):
  """The operands of a partitioned call back in place, None where absent."""
  it = iter(arrays)
  return [next(it) if p else None for p in present]


@functools.lru_cache(maxsize=None)
def _fwd_partitioned(st: _Static, has_b: bool, has_h0: bool):
  """The forward kernels of ``st`` for (q, k, v[, b][, h0]), partitioned over B and H."""

  def fwd(*arrays):
    q, k, v, b, h0 = _fill(arrays, (True, True, True, has_b, has_h0))
    call = fwd_call_chunked if st.forward == "chunked" else fwd_call_fused
    o, S_T = call(q, k, v, b, h0, chunk=st.chunk, block_v=_block_v(st.fwd, v.shape[-1]),
                  launch=_launcher(st.fwd, st.interpret), precision=_precision(q.dtype),
                  store_state=st.return_final_state)
    return _present(o, S_T)

  ins = ["b t h k", "b t h k", "b t h v"] + ["b t h"] * has_b + ["b h k v"] * has_h0
  return partitioning.batch_head_partitioned(
      fwd, ins, ["b t h v"] + ["b h k v"] * st.return_final_state)


def _fwd_call(q, k, v, b, h0, st: _Static):
  """The forward design ``st.forward``; returns (o, S_T f32 or None). b None: no decay."""
  outs = _fwd_partitioned(st, b is not None, h0 is not None)(*_present(q, k, v, b, h0))
  return outs[0], (outs[1] if st.return_final_state else None)


@functools.lru_cache(maxsize=None)
def _bwd_partitioned(st: _Static, has_b: bool, has_h0: bool, has_dST: bool):
  """The backward kernels of ``st`` for (q, k, v, do[, b][, h0][, dST]), partitioned
  over B and H; returns (dq, dk, dv[, dG][, dh0])."""

  def bwd(*arrays):
    args = _fill(arrays, (True, True, True, True, has_b, has_h0, has_dST))
    q, v = args[0], args[2]
    call = bwd_call_chunked if st.backward == "chunked" else bwd_call_fused
    dq, dk, dv, dG, dh0 = call(*args, chunk=st.chunk, block_v=_block_v(st.bwd, v.shape[-1]),
                               launch=_launcher(st.bwd, st.interpret),
                               precision=_precision(q.dtype), split_sweeps=st.split_sweeps,
                               diagonal_last=st.decay_grad == "pairs")
    return _present(dq, dk, dv, dG, dh0)

  ins = (["b t h k", "b t h k", "b t h v", "b t h v"] + ["b t h"] * has_b
         + ["b h k v"] * (has_h0 + has_dST))
  outs = ["b t h k", "b t h k", "b t h v"] + ["b t h"] * has_b + ["b h k v"] * has_h0
  return partitioning.batch_head_partitioned(bwd, ins, outs)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _core(q, k, v, g, h0, st: _Static):
  """Kernels spec §1.2 on padded inputs; returns (o, S_T or None)."""
  return _fwd_call(q, k, v, _local_cumsum(g, st.chunk), h0, st)


def _core_fwd(q, k, v, g, h0, st: _Static):
  o, S_T = _fwd_call(q, k, v, _local_cumsum(g, st.chunk), h0, st)
  return (o, S_T), (q, k, v, g, h0, S_T)


def _core_bwd(st: _Static, res, cts):
  """Kernels spec §1.3: dq, dk, dv, dh0 from the kernel; dg by reverse cumsum.

  Without decay (g None) there is no dg, and the kernels skip dG.
  """
  q, k, v, g, h0, S_T = res
  do, dST = cts
  if dST is not None:
    dST = dST.astype(_F32)
  args = (q, k, v, do.astype(v.dtype), _local_cumsum(g, st.chunk),
          None if h0 is None else h0.astype(_F32), dST)
  outs = _bwd_partitioned(st, g is not None, h0 is not None, dST is not None)(*_present(*args))
  dq, dk, dv, dG_BTH, dh0 = _fill(outs, (True, True, True, g is not None, h0 is not None))
  dg_BTH = None
  if g is not None:
    if dST is not None:
      # G_T scales the whole final state: dL/dG_T gains <S_T, dS_T> (spec §1.3).
      dG_BTH = dG_BTH.at[:, -1, :].add(jnp.sum(S_T * dST, axis=(-2, -1)))
    dg_BTH = jnp.flip(jnp.cumsum(jnp.flip(dG_BTH, 1), axis=1), 1).astype(g.dtype)
  return (dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), dg_BTH,
          None if h0 is None else dh0.astype(h0.dtype))


_core.defvjp(_core_fwd, _core_bwd)


def pallas_linear_attention(q, k, v, log_decay=None, initial_state=None, *, chunk_size=64,
                            interpret=False, return_final_state=False,
                            fwd_config: KernelConfig = DEFAULT_FWD,
                            bwd_config: KernelConfig = DEFAULT_BWD, num_segments: int = 1,
                            backward: str = "fused", forward: str = "fused",
                            split_sweeps: bool = False, decay_grad: str = "difference"):
  """Chunked causal linear attention with fused Pallas-Triton kernels.

  Kernels spec §1.1: o_t = sum_{s<=t} exp(G_t - G_s)(q_t . k_s) v_s
  + q_t^T exp(G_t) S_0, S_T = sum_s exp(G_T - G_s) k_s v_s^T + exp(G_T) S_0,
  computed chunk-wise (§1.2) with a ``custom_vjp`` backward (§1.3). With
  ``num_segments`` S > 1 the sequence is cut into S segments that the kernels
  run as separate rows, from entering states passed in XLA (``segments``).

  Args:
    q: queries (B, T, H, Dk), float16/bfloat16/float32.
    k: keys (B, T, H, Dk).
    v: values (B, T, H, Dv).
    log_decay: log-decays g <= 0 (B, T, H), or None for no decay (the kernels
      are then compiled without any decay work: no exp, no dg).
    initial_state: state S_0 (B, H, Dk, Dv), or None.
    chunk_size: chunk C, a power of two >= 16 (reduced to the padded T when
      T is shorter).
    interpret: run the kernels in Pallas interpret mode (CPU).
    return_final_state: also compute S_T (one (Dk, BV) store per program).
    fwd_config: forward launch parameters.
    bwd_config: backward launch parameters.
    num_segments: S >= 1 segments of the padded sequence, each run as its own
      kernel row (more programs for small B * H; T is padded to a multiple of
      S * chunk). 1, the default, runs the kernels over the whole sequence.
    backward: "fused" (one kernel, two sweeps per value block; the default) or
      "chunked" (chunk states to HBM, then one program per chunk;
      ``pallas_bwd_chunked``; it needs 8 B H (T/C) Dk Dv bytes of float32
      states, 1.1 GB at B=H=8, T=8192, C=64, D=128, or half that in the
      16-bit input dtype without decay). Both compute the same gradients.
    forward: "fused" (one kernel, one program per value block over the whole
      sequence; the default) or "chunked" (chunk states to HBM in the input
      dtype, then one program per chunk; ``pallas_fwd_chunked``; 2 B H (T/C)
      Dk Dv bytes of bf16 states). Both compute the same values.
    split_sweeps: run the backward's forward sweep (dq; chunk states) and its
      reverse sweep (dk, dv; state gradients) in separate programs: twice the
      programs, each with half the serial chunk chain. The same values to the
      bit; applies to both backward designs.
    decay_grad: how the backward forms dG_t = q_t . dq_t - k_t . dk_t (kernels
      spec §1.3), whose reverse cumsum is dg. "difference" (the default, FLA's
      form) takes the dot products of the complete dq and dk: the undecayed
      diagonal pairs (t, t), of the size of the output, then cancel only to
      rounding, which dominates the dg of a strongly decaying head (float32,
      g = -8: relative error 1.1e-3 in that head). "pairs" takes them before
      the diagonal of dA joins dq and dk (2.2e-6 there; the module docstring of
      ``op`` has the figures); its backward compiles to 16% (D=128) and 24%
      (D=64) more instructions (ptxas, sm_90a), not yet timed on a GPU. Same dq,
      dk, dv, dh0 to rounding; ignored without decay.

  Returns:
    (o, S_T): o (B, T, H, Dv) in q's dtype; S_T (B, H, Dk, Dv) float32, or
    None unless ``return_final_state``.

  Raises:
    ValueError: for the bad inputs ``linear_attention`` rejects, a chunk that
      is not a power of two >= 16, a bad ``block_v``, ``num_segments``,
      ``backward``, ``forward``, ``split_sweeps`` or ``decay_grad``.
  """
  q, k, v, log_decay, initial_state = validate_inputs(q, k, v, log_decay, initial_state)
  chunk_size = check_chunk_size(chunk_size, power_of_two=True)
  log_decay = floor_log_decay(log_decay, q.dtype)  # resets (-inf) stay finite
  B, T, H, Dk = q.shape
  Dv = v.shape[-1]
  C = min(int(chunk_size), max(16, next_power_of_two(T)))
  Dkp = max(16, next_power_of_two(Dk))
  Dvp = max(16, next_power_of_two(Dv))
  if (isinstance(num_segments, (bool, np.bool_))
      or not isinstance(num_segments, (int, np.integer)) or num_segments < 1):
    raise ValueError(f"num_segments must be a positive int, got {num_segments!r}")
  num_segments = int(num_segments)
  if backward not in BACKWARDS:
    raise ValueError(f"backward must be one of {BACKWARDS}, got {backward!r}")
  if forward not in FORWARDS:
    raise ValueError(f"forward must be one of {FORWARDS}, got {forward!r}")
  if not isinstance(decay_grad, str) or decay_grad not in DECAY_GRADS:
    raise ValueError(f"decay_grad must be one of {DECAY_GRADS}, got {decay_grad!r}")
  for name, cfg in (("fwd_config", fwd_config), ("bwd_config", bwd_config)):
    if not isinstance(cfg, KernelConfig):
      raise ValueError(f"{name} must be a KernelConfig, got {cfg!r}")
  split_sweeps = _checks.check_flag("split_sweeps", split_sweeps)
  interpret = _checks.check_flag("interpret", interpret)
  return_final_state = _checks.check_flag("return_final_state", return_final_state)
  nseg = num_segments
  Tp = round_up(T, C * nseg)
  st = _Static(chunk=C, fwd=fwd_config, bwd=bwd_config, interpret=interpret,
               return_final_state=return_final_state, backward=backward,
               forward=forward, split_sweeps=split_sweeps, decay_grad=decay_grad)
  qp = pad_axis(pad_axis(q, 1, Tp), 3, Dkp)
  kp = pad_axis(pad_axis(k, 1, Tp), 3, Dkp)
  vp = pad_axis(pad_axis(v, 1, Tp), 3, Dvp)
  gp = None if log_decay is None else pad_axis(log_decay, 1, Tp)
  h0p = None if initial_state is None else pad_axis(pad_axis(initial_state, 2, Dkp), 3, Dvp)
  if nseg == 1:
    o, S_T = _core(qp, kp, vp, gp, h0p, st)
  else:
    S_in, S_T = segments.entering_states(kp, vp, gp, h0p, nseg, precision=_precision(q.dtype))
    o, _ = _core(*(None if x is None else segments.fold(x, nseg) for x in (qp, kp, vp, gp)),
                 S_in.reshape((B * nseg,) + S_in.shape[2:]),
                 dataclasses.replace(st, return_final_state=False))
    o = segments.unfold(o, B)
    S_T = S_T if return_final_state else None
  o = o[:, :T, :, :Dv]
  if S_T is not None:
    S_T = S_T[:, :, :Dk, :Dv]
  return o, S_T
