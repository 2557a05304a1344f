"""The training state: a small pytree that checkpoints as a plain dict."""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax


@flax.struct.dataclass
class TrainState:
  """Everything that changes during training.

  Attributes:
    step: number of optimizer updates applied so far (int32 scalar). Since a
      batch is a pure function of ``(seed, step)``, it also locates the data.
    params: the model's real parameters (pytree).
    opt_state: the optimizer state (pytree of optax states).
    rng: raw PRNG key data (uint32, (2,)) for stochastic layers; split every step.
    collections: the model's non-parameter collections, e.g. ``{"norm_stats": ...}``
      (QSF spec D5: the frozen per-norm scale), ``{}`` when the model has none.
  """
  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array
  collections: Any

  def as_dict(self) -> dict:
    """The state as a plain dict (the on-disk checkpoint layout)."""
    return {"step": self.step, "params": self.params, "opt_state": self.opt_state,
            "rng": self.rng, "collections": self.collections}

  @classmethod
  def from_dict(cls, d: dict) -> "TrainState":
    return cls(step=d["step"], params=d["params"], opt_state=d["opt_state"], rng=d["rng"],
               collections=d["collections"])


# Collections that are rebuilt on demand and never checkpointed.
TRANSIENT_COLLECTIONS = ("cache", "intermediates")


def split_variables(variables) -> tuple[Any, dict]:
  """Splits a Flax variable dict into (params, other persistent collections)."""
  variables = flax.core.unfreeze(variables)
  params = variables.pop("params")
  collections = {k: v for k, v in variables.items() if k not in TRANSIENT_COLLECTIONS}
  return params, collections


def init_variables(model, seed: int, seq_len: int):
  """Initialises the model's variables from ``seed`` on a (1, seq_len) dummy batch.

  Args:
    model: a Flax Linen module, ``__call__(tokens_BT, ...) -> logits_BTV``.
    seed: integer seed; parameters use ``fold_in(key(seed), 0)``.
    seq_len: dummy sequence length for shape inference.

  Returns:
    (params, collections).
  """
  key = jax.random.fold_in(jax.random.PRNGKey(seed), 0)
  variables = model.init(key, jnp.zeros((1, seq_len), jnp.int32))
  return split_variables(variables)


def create_train_state(params, collections, tx: optax.GradientTransformation,
                       seed: int) -> TrainState:
  """A fresh state at step 0 with a new optimizer state.

  Args:
    params: initial parameters (from ``init_variables`` or a previous stage).
    collections: the model's other persistent collections.
    tx: the optimizer.
    seed: run seed; the step RNG is ``fold_in(key(seed), 1)``.
  """
  rng = jax.random.fold_in(jax.random.PRNGKey(seed), 1)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                    rng=rng, collections=collections)


def abstract_state(state: TrainState) -> dict:
  """Shape/dtype/sharding structs of a state, the restore target for orbax."""
  import orbax.checkpoint as ocp
  return jax.tree.map(ocp.utils.to_shape_dtype_struct, state.as_dict())
