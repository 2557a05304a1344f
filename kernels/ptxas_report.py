"""Registers, spills and shared memory of each Pallas kernel, without a GPU.

Run as ``python -m qsf_jax.kernels.ptxas_report [--configs=NAME,...] [--D=64,128]
[--decay=none]``
on any host with ``triton`` installed (``pip install triton``; it bundles
ptxas, and this uses the one Triton picks for sm_90). For each launch configuration of ``candidates.PALLAS_CONFIGS`` it exports
forward + backward at B=8, T=4096, H=8, bf16 (with float32 log-decays, or
without any with ``--decay=none``) for CUDA (``lowering``, kernels
spec §3.4), takes the Triton IR that Pallas emits for every ``pallas_call``,
compiles it with pip Triton for sm_90a (H100) with the config's warps and
stages, and runs ``ptxas -v`` on the PTX; it also lists the ``num`` of each
``async_wait`` (0 in a chunk loop: the loads of the next chunk do not overlap
this chunk's compute). ``--sass`` adds static counts of the SASS that Triton's
bundled ``cuobjdump`` disassembles from the cubin: all instructions, spill
loads/stores (LDL/STL), MUFU (``ex2``), HGMMA and BAR. The figures are leads, not device
readings: XLA compiles the same IR with its own bundled Triton, whose
allocation can differ. It hooks a private jax function
(``jax._src.pallas.triton.lowering.lower_jaxpr_to_triton_module``), so it
fails loudly where a jax version renames it.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import subprocess
import sys
import tempfile

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from . import pallas_op
from .candidates import DECAYS, PALLAS_CONFIGS
from .lowering import export_for_cuda


def parse_ptxas(stderr: str):
  """(registers, spill-store bytes) from ``ptxas -v`` output (first kernel)."""
  regs = re.search(r"Used (\d+) registers", stderr)
  spill = re.search(r"(\d+) bytes spill stores", stderr)
  if regs is None or spill is None:
    raise ValueError(f"no register/spill line in ptxas output: {stderr[:300]!r}")
  return int(regs.group(1)), int(spill.group(1))


@contextlib.contextmanager
def _capture_triton_ir():
  """Records (kernel name, num_warps, num_stages, Triton IR text) per pallas_call."""
  from jax._src.pallas.triton import lowering  # pylint: disable=import-outside-toplevel
  launches, modules = {}, []
  orig_lower, orig_call = lowering.lower_jaxpr_to_triton_module, pl.pallas_call

  def lower(*a, **kw):
    res = orig_lower(*a, **kw)
    modules.append(res.module.operation.get_asm(enable_debug_info=False))
    return res

  def call(*a, **kw):
    cp = kw["compiler_params"]
    launches[kw["name"]] = (cp.num_warps, cp.num_stages)
    return orig_call(*a, **kw)

  lowering.lower_jaxpr_to_triton_module, pallas_op.pl.pallas_call = lower, call
  try:
    out = []
    yield out
    for ir in modules:
      name = re.search(r"module @(\w+)", ir).group(1)
      out.append((name,) + launches[name] + (ir,))
  finally:
    lowering.lower_jaxpr_to_triton_module, pallas_op.pl.pallas_call = orig_lower, orig_call


def kernel_ir(candidate, D, *, B=8, T=4096, H=8, decay="logsigmoid"):
  """[(kernel name, num_warps, num_stages, Triton IR)] of forward + backward.

  ``decay="none"`` lowers the kernels without decay (``log_decay=None``).
  """
  if decay not in DECAYS:
    raise ValueError(f"decay must be one of {DECAYS}, got {decay!r}")
  S = jax.ShapeDtypeStruct
  structs = [S((B, T, H, D), jnp.bfloat16)] * 3 + [S((B, T, H), jnp.float32)]

  def loss(q, k, v, g):
    o, _ = pallas_op.pallas_linear_attention(
        q, k, v, None if decay == "none" else g, **candidate.kwargs())
    return jnp.sum(o.astype(jnp.float32))

  with _capture_triton_ir() as found:
    export_for_cuda(lambda *a: jax.value_and_grad(loss, argnums=range(4))(*a), *structs)
  return found


def async_waits(ttgir: str):
  """The ``num`` of every ``ttg.async_wait`` in Triton GPU IR, in order.

  In a software-pipelined loop, num > 0 leaves that many async copy groups in
  flight while the step computes; num = 0 waits for every load first (no
  overlap of the next chunk's loads with this chunk's matmuls).
  """
  return [int(n) for n in re.findall(r"ttg\.async_wait[^\n]*?\{num = (\d+)", ttgir)]


SASS_OPS = ("LDL", "STL", "MUFU", "HGMMA", "BAR")


def sass_counts(sass: str):
  """Static instruction counts of ``cuobjdump -sass`` text.

  Returns:
    {"total": all instructions, and one count per opcode of SASS_OPS}
    (an opcode counts with all its modifiers, e.g. MUFU.EX2).
  """
  ops = re.findall(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)", sass)
  return dict(total=len(ops), **{op: ops.count(op) for op in SASS_OPS})


def _bin(tool):
  import triton  # pylint: disable=import-outside-toplevel
  return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", tool)


def _ptxas():
  """The ptxas that Triton itself assembles sm_90 PTX with.

  Triton 3.9 emits PTX 9.4, which its legacy ``bin/ptxas`` (CUDA 12.9) refuses;
  it assembles with ``bin/ptxas-blackwell`` (CUDA 13) instead, through
  ``get_ptxas(arch)``. Older Triton (3.6) has no such choice: ``bin/ptxas``.
  """
  try:
    from triton.backends.nvidia.compiler import get_ptxas  # pylint: disable=import-outside-toplevel
    tool = get_ptxas(90)
  except (ImportError, TypeError):
    return _bin("ptxas")
  return getattr(tool, "path", tool)


def _run(cmd):
  """Runs a CUDA tool; its own message is the error when it fails."""
  res = subprocess.run(cmd, capture_output=True, text=True, check=False)
  if res.returncode:
    raise RuntimeError(f"{os.path.basename(cmd[0])} failed (exit {res.returncode}): "
                       f"{(res.stderr or res.stdout).strip()[:2000]}")
  return res


def compile_report(ir: str, num_warps: int, num_stages: int, workdir: str, tag: str,
                   sass: bool = False):
  """(registers, spill bytes, shared memory bytes, async_wait nums, SASS counts) of a kernel.

  Compiled for sm_90a; the SASS counts (``sass_counts``) are None unless ``sass``.
  """
  import triton  # pylint: disable=import-outside-toplevel
  from triton.backends.compiler import GPUTarget  # pylint: disable=import-outside-toplevel
  src = os.path.join(workdir, f"{tag}.ttir")
  with open(src, "w", encoding="utf-8") as f:
    f.write(ir)
  compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                            options=dict(num_warps=num_warps, num_stages=num_stages))
  ptx = os.path.join(workdir, f"{tag}.ptx")
  with open(ptx, "w", encoding="utf-8") as f:
    f.write(compiled.asm["ptx"])
  res = _run([_ptxas(), "-v", "--gpu-name", "sm_90a", ptx, "-o", os.devnull])
  counts = None
  if sass:
    cubin = os.path.join(workdir, f"{tag}.cubin")
    with open(cubin, "wb") as f:
      f.write(compiled.asm["cubin"])
    counts = sass_counts(_run([_bin("cuobjdump"), "-sass", cubin]).stdout)
  return parse_ptxas(res.stderr) + (compiled.metadata.shared, async_waits(compiled.asm["ttgir"]),
                                    counts)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--configs", default="c64_bv64_w4_s2",
                 help="comma-separated PALLAS_CONFIGS names, or 'all'")
  p.add_argument("--D", default="64,128", help="comma-separated head dims (Dk = Dv)")
  p.add_argument("--decay", default="logsigmoid", choices=DECAYS,
                 help="lower the kernels with log-decays, or without (none)")
  p.add_argument("--sass", action="store_true",
                 help="also count SASS instructions (total, LDL, STL, MUFU, HGMMA, BAR)")
  a = p.parse_args(argv)
  names = sorted(PALLAS_CONFIGS) if a.configs == "all" else a.configs.split(",")
  unknown = sorted(set(names) - set(PALLAS_CONFIGS))
  if unknown:
    p.error(f"unknown --configs {unknown}; choose from {sorted(PALLAS_CONFIGS)}")
  try:
    import triton  # pylint: disable=import-outside-toplevel,unused-import
  except ImportError:
    print("ptxas_report needs the triton package (pip install triton)", file=sys.stderr)
    return 2
  extra = "".join(f" {op} |" for op in ("SASS",) + SASS_OPS) if a.sass else ""
  print("| config | D | kernel | warps | stages | registers | spill stores B | shared KB "
        "| async_wait num |" + extra)
  print("|---" * (9 + (1 + len(SASS_OPS)) * a.sass) + "|")
  with tempfile.TemporaryDirectory() as tmp:
    for name in names:
      for D in (int(x) for x in a.D.split(",")):
        for kname, warps, stages, ir in kernel_ir(PALLAS_CONFIGS[name], D, decay=a.decay):
          regs, spill, smem, waits, counts = compile_report(
              ir, warps, stages, tmp, f"{name}_{D}_{kname}", sass=a.sass)
          cells = "".join(f" {counts[k]} |" for k in ("total",) + SASS_OPS) if counts else ""
          print(f"| {name} | {D} | {kname} | {warps} | {stages} | {regs} | {spill} | "
                f"{smem / 1024:.0f} | {', '.join(map(str, waits)) or '-'} |" + cells, flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
