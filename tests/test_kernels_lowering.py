"""CUDA cross-lowering of the Pallas kernels on a CPU host (kernels spec §3.4).

Exports forward + backward for the ``cuda`` platform under an abstract H100 and
checks that both kernels became Triton custom calls. This runs the Pallas ->
Triton IR lowering, which rejects non-power-of-two tiles, value slicing and
unsupported primitives that interpret mode accepts. Production shapes are used
(B=8, T=4096, H=8, bf16), for every launch configuration the benchmark sweeps.
"""

import sys
import types

import jax
import jax.numpy as jnp
import pytest

from qsf_jax.kernels import (DEFAULT_BWD, DEFAULT_FWD, KernelConfig, linear_attention,
                             pallas_linear_attention)
from qsf_jax.kernels.candidates import PALLAS_CONFIGS
from qsf_jax.kernels.lowering import can_lower_for_cuda, count_triton_calls, export_for_cuda

pytestmark = pytest.mark.filterwarnings(
    "ignore:The Pallas Triton backend is deprecated:DeprecationWarning")


_OK, _WHY = can_lower_for_cuda()
requires_cuda_lowering = pytest.mark.skipif(
    not _OK, reason=f"this jaxlib cannot cross-lower Pallas-Triton for CUDA ({_WHY})")


def _export_fwd_bwd(B, T, H, Dk, Dv, dtype, *, chunk_size=64, fwd=DEFAULT_FWD, bwd=DEFAULT_BWD,
                    with_state=True, num_segments=1, backward="fused", with_decay=True,
                    forward="fused", split_sweeps=False, decay_grad="difference"):
  S = jax.ShapeDtypeStruct
  structs = [S((B, T, H, Dk), dtype), S((B, T, H, Dk), dtype), S((B, T, H, Dv), dtype),
             S((B, T, H), jnp.float32), S((B, H, Dk, Dv), jnp.float32)]

  def loss(q, k, v, g, S0):
    o, S_T = pallas_linear_attention(q, k, v, g if with_decay else None,
                                     S0 if with_state else None,
                                     chunk_size=chunk_size, return_final_state=with_state,
                                     fwd_config=fwd, bwd_config=bwd,
                                     num_segments=num_segments, backward=backward,
                                     forward=forward, split_sweeps=split_sweeps,
                                     decay_grad=decay_grad)
    extra = jnp.sum(S_T) if with_state else 0.0
    return jnp.sum(o.astype(jnp.float32)) + extra

  f = lambda *a: jax.value_and_grad(loss, argnums=range(5))(*a)
  return count_triton_calls(export_for_cuda(f, *structs))


@requires_cuda_lowering
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("cfg_name", sorted(PALLAS_CONFIGS))
def test_lowers_at_production_shapes(D, cfg_name):
  c = PALLAS_CONFIGS[cfg_name]
  # A chunked forward or backward is two kernels (states, then outputs or gradients).
  n_kernels = (1 + (c.forward == "chunked")) + (1 + (c.backward == "chunked"))
  assert _export_fwd_bwd(8, 4096, 8, D, D, jnp.bfloat16, chunk_size=c.chunk, fwd=c.fwd,
                         bwd=c.bwd, num_segments=c.num_segments, backward=c.backward,
                         forward=c.forward, split_sweeps=c.split_sweeps,
                         decay_grad=c.decay_grad) == n_kernels


@requires_cuda_lowering
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("backward", ["fused", "chunked"])
def test_lowers_without_decay_at_production_shapes(D, backward):
  # log_decay=None compiles the kernels without the cumsum ref and the dG outputs.
  assert _export_fwd_bwd(8, 4096, 8, D, D, jnp.bfloat16, with_decay=False,
                         backward=backward) == (3 if backward == "chunked" else 2)


@requires_cuda_lowering
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float16])
def test_lowers_other_dtypes(dtype):
  assert _export_fwd_bwd(2, 1024, 4, 64, 64, dtype) == 2
  assert _export_fwd_bwd(2, 1024, 4, 64, 64, dtype, backward="chunked") == 3


@requires_cuda_lowering
@pytest.mark.parametrize("shape", [(2, 300, 2, 96, 40), (4, 1, 8, 64, 64), (1, 200, 3, 8, 256)])
@pytest.mark.parametrize("with_state", [True, False])
@pytest.mark.parametrize("backward", ["fused", "chunked"])
def test_lowers_padded_shapes(shape, with_state, backward):
  # T not a multiple of C, T = 1 (decode), non-power-of-two and tiny head dims.
  assert _export_fwd_bwd(*shape, jnp.bfloat16, with_state=with_state,
                         backward=backward) == (3 if backward == "chunked" else 2)


@requires_cuda_lowering
@pytest.mark.parametrize("shape", [(2, 300, 2, 96, 40), (4, 1, 8, 64, 64)])
@pytest.mark.parametrize("with_state, with_decay", [(True, True), (False, False)])
def test_chunked_forward_lowers_padded_shapes(shape, with_state, with_decay):
  assert _export_fwd_bwd(*shape, jnp.bfloat16, with_state=with_state, with_decay=with_decay,
                         forward="chunked") == 3


@requires_cuda_lowering
def test_public_op_lowers_with_impl_pallas():
  S = jax.ShapeDtypeStruct
  qk = S((2, 512, 4, 64), jnp.bfloat16)
  f = lambda q, k, v, g: jax.value_and_grad(lambda *a: jnp.sum(
      linear_attention(*a, impl="pallas").astype(jnp.float32)), argnums=range(4))(q, k, v, g)
  assert count_triton_calls(export_for_cuda(f, qk, qk, qk, S((2, 512, 4), jnp.float32))) == 2


@requires_cuda_lowering
def test_lowering_rejects_a_non_power_of_two_tile():
  # Negative control: the check is real. block_v must be a power of two, and the
  # lowering itself rejects the (C, 24) tile that an unpadded Dk = 24 would load.
  from qsf_jax.kernels import pallas_op  # pylint: disable=import-outside-toplevel
  st = pallas_op._Static(chunk=64, fwd=DEFAULT_FWD, bwd=DEFAULT_BWD, interpret=False,
                         return_final_state=False)
  S = jax.ShapeDtypeStruct
  f = lambda q, k, v, g: pallas_op._core(q, k, v, g, None, st)[0]
  with pytest.raises(ValueError, match="power of 2"):
    export_for_cuda(f, S((1, 128, 1, 24), jnp.bfloat16), S((1, 128, 1, 24), jnp.bfloat16),
                    S((1, 128, 1, 64), jnp.bfloat16), S((1, 128, 1), jnp.float32))
  with pytest.raises(ValueError, match="block_v"):
    _export_fwd_bwd(1, 64, 1, 64, 64, jnp.bfloat16, fwd=KernelConfig(block_v=48))


def test_parse_ptxas_output():
  from qsf_jax.kernels.ptxas_report import parse_ptxas  # pylint: disable=import-outside-toplevel
  out = ("ptxas info    : Compiling entry function 'linear_attention_bwd' for 'sm_90a'\n"
         "ptxas info    : Function properties for linear_attention_bwd\n"
         "    2756 bytes stack frame, 2756 bytes spill stores, 2756 bytes spill loads\n"
         "ptxas info    : Used 255 registers, used 1 barriers\n")
  assert parse_ptxas(out) == (255, 2756)
  with pytest.raises(ValueError, match="no register/spill line"):
    parse_ptxas("ptxas fatal   : Unresolved extern function")


def test_sass_counts_from_cuobjdump_text():
  from qsf_jax.kernels.ptxas_report import sass_counts  # pylint: disable=import-outside-toplevel
  sass = """\t\tFunction : linear_attention_bwd
        /*0440*/                   STL [R1+0x44], R0 ;                 /* 0x0000440001007387 */
        /*08f0*/               @P1 LDGSTS.E [R201+0x1e000], desc[UR6][R16.64] ; /* 0x1e0 */
        /*0980*/              @!P2 BRA 0x9e0 ;                         /* 0x0000000000142947 */
        /*2b40*/                   HGMMA.64x32x16.F32.BF16 R40, gdesc[UR36], RZ, !UPT ; /* 0x006 */
        /*2d90*/                   MUFU.EX2 R93, R66 ;                 /* 0x00000042005d7308 */
        /*2dc0*/                   MUFU.EX2 R62, R57 ;                 /* 0x00000039003e7308 */
        /*2e00*/                   LDL.LU R3, [R1+0x44] ;              /* 0x0000440001037983 */
        /*2e10*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;       /* 0x0000000000007b1d */
"""
  assert sass_counts(sass) == dict(total=8, LDL=1, STL=1, MUFU=2, HGMMA=1, BAR=1)


def test_async_waits_from_triton_gpu_ir():
  from qsf_jax.kernels.ptxas_report import async_waits  # pylint: disable=import-outside-toplevel
  ttgir = ("%115 = ttg.async_wait %arg10, %arg11 {num = 7 : i32} loc(#loc44)\n"
           "%9 = ttg.local_load %8 token %115\n"
           "%300 = ttg.async_wait  {num = 0 : i32} loc(#loc1)\n")
  assert async_waits(ttgir) == [7, 0]
  assert async_waits("tt.func @k() { tt.return }") == []



def test_ptxas_report_uses_the_ptxas_triton_picks_for_sm90(monkeypatch, tmp_path):
  """Triton 3.9 emits PTX 9.4, which its legacy bin/ptxas (CUDA 12.9) refuses."""
  from qsf_jax.kernels import ptxas_report  # pylint: disable=import-outside-toplevel
  asked = []

  def get_ptxas(arch):
    asked.append(arch)
    return types.SimpleNamespace(path="/opt/triton/bin/ptxas-blackwell")

  triton = types.ModuleType("triton")
  triton.__file__ = str(tmp_path / "triton" / "__init__.py")
  compiler = types.ModuleType("triton.backends.nvidia.compiler")
  compiler.get_ptxas = get_ptxas
  monkeypatch.setitem(sys.modules, "triton", triton)
  monkeypatch.setitem(sys.modules, "triton.backends.nvidia.compiler", compiler)
  assert ptxas_report._ptxas() == "/opt/triton/bin/ptxas-blackwell" and asked == [90]
  # A Triton without get_ptxas (3.6) has only its bundled bin/ptxas.
  monkeypatch.setitem(sys.modules, "triton.backends.nvidia.compiler", types.ModuleType("c"))
  assert ptxas_report._ptxas() == str(tmp_path / "triton" / "backends" / "nvidia" / "bin" / "ptxas")


def test_ptxas_report_shows_the_tools_own_error():
  from qsf_jax.kernels import ptxas_report  # pylint: disable=import-outside-toplevel
  fail = [sys.executable, "-c", "import sys; sys.stderr.write('fatal : Unsupported .version 9.4'); "
          "sys.exit(255)"]
  with pytest.raises(RuntimeError, match=r"failed \(exit 255\): fatal : Unsupported .version 9.4"):
    ptxas_report._run(fail)
  assert ptxas_report._run([sys.executable, "-c", "print('ok')"]).stdout == "ok\n"

@requires_cuda_lowering
def test_ptxas_report_captures_the_triton_ir_of_every_kernel():
  from qsf_jax.kernels import ptxas_report  # pylint: disable=import-outside-toplevel
  found = ptxas_report.kernel_ir(PALLAS_CONFIGS["c64_bv64_w8_s3_chunkbwd"], 64, B=1, T=256, H=1)
  assert sorted((n, w, s) for n, w, s, _ in found) == [
      ("linear_attention_bwd_grads", 8, 3), ("linear_attention_bwd_states", 8, 3),
      ("linear_attention_fwd", 4, 2)]
  for name, _, _, ir in found:
    assert f"tt.func public @{name}" in ir and "tt.dot" in ir
    # Decay factors are exp2 (one ex2.approx), never libdevice expf (about 8 instructions).
    assert "__nv_exp2f" in ir and "__nv_expf" not in ir, name
  with pytest.raises(ValueError, match="decay must be one of"):
    ptxas_report.kernel_ir(PALLAS_CONFIGS["c64_bv64_w4_s2"], 64, decay="None")
  # Without decay no kernel exponentiates.
  found = ptxas_report.kernel_ir(PALLAS_CONFIGS["c64_bv64_w8_s3_chunkbwd"], 64, B=1, T=256, H=1,
                                 decay="none")
  assert len(found) == 3
  for name, _, _, ir in found:
    assert "tt.dot" in ir and "__nv_exp" not in ir and "math.exp" not in ir, name
  # The hooks are undone: a later export is not recorded.
  assert pallas_linear_attention.__module__.endswith("pallas_op")
  from jax.experimental import pallas as pl  # pylint: disable=import-outside-toplevel
  assert pl.pallas_call.__name__ == "pallas_call"
