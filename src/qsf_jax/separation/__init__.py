"""The separation experiment: complex unitary vs real orthogonal models (wave-function paper §2).

Modules:
  bounds        KL, double-centred log error, rank certificate, Eckart-Young bound (spec §2.5)
  models        complex (Born), real (affine-softmax) and realified (quadratic) models
  elimination   LAPACK-free Cayley maps used for training
  construction  explicit parameters that solve T_N exactly (spec §2.4)
  train         full-batch Adam on the exact expected cross-entropy, several seeds at once
  sweep         the experiment sweep and its summary table
  plot          the error-vs-dimension figure

The task family itself is ``qsf_jax.tasks.separation``.
"""
