"""The separation experiment: complex unitary vs real orthogonal models (wave-function paper §2).

Modules:
  bounds        KL, double-centred log error, rank certificate, Eckart-Young bound (spec §2.5)
  models        complex (Born), real (affine-softmax), realified (quadratic) and
                complex Born-logit models
  elimination   LAPACK-free Cayley maps used for training
  construction  explicit parameters that solve T_N exactly (spec §2.4)
  adjoint       explicit complex and real (adjoint) models for the Born-logit task (§2.6)
  train         full-batch Adam on the exact expected cross-entropy, several seeds at once
  pairwise_rows, born_logit_rows  the sweep rows of each task
  sweep         the experiment sweep and its summary table
  plot          the error-vs-dimension figure

The task families are ``qsf_jax.tasks.separation`` (T_N, spec §2.3) and
``qsf_jax.tasks.born_logit`` (its Born-logit variant, spec §2.6).
"""
