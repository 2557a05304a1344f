"""Named Pallas kernel designs: the table, name resolution, and the op and models using them."""

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qsf_jax import kernels
from qsf_jax.kernels import (DEFAULT_DESIGN, PALLAS_DESIGNS, PallasDesign, linear_attention,
                             pallas_linear_attention, resolve_design)
from qsf_jax.kernels.candidates import DEFAULT_CONFIG, PALLAS_CONFIGS
from qsf_jax.kernels.pallas_op import BACKWARDS, FORWARDS
from qsf_jax.kernels.testing import pallas_calls, random_inputs, rel_rms_error
from qsf_jax.models import build_model, get_config

# Interpret mode and the tiny models are test devices, not what users run: their
# programs compile several times faster without XLA's heavy passes (the
# `fast_compiles` fixture).
pytestmark = [pytest.mark.filterwarnings(
    "ignore:The Pallas Triton backend is deprecated:DeprecationWarning"),
              pytest.mark.usefixtures("fast_compiles")]


def test_default_design_is_what_the_kernels_run_by_default():
  defaults = {name: p.default for name, p in
              inspect.signature(pallas_linear_attention).parameters.items()}
  want = {k: defaults[k] for k in PallasDesign().kwargs()}
  assert PALLAS_DESIGNS[DEFAULT_DESIGN].kwargs() == want
  assert resolve_design("default", 64) == PALLAS_DESIGNS[DEFAULT_DESIGN]
  assert DEFAULT_CONFIG == f"c64_{DEFAULT_DESIGN}"


def test_design_kwargs_carry_every_field():
  # A field that kwargs() leaves out would be silently dropped by every user of a
  # design (linear_attention, the models' attn_pallas_design, bench, gpu_check,
  # ptxas_report), which would then run and time the default in its place.
  for name, d in PALLAS_DESIGNS.items():
    want = dict(fwd_config=d.fwd, bwd_config=d.bwd,
                **{f: getattr(d, f) for f in PallasDesign._fields[2:]})
    assert d.kwargs() == want, name
  # the _pairs designs are their base designs with decay_grad="pairs"
  for base in ("bv64_w4_s2", "bv64_w8_s3_chunkbwd"):
    assert PALLAS_DESIGNS[f"{base}_pairs"] == PALLAS_DESIGNS[base]._replace(decay_grad="pairs")


def test_benchmark_candidates_are_chunk_and_design():
  for name, cand in PALLAS_CONFIGS.items():
    chunk, design = name.split("_", 1)
    assert chunk == f"c{cand.chunk}", name
    assert tuple(cand)[1:] == tuple(PALLAS_DESIGNS[design]), name
    assert resolve_design(name, cand.chunk) == PALLAS_DESIGNS[design]
  for design in PALLAS_DESIGNS.values():
    assert design.backward in BACKWARDS and design.forward in FORWARDS, design


@pytest.mark.parametrize("name, chunk, match", [
    ("bv64_w9_s2", 64, r"unknown pallas_design 'bv64_w9_s2'; choose 'default', one of "
                       r"\[.*'bv64_w8_s3_chunkbwd'.*\], or a benchmark name"),
    ("c64_nope", 64, "unknown pallas_design 'c64_nope'"),
    ("c128_bv64_w8_s2_chunkfwd", 64,
     r"'c128_bv64_w8_s2_chunkfwd' is the benchmark's chunk-128 candidate, but "
     r"chunk_size=64; pass chunk_size=128, or the design name 'bv64_w8_s2_chunkfwd'"),
    (None, 64, "pallas_design must be a design name"),
])
def test_resolve_design_rejects_bad_names(name, chunk, match):
  with pytest.raises(ValueError, match=match):
    resolve_design(name, chunk)


@pytest.mark.parametrize("design, chunk, kernel_names", [
    ("default", 32, ["linear_attention_bwd", "linear_attention_fwd"]),
    ("bv64_w8_s3_chunkbwd", 32, ["linear_attention_bwd_grads", "linear_attention_bwd_states",
                                 "linear_attention_fwd"]),
    ("c32_bv64_w4_s3_chunkfwd", 32, ["linear_attention_bwd", "linear_attention_fwd_out",
                                     "linear_attention_fwd_states"]),
])
def test_linear_attention_runs_the_named_design(design, chunk, kernel_names):
  # T = 70: three chunks of 32, the last padded; float32, with decay.
  q, k, v, g, _ = random_inputs(11, 1, 70, 2, 16, 16, initial_state=False)
  do = np.random.default_rng(11).standard_normal(v.shape).astype(np.float32)

  def value_and_grads(name):
    def loss(q, k, v, g):
      o = linear_attention(q, k, v, g, chunk_size=chunk, impl="pallas", interpret=True,
                           pallas_design=name)
      return jnp.sum(o * do), o
    fun = jax.value_and_grad(loss, argnums=range(4), has_aux=True)
    return fun, fun(q, k, v, g)

  fun, ((_, o), grads) = value_and_grads(design)
  assert sorted({c[0] for c in pallas_calls(fun, q, k, v, g)}) == kernel_names
  _, ((_, o_ref), grads_ref) = value_and_grads("default")
  np.testing.assert_array_equal(np.asarray(o), np.asarray(o_ref))  # every forward: same bits
  for gr, r in zip(grads, grads_ref):
    assert rel_rms_error(gr, r) <= 1e-5  # float32 tolerance (kernels spec §5.2)


def test_linear_attention_checks_the_design_on_every_impl():
  q, k, v, g, _ = random_inputs(12, 1, 8, 1, 16, 16, initial_state=False)
  with pytest.raises(ValueError, match="unknown pallas_design 'fast'"):
    linear_attention(q, k, v, g, impl="xla", pallas_design="fast")
  # A valid design leaves the non-Pallas impls unchanged.
  np.testing.assert_array_equal(
      np.asarray(linear_attention(q, k, v, g, impl="xla", pallas_design="bv32_w4_s2")),
      np.asarray(linear_attention(q, k, v, g, impl="xla")))


@pytest.mark.parametrize("stage", ["koopman_attn", "hamiltonian_attn", "gla"])
def test_models_pass_their_design_to_the_op(monkeypatch, stage):
  seen = []
  real = kernels.linear_attention

  def spy(*args, **kw):
    seen.append((kw.get("impl"), kw.get("pallas_design")))
    return real(*args, **kw)

  monkeypatch.setattr(kernels, "linear_attention", spy)
  cfg = get_config(stage, "tiny", attn_pallas_design="bv64_w8_s3_chunkbwd")
  model = build_model(cfg)
  tokens = jnp.zeros((1, 8), jnp.int32)
  params = model.init(jax.random.key(0), tokens)
  model.apply(params, tokens)
  assert seen and set(seen) == {("auto", "bv64_w8_s3_chunkbwd")}, seen


def test_design_names_say_what_the_designs_do():
  # The benchmark and the GPU suite pick designs by name ("..._split", "..._chunkbwd"):
  # each name's parts must match its fields, or a timed row measures another design.
  for name, d in PALLAS_DESIGNS.items():
    parts = name.split("_")
    assert d.split_sweeps == ("split" in parts), name
    assert (d.backward == "chunked") == ("chunkbwd" in parts), name
    assert (d.forward == "chunked") == ("chunkfwd" in parts), name
    assert (d.decay_grad == "pairs") == ("pairs" in parts), name
    seg = [p[3:] for p in parts if p.startswith("seg")]
    assert d.num_segments == (int(seg[0]) if seg else 1), name
    # bv/w/s name the launch of the kernel the design changes (the backward's for chunkbwd)
    tuned = d.bwd if d.backward == "chunked" else d.fwd
    assert parts[:3] == [f"bv{tuned.block_v}", f"w{tuned.num_warps}", f"s{tuned.num_stages}"], name
