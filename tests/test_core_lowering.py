"""CUDA cross-lowering of the pure-function cores (CPU host).

Every public array function of ``qsf_jax.physics`` and ``qsf_jax.wavefunction``
is exported for the ``cuda`` platform under an abstract H100, as notebooks call
them on GPU machines: in float32, and in float64 (the physics core's dtype in the
spec) with complex128 for the wave-function core. Static options (``mode``,
``form``, ``n_sub`` as an int, ``variant``, ``method``, ``return_states``,
``n_paths``) are closed over; arrays, and where marked the scalars dt, sigma_m and
sigma_K, are abstract, so value checks are skipped as under any jit. A primitive
without a CUDA lowering, or a host callback, added to one of these functions fails
its export here. Each group is exported as one module (one trace and lowering); only
when that fails are its functions exported one by one, so that the failure names them.

Every covered function lowers with jaxlib's cuSOLVER custom calls only (LU for
``expm`` and the Cayley solves, Cholesky for the measurement update, ``eigh`` for
the polar factor of ``isometry_from_real``), all of which jax.export accepts; none
needs a custom call without a compatibility guarantee (such as the nonsymmetric
``eig``'s), which export would refuse even where a GPU run works. Not covered, as they
run on the host in float64 by design and refuse a tracer by name:
``spectral_analysis``, ``koopman_generator``, ``commutator_norm``,
``layer_generator``, ``propagate_layer``, ``spectral_projectors``,
``effective_gain`` and ``exact_substeps`` (hence ``n_sub="auto"`` of the
Kalman-Bucy mode, which needs concrete values: pass an int under jit).
"""

import jax
import jax.numpy as jnp
import pytest

from qsf_jax import physics as P
from qsf_jax import wavefunction as W
from qsf_jax.kernels.lowering import export_for_cuda

D, T, N, K = 4, 8, 4, 3


def _structs(spec, dtype):
  """ShapeDtypeStructs from a spec string per argument: "v" (D,), "m" (D, D),
  "A" (T, D, D), "b" (T, D), "s" scalar, "k" PRNG key, "cv" (N,), "cm" (N, N),
  "cA" (T, N, N), "cr" (K, N), "cK" (K, N, N), "r6" (6, N), "n" (T,)."""
  f = jnp.dtype(dtype)
  c = jnp.complex128 if f == jnp.float64 else jnp.complex64
  S = jax.ShapeDtypeStruct
  shapes = {"v": ((D,), f), "m": ((D, D), f), "A": ((T, D, D), f), "b": ((T, D), f),
            "s": ((), f), "n": ((T,), f), "cv": ((N,), c), "cm": ((N, N), c),
            "cA": ((T, N, N), c), "cr": ((K, N), c), "cK": ((K, N, N), c), "r6": ((6, N), f)}
  return [jax.eval_shape(lambda: jax.random.key(0)) if a == "k" else S(*shapes[a])
          for a in spec.split()]


def _lower(fn, spec, dtype):
  with jax.enable_x64(dtype == "float64"):
    exported = export_for_cuda(fn, *_structs(spec, dtype))
  assert exported.platforms == ("cuda",)


DTYPES = ["float32", "float64"]

PROPAGATORS = {
    "propagate-paper": (lambda x0, A, b, y, M: P.propagate(x0, A, b, y, M), "v m v v m"),
    "propagate-kalman_bucy": (
        lambda x0, A, b, y, M: P.propagate(x0, A, b, y, M, mode="kalman_bucy", n_sub=2),
        "v m v v m"),
    "propagate_full-paper-traced_scalars": (
        lambda x0, A, b, y, M, dt, sm, sk: P.propagate_full(x0, A, b, y, M, dt, sm, sk),
        "v m v v m s s s"),
    "propagate_full-kalman_bucy-traced_scalars": (
        lambda x0, A, b, y, M, dt, sm, sk: P.propagate_full(
            x0, A, b, y, M, dt, sm, sk, mode="kalman_bucy", n_sub=2),
        "v m v v m s s s"),
    "kalman_bucy_step": (
        lambda m, Pc, A, b, y, M, dt, sm, sk: P.kalman_bucy_step(
            m, Pc, A, b, y, M, dt=dt, sigma_m=sm, sigma_K=sk, n_sub=2),
        "v m m v v m s s s"),
    "measurement_update-gain": (
        lambda m, S0, y, M, r: P.measurement_update(m, S0, y, M, r), "v m v m s"),
    "measurement_update-information": (
        lambda m, S0, y, M, r: P.measurement_update(m, S0, y, M, r, form="information"),
        "v m v m s"),
    "chain_filter-paper": (lambda x0, A, b, y, M: P.chain_filter(x0, A, b, y, M), "v A b b m"),
    "chain_filter_full-paper-information-traced_scalars": (
        lambda x0, A, b, y, M, dt, sm, sk, P0: P.chain_filter_full(
            x0, A, b, y, M, dt=dt, sigma_m=sm, sigma_K=sk, P0=P0, form="information"),
        "v A b b m s s s m"),
    "chain_filter_full-kalman_bucy": (
        lambda x0, A, b, y, M: P.chain_filter_full(x0, A, b, y, M, mode="kalman_bucy", n_sub=2),
        "v A b b m"),
}

KOOPMAN = {
    "decompose_generator": (P.decompose_generator, "m"),
    "koopman_affine": (lambda A, b, dt: P.koopman_affine(A, b, dt), "m v s"),
    "koopman_mean": (lambda A, b, x: P.koopman_mean(A, b, x, 0.5), "m v v"),
    "koopman_cov": (lambda A, sk, dt: P.koopman_cov(A, sk, dt), "m s s"),
    "hamiltonian_koopman": (P.hamiltonian_koopman, "m"),
    "continuous_bias": (P.continuous_bias, "m v"),
    "step_maps": (lambda A, b, dt: P.step_maps(A, b, dt), "A b s"),
    "compose_affine": (lambda U1, c1, U2, c2: P.compose_affine((U1, c1), (U2, c2)), "A b A b"),
    "chain_mean-shared": (lambda x0, A, b: P.chain_mean(x0, A, b, n_steps=T), "v m v"),
}
KOOPMAN["scan_affine"] = (lambda x0, U, c: P.scan_affine(x0, U, c), "v A b")
for _m in ("associative", "sequential"):
  KOOPMAN[f"chain_mean-{_m}"] = (
      lambda x0, A, b, m=_m: P.chain_mean(x0, A, b, method=m), "v A b")
  KOOPMAN[f"chain_measured_mean-{_m}"] = (
      lambda x0, A, b, y, M, dt, sm, sk, m=_m: P.chain_measured_mean(
          x0, A, b, y, M, dt=dt, sigma_m=sm, sigma_K=sk, method=m), "v A b b m s s s")

SSE = {
    "sse_increments": (lambda k, dt: P.sse_increments(k, T, D, dt), "k s"),
    "sse_integrate": (lambda x0, A, b, y, dW, dWK, sm, dt, sk: P.sse_integrate(
        x0, A, b, y, dW, dWK, sigma_m=sm, dt=dt, sigma_K=sk), "v m v v n b s s s"),
}
for _v in ("paper", "centered", "linear"):  # simulate_sse integrates through sse_integrate
  SSE[f"sse_coefficients-{_v}"] = (
      lambda x, A, b, y, sm, v=_v: P.sse_coefficients(x, A, b, y, sigma_m=sm, variant=v),
      "v m v v s")
  SSE[f"simulate_sse-{_v}"] = (
      lambda k, x0, A, b, y, sm, dt, sk, v=_v: P.simulate_sse(k, x0, A, b, y, sm, dt, T, v, sk),
      "k v m v v s s s")
SSE["simulate_sse-ensemble_endpoints"] = (
    lambda k, x0, A, b, y: P.simulate_sse(k, x0, A, b, y, 1.0, 0.1, T, n_paths=3,
                                          return_path=False), "k v m v v")

WAVE = {
    "amplitudes": (W.amplitudes, "cr cv"),
    "born_probabilities": (W.born_probabilities, "cr cv s"),
    "born_logits": (lambda Wm, psi, beta, bias: W.born_logits(Wm, psi, beta, bias[:K]),
                    "cr cv s v"),
    "normalized_born": (W.normalized_born, "cr cv"),
    "povm_from_isometry": (W.povm_from_isometry, "cr s"),
    "povm_probabilities": (W.povm_probabilities, "cK cv"),
    "cayley_unitary": (W.cayley_unitary, "cm s"),
    "cayley_step": (W.cayley_step, "cm cv s"),
    "cayley_step-real": (W.cayley_step, "m v s"),
    "cayley_scan": (W.cayley_scan, "cA cv s"),
    "cayley_scan-final_state": (lambda H, psi: W.cayley_scan(H, psi, 0.5, return_states=False),
                                "cA cv"),
    "cayley_scan_parallel": (W.cayley_scan_parallel, "cA cv s"),
    "cayley_products": (W.cayley_products, "cA s"),
    "hamiltonian_from_unitary": (W.hamiltonian_from_unitary, "cm s"),
    "orthogonal_cayley": (W.orthogonal_cayley, "m s"),
    "orthogonal_step": (W.orthogonal_step, "m v s"),
    "cayley_scan_with_currents": (W.cayley_scan_with_currents, "cA cv s"),
    "instantaneous_currents": (W.instantaneous_currents, "cm cv"),
    "probability_currents": (W.probability_currents, "cm cv cv s"),
    "readout_rates": (W.readout_rates, "cK cm cv"),
    "dagger": (W.dagger, "cm"),
    "hermitian_from_real": (W.hermitian_from_real, "m m"),
    "isometry_from_real": (W.isometry_from_real, "r6 r6"),
    "random_hermitian": (lambda k: W.random_hermitian(k, N, batch_shape=(2,)), "k"),
    "realify": (W.realify, "cm"),
    "realify_state": (W.realify_state, "cv"),
    "skew_from_real": (W.skew_from_real, "m"),
}


def _lower_group(group, dtype):
  """Exports every function of ``group`` in one module (one trace, one lowering); if
  that fails, exports them one by one so that the failure names its functions."""
  def all_of(*args_per_fn):
    return [fn(*args) for (fn, _), args in zip(group.values(), args_per_fn)]

  try:
    with jax.enable_x64(dtype == "float64"):
      structs = [tuple(_structs(spec, dtype)) for _, spec in group.values()]
      exported = export_for_cuda(all_of, *structs)
  except Exception:  # pylint: disable=broad-except
    failures = []
    for name, (fn, spec) in sorted(group.items()):
      try:
        _lower(fn, spec, dtype)
      except Exception as e:  # pylint: disable=broad-except
        failures.append(f"{name} ({dtype}): {type(e).__name__}: {str(e)[:300]}")
    pytest.fail("no CUDA lowering for:\n" + "\n".join(failures or ["(only together)"]))
  assert exported.platforms == ("cuda",)


# Both modes of propagate (paper, QSF eqs. 57-58; kalman_bucy, spec §6.3), both forms
# of the measurement update (QSF eqs. 16-20) and the chain filters over them; the free
# Koopman propagator (QSF eq. 58, Van Loan exponentials) and the affine chains over
# tokens, by parallel prefix and sequentially; every SSE variant (QSF eqs. 42-44) under
# Euler-Maruyama, with the PRNG; the wave-function core with complex64 states for
# float32 and complex128 for float64.
GROUPS = {"propagators_and_filters": PROPAGATORS, "koopman_flow_and_chains": KOOPMAN,
          "sse": SSE, "wavefunction": WAVE}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group", sorted(GROUPS))
def test_core_lowers_for_cuda(group, dtype):
  _lower_group(GROUPS[group], dtype)
