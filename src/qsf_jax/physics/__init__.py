"""The pure-function physics core of the QSF paper (arXiv 2601.00860)."""

from qsf_jax.physics.generators import decompose_generator, koopman_affine, koopman_cov, koopman_mean
