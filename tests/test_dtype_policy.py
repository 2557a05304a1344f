"""Dtype edges at the public API: 64-bit integer ids without x64, float64 parameters."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qsf_jax.models import build_model, get_config

pytestmark = pytest.mark.usefixtures("fast_compiles")


def test_ids_past_int32_are_refused_not_wrapped():
  """Without x64, jnp.asarray narrows int64 by wrapping: id 2**32 + 5 became the valid
  id 5 and the model scored it without a word (uint64 2**63 became 0)."""
  assert not jax.config.jax_enable_x64
  model = build_model(get_config("koopman", "tiny"))
  variables = model.init(jax.random.key(0), jnp.zeros((1, 3), jnp.int32))
  assert np.isfinite(model.apply(variables, np.array([[5, 6, 7]], np.int64))).all()  # in range
  for bad in (np.array([[2 ** 32 + 5, 6, 7]], np.int64),
              np.array([[2 ** 63, 6, 7]], np.uint64)):
    with pytest.raises(ValueError, match=r"tokens_BT has integers in \[6, \d+\] \(dtype "
                       r"u?int64\), outside u?int32's range .*jax_enable_x64"):
      model.apply(variables, bad)
  # A Python int past int32 was an OverflowError; every bad input is a ValueError.
  with pytest.raises(ValueError, match="tokens_BT could not be converted to an array"):
    model.apply(variables, [[2 ** 32 + 5, 6, 7]])


@pytest.mark.parametrize("overrides", [{}, {"wave_layers": 2, "wave_readout": "born"}])
def test_wave_model_keeps_float32_with_float64_params(x64, overrides):
  """Parameters in float64 (a notebook under x64 perturbing them with NumPy draws) gave
  float64 logits, against the docstring's float32, and a float64 decode cache, which
  broke ``generate``'s scan ("carry input and carry output must have equal types")."""
  from qsf_jax.training.sampling import generate  # pylint: disable=g-import-not-at-top
  model = build_model(get_config("wave", "tiny", **overrides))
  tokens = jnp.asarray([[1, 2, 3, 4]], jnp.int32)
  variables = model.init(jax.random.key(0), tokens)
  params64 = jax.tree.map(lambda p: jnp.asarray(p, jnp.float64), variables["params"])
  logits = model.apply(variables, tokens)
  logits64 = model.apply({"params": params64}, tokens)
  assert logits64.dtype == jnp.float32
  np.testing.assert_array_equal(np.asarray(logits64), np.asarray(logits))
  new = generate(model, params64, {}, [1, 2, 3], max_new_tokens=3, rng=jax.random.key(0),
                 temperature=0.0)
  assert new.shape == (3,)
  np.testing.assert_array_equal(
      np.asarray(new), np.asarray(generate(model, variables["params"], {}, [1, 2, 3],
                                           max_new_tokens=3, rng=jax.random.key(0),
                                           temperature=0.0)))
