"""Pallas GPU kernels for qsf-jax, installed as ``qsf_jax.kernels``.

This folder lives at the repository top level (``kernels/``) and is mapped into
the project namespace by ``pyproject.toml`` (``package-dir``), so it is imported
as ``import qsf_jax.kernels`` and never as a top-level ``kernels`` package.
"""
