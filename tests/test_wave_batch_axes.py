"""One batch convention across the wave-function API (wave-function spec §1.3-§1.6).

Every function that takes an operator (a Hamiltonian, a readout, POVM elements)
with states (..., N) accepts the operator either shared by all states or with
the states' leading axes, one per state. Both forms must equal ``jax.vmap`` of
the unbatched call, with two batch axes so that ``...`` is exercised.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qsf_jax.wavefunction import born as bn
from qsf_jax.wavefunction import cayley as cy
from qsf_jax.wavefunction import currents as cu

pytestmark = pytest.mark.usefixtures("fast_compiles", "x64")

BATCH = (2, 3)
N, K, T = 4, 5, 6


def _real(seed, shape):
  return np.random.default_rng(seed).standard_normal(shape)


def _states(seed, batch=BATCH):
  z = _real(seed, batch + (N,)) + 1j * _real(seed + 1, batch + (N,))
  return z / np.linalg.norm(z, axis=-1, keepdims=True)


def _H(seed, batch=()):
  """Random Hermitian matrices (numpy: no compiles)."""
  Z = _real(seed, batch + (N, N)) + 1j * _real(seed + 1, batch + (N, N))
  return 0.5 * (Z + np.conj(np.swapaxes(Z, -1, -2)))


def _M(seed, batch=()):
  """Random isometries (K, N), M^dagger M = I (numpy QR: no compiles)."""
  Z = _real(seed, batch + (K, N)) + 1j * _real(seed + 1, batch + (K, N))
  return np.linalg.qr(Z)[0]


def _assert_matches_vmap(fn, args, in_axes, out_axes=0):
  """``fn(*args)`` equals ``fn`` vmapped over both batch axes (BATCH) with the same
  in/out axes for each; both in one jitted program (one compile)."""
  mapped = jax.vmap(jax.vmap(fn, in_axes, out_axes), in_axes, out_axes)
  got, want = jax.jit(lambda *a: (fn(*a), mapped(*a)))(*args)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    assert g.shape == w.shape
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=0, atol=1e-12)


def _A(seed, batch=()):
  """Random real antisymmetric matrices (numpy)."""
  S = _real(seed, batch + (N, N))
  return S - np.swapaxes(S, -1, -2)


# (name, call(op, *states), operator builder, number of state args)
_STATE_FUNCTIONS = [
    ("cayley_step", lambda H, psi: cy.cayley_step(H, psi, 0.7), _H, 1),
    ("orthogonal_step", lambda A, h: cy.orthogonal_step(A, jnp.real(h), 0.7), _A, 1),
    ("instantaneous_currents", cu.instantaneous_currents, _H, 1),
    ("probability_currents", lambda H, a, b: cu.probability_currents(H, a, b, 0.7), _H, 2),
    ("amplitudes", bn.amplitudes, _M, 1),
    ("born_probabilities", lambda M, psi: bn.born_probabilities(M, psi, 0.1), _M, 1),
    ("born_logits", lambda W, psi: bn.born_logits(W, psi, 2.0), _M, 1),
    ("normalized_born", bn.normalized_born, _M, 1),
    ("povm_probabilities", lambda M, psi: bn.povm_probabilities(
        bn.povm_from_isometry(M, 0.1), psi), _M, 1),
]


@pytest.mark.parametrize("name,fn,make_op,n_states", _STATE_FUNCTIONS,
                         ids=[f[0] for f in _STATE_FUNCTIONS])
def test_operator_per_state_and_shared(name, fn, make_op, n_states):
  states = [_states(10 + 2 * i) for i in range(n_states)]
  _assert_matches_vmap(fn, [make_op(0, BATCH)] + states, 0)
  _assert_matches_vmap(fn, [make_op(4)] + states, (None,) + (0,) * n_states)


def test_readout_rates_batched_povm_and_hamiltonian():
  psi = _states(10)
  Ms = bn.povm_from_isometry(_M(0, BATCH), 0.1)
  H = _H(4, BATCH)
  _assert_matches_vmap(cu.readout_rates, (Ms, H, psi), 0)
  # Shared POVM with per-state Hamiltonians, and the reverse.
  _assert_matches_vmap(cu.readout_rates, (Ms[0, 0], H, psi), (None, 0, 0))
  _assert_matches_vmap(cu.readout_rates, (Ms, H[0, 0], psi), (0, None, 0))


def test_povm_from_isometry_batched():
  _assert_matches_vmap(lambda m: bn.povm_from_isometry(m, 0.2), (_M(0, BATCH),), 0)


@pytest.mark.parametrize("scan", [cy.cayley_scan, cy.cayley_scan_parallel,
                                  cu.cayley_scan_with_currents],
                         ids=["cayley_scan", "cayley_scan_parallel", "cayley_scan_with_currents"])
def test_sequences_per_state_and_shared(scan):
  """A sequence (T, ..., N, N) per state, or (T, N, N) shared; time stays the leading axis."""
  psi0 = _states(10)
  fn = lambda H_seq, p: scan(H_seq, p, 0.7)
  # Outputs with a time axis keep it first: map over axis 1 of those, 0 of the rest.
  out_axes = {cy.cayley_scan: (0, 1), cy.cayley_scan_parallel: (0, 1),
              cu.cayley_scan_with_currents: cu.CurrentsTrace(1, 1, 0)}[scan]
  _assert_matches_vmap(fn, (_H(0, (T,) + BATCH), psi0), (1, 0), out_axes)
  _assert_matches_vmap(fn, (_H(4, (T,)), psi0), (None, 0), out_axes)


def test_cayley_products_batched():
  _assert_matches_vmap(lambda h: cy.cayley_products(h, 0.7), (_H(0, (T,) + BATCH),), 1, 1)


def test_mismatched_batch_axes_are_refused_with_both_shapes():
  """Refused at trace time, before any computation (the operators need not be valid)."""
  psi = _states(10)
  M = lambda batch: jnp.ones(batch + (K, N), jnp.complex128)
  H = jnp.zeros((3, 2, N, N))
  with pytest.raises(ValueError, match=r"batched H of shape \(3, 2, 4, 4\) needs psi with the same "
                     r"leading axes, shape \(3, 2, 4\), got \(2, 3, 4\); pass one H of shape \(4, 4\)"):
    cu.instantaneous_currents(H, psi)
  with pytest.raises(ValueError,
                     match=r"batched M of shape \(3, 5, 4\) needs psi .*\(3, 4\), got \(2, 3, 4\)"):
    bn.born_probabilities(M((3,)), psi)
  with pytest.raises(ValueError, match=r"batched Ms of shape \(2, 5, 4, 4\) needs psi"):
    cu.readout_rates(jnp.zeros((2, K, N, N)), jnp.zeros((N, N)), psi)
  with pytest.raises(ValueError, match=r"batched H_seq\[t\] of shape \(3, 4, 4\) needs psi0"):
    cy.cayley_scan(jnp.zeros((T, 3, N, N)), psi)
