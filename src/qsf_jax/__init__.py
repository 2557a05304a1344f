"""qsf-jax: quantum-inspired sequence models in JAX.

The public physics API is importable from the package root, e.g.
``from qsf_jax import propagate, spectral_analysis, cayley_step``.
"""

__version__ = "0.1.0"

# --- physics: generators (QSF eq. 1, 58) ---
from qsf_jax.physics.generators import decompose_generator, koopman_affine, koopman_cov, koopman_mean
# --- physics: propagators and chains (QSF eqs. 56-59, §6.2-6.5) ---
# --- physics: spectra and SSE (QSF §6.6-6.7) ---
# --- wavefunction: Cayley cell, Born readout, currents ---
