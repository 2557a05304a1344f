"""Cross-lowering of the Pallas kernels for CUDA on a host without a GPU.

Kernels spec §3.4: exporting a jitted function for the ``cuda`` platform under
an abstract H100 device runs the Pallas -> Triton IR lowering on CPU. It catches
non-power-of-two tiles, value slicing and unsupported primitives that interpret
mode accepts; Triton's own TTIR -> PTX compile (register pressure, shared memory)
only happens on a GPU.
"""

from __future__ import annotations

import warnings

import jax
from jax.experimental.pallas import triton as plgpu

# Exposed by jax >= 0.11 as plgpu.CUSTOM_CALL_TARGET_NAME; the same string on 0.10.
TRITON_CALL_TARGET = getattr(plgpu, "CUSTOM_CALL_TARGET_NAME", "__gpu$xla.gpu.triton")
H100 = dict(device_kind="NVIDIA H100 80GB HBM3", platform="gpu", num_cores=132)


def export_for_cuda(fn, *arg_structs):
  """Exports ``jax.jit(fn)`` for CUDA with an abstract H100 (spec §3.4).

  Args:
    fn: the function to lower (e.g. a forward, or a ``value_and_grad``).
    *arg_structs: ``jax.ShapeDtypeStruct`` for each positional argument.

  Returns:
    The ``jax.export.Exported``; its ``mlir_module()`` holds one Triton custom
    call per ``pallas_call``.
  """
  dev = jax.sharding.AbstractDevice(**H100)
  mesh = jax.sharding.AbstractMesh((), (), abstract_device=dev)
  with jax.sharding.use_abstract_mesh(mesh):
    return jax.export.export(
        jax.jit(fn), platforms=["cuda"],
        disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(TRITON_CALL_TARGET)],
    )(*arg_structs)


def can_lower_for_cuda() -> tuple[bool, str]:
  """Whether this jaxlib cross-lowers Pallas-Triton for CUDA at all.

  Probed with a trivial copy kernel, so that an error in lowering the project's
  own kernels fails their tests instead of turning them into skips.

  Returns:
    (True, "") or (False, the probe's error as "Type: message").
  """
  from jax.experimental import pallas as pl  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  def copy(x_ref, o_ref):
    o_ref[...] = x_ref[...]

  try:
    spec = jax.ShapeDtypeStruct((16, 16), jnp.float32)
    f = lambda a: pl.pallas_call(copy, out_shape=spec, compiler_params=plgpu.CompilerParams(
        num_warps=4, num_stages=2))(a)
    with warnings.catch_warnings():  # jax >= 0.11: the Triton backend's deprecation notice
      warnings.simplefilter("ignore", DeprecationWarning)
      return count_triton_calls(export_for_cuda(f, spec)) == 1, ""
  except Exception as e:  # pylint: disable=broad-except
    return False, f"{type(e).__name__}: {e}"


def count_triton_calls(exported) -> int:
  """How many Triton custom calls an exported module contains."""
  return exported.mlir_module().count(TRITON_CALL_TARGET)
