"""qsf-jax: quantum-inspired sequence models in JAX.

The public physics API is importable from the package root, e.g.
``from qsf_jax import propagate, spectral_analysis, cayley_step``.
"""

__version__ = "0.1.0"

# --- physics: generators (QSF eq. 1, 58) ---
from qsf_jax.physics.generators import decompose_generator, koopman_affine, koopman_cov, koopman_mean
# --- physics: propagators and chains (QSF eqs. 56-59, §6.2-6.5) ---
from qsf_jax.physics.propagate import GaussianPropagator, GaussianState, exact_substeps, kalman_bucy_step, measurement_update, propagate, propagate_full
from qsf_jax.physics.chain import chain_mean, chain_measured_mean, compose_affine, scan_affine, step_maps
from qsf_jax.physics.kalman_chain import chain_filter, chain_filter_full
from qsf_jax.physics.layer import continuous_bias, layer_generator, propagate_layer
# --- physics: spectra and SSE (QSF §6.6-6.7) ---
from qsf_jax.physics.spectral import commutator_norm, hamiltonian_koopman, koopman_generator, spectral_analysis
from qsf_jax.physics.projectors import SpectralProjectors, effective_gain, spectral_projectors
from qsf_jax.physics.sse import simulate_sse, sse_coefficients, sse_increments, sse_integrate
# --- wavefunction: Cayley cell, Born readout, currents ---
from qsf_jax.wavefunction.hermitian import hermitian_from_real, isometry_from_real, random_hermitian, skew_from_real
from qsf_jax.wavefunction.cayley import cayley_products, cayley_scan, cayley_scan_parallel, cayley_step, cayley_unitary, hamiltonian_from_unitary, orthogonal_cayley, orthogonal_step, realify, realify_state
from qsf_jax.wavefunction.born import born_logits, born_probabilities, normalized_born, povm_from_isometry, povm_probabilities
from qsf_jax.wavefunction.currents import cayley_scan_with_currents, instantaneous_currents, probability_currents, readout_rates
