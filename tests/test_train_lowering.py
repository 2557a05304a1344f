"""CUDA cross-lowering of whole training steps through the Pallas kernels (CPU host).

The kernel tests (``test_kernels_lowering.py``) lower the op alone. These lower
the jitted training step a GPU run executes with ``attn_impl="pallas"``: the
model under ``nn.scan`` over layers, gradient accumulation under ``lax.scan``,
the D5 statistics and the optimizer, for every stage whose mixer is linear
attention. That is where an integration error that only a GPU build shows
(a head dimension the kernels cannot tile, a primitive without a CUDA lowering
inside the step) would surface. The other stages' steps are lowered too: they
have no kernel, but every primitive in them needs a CUDA lowering; so does every
stage's jitted sampling loop.
"""

import jax
import jax.numpy as jnp
import pytest

from qsf_jax.kernels.lowering import can_lower_for_cuda, count_triton_calls, export_for_cuda
from qsf_jax.models import config as model_config
from qsf_jax.models import lm
from qsf_jax.training import optim, sampling, state as train_state, step as train_step

pytestmark = pytest.mark.filterwarnings(
    "ignore:The Pallas Triton backend is deprecated:DeprecationWarning")

_OK, _WHY = can_lower_for_cuda()
requires_cuda_lowering = pytest.mark.skipif(
    not _OK, reason=f"this jaxlib cannot cross-lower Pallas-Triton for CUDA ({_WHY})")


def _export_train_step(stage, preset, *, grad_accum=2, **overrides):
  """Exports one optimizer step of ``stage`` for CUDA; returns its Triton call count."""
  mcfg = model_config.get_config(stage, preset, **overrides)
  model = lm.build_model(mcfg)
  B, T, steps = 2 * grad_accum, mcfg.max_seq_len, 100
  tx = optim.make_optimizer(steps)

  def fresh_state():
    params, collections = train_state.init_variables(model, 0, T)
    return train_state.create_train_state(params, collections, tx, 0)

  state = jax.eval_shape(fresh_state)  # shapes only: nothing is initialised
  stats = mcfg.stats_steps if "norm_stats" in state.collections else None
  step_fn = train_step.make_train_step(
      model, tx, schedule=optim.onecycle_schedule(steps), total_steps=steps,
      anneal_frac=mcfg.anneal_frac, grad_accum=grad_accum, stats_steps=stats)
  shape = (grad_accum, B // grad_accum, T) if grad_accum > 1 else (B, T)
  S = jax.ShapeDtypeStruct
  batch = {"inputs": S(shape, jnp.int32), "targets": S(shape, jnp.int32),
           "mask": S(shape, jnp.float32)}
  return count_triton_calls(export_for_cuda(step_fn, state, batch))


@requires_cuda_lowering
@pytest.mark.parametrize("stage", ["koopman_attn", "hamiltonian_attn", "gla"])
def test_linear_attention_stages_train_through_the_kernels(stage):
  # One forward and one fused backward kernel: nn.scan shares them across layers and
  # the accumulation scan across micro-batches. bf16 operands, d_h = 32.
  assert _export_train_step(stage, "small", attn_impl="pallas", dtype="bfloat16") == 2


@requires_cuda_lowering
def test_the_paper_head_dimension_is_padded_for_the_kernels():
  # d = 320 over 8 heads gives d_h = 40, which no Pallas tile takes as it is: the op
  # pads it to 64. Two layers and a small vocabulary keep the export short.
  assert _export_train_step("koopman_attn", "paper", grad_accum=1, attn_impl="pallas",
                            n_layers=2, vocab_size=512) == 2


@requires_cuda_lowering
def test_the_xla_path_has_no_kernel():
  # The count is the kernels', not an artefact of the export: the chunked XLA form
  # of the same step lowers with no Triton call.
  assert _export_train_step("koopman_attn", "small", attn_impl="xla") == 0


@pytest.mark.parametrize("stage", ["fnet", "koopman", "transformer", "wave"])
def test_the_other_stages_lower_for_cuda(stage):
  # No kernel, but every primitive of the step needs a CUDA lowering: the wave stage's
  # complex LU solves, Stage II's Fourier mixing, the transformer's softmax attention.
  assert _export_train_step(stage, "tiny") == 0


@pytest.mark.parametrize("stage", model_config.STAGES)
def test_sampling_lowers_for_cuda(stage):
  # The whole sampling loop (QSF D14) as `generate` jits it: the prompt fed and new
  # tokens drawn one at a time through each stage's decode cache (the token recurrence
  # of linear attention, the exact O(t) Fourier cache, the Cayley cell), top-k included.
  mcfg = model_config.get_config(stage, "tiny")
  model = lm.build_model(mcfg)
  variables = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0),
                                                jnp.zeros((1, 8), jnp.int32)))
  params = variables["params"]
  collections = {k: v for k, v in variables.items() if k != "params"}
  S = jax.ShapeDtypeStruct

  def draw(params, collections, prompt_BP, key):
    return sampling._generate(params, collections, prompt_BP, key, jnp.float32(0.8),
                              jnp.float32(0.0), model=model, max_new_tokens=4, top_k=5)

  key = jax.eval_shape(lambda: jax.random.PRNGKey(0))
  exported = export_for_cuda(draw, params, collections, S((2, 3), jnp.int32), key)
  assert exported.out_avals[0].shape == (2, 4)
