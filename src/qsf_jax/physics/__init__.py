"""The pure-function physics core of the QSF paper (arXiv 2601.00860)."""

from qsf_jax.physics.generators import decompose_generator, koopman_affine, koopman_cov, koopman_mean
from qsf_jax.physics.propagate import GaussianPropagator, GaussianState, exact_substeps, kalman_bucy_step, measurement_update, propagate, propagate_full
from qsf_jax.physics.chain import chain_mean, chain_measured_mean, compose_affine, scan_affine, step_maps
from qsf_jax.physics.kalman_chain import chain_filter, chain_filter_full
from qsf_jax.physics.layer import continuous_bias, layer_generator, propagate_layer
from qsf_jax.physics.spectral import commutator_norm, hamiltonian_koopman, koopman_generator, spectral_analysis
from qsf_jax.physics.projectors import SpectralProjectors, effective_gain, spectral_projectors
from qsf_jax.physics.sse import simulate_sse, sse_coefficients, sse_increments, sse_integrate
