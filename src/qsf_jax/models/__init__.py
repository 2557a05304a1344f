"""The model zoo: QSF stages, baselines and the wave-function LM (Flax Linen).

>>> from qsf_jax.models import get_config, build_model
>>> cfg = get_config("koopman_attn", "tiny")
>>> model = build_model(cfg)
>>> variables = model.init(jax.random.key(0), tokens_BT)   # {"params", "norm_stats"}
>>> logits_BTV = model.apply(variables, tokens_BT, beta=0.0)
"""

from qsf_jax.models.config import PRESETS, STAGES, ModelConfig, get_config
from qsf_jax.models.koopman import koopman_matrices, orthogonal_from_free
from qsf_jax.models.lm import build_model, init_cache
from qsf_jax.models.norms import anneal_beta, stats_window
from qsf_jax.models.params import (
    PAPER_TABLE2,
    count_params,
    paper_param_counts,
    shared_param_paths,
    transfer_params,
    weight_decay_mask,
)

__all__ = [
    "PAPER_TABLE2", "PRESETS", "STAGES", "ModelConfig", "anneal_beta", "build_model",
    "count_params", "get_config", "init_cache", "koopman_matrices", "orthogonal_from_free",
    "paper_param_counts", "shared_param_paths", "stats_window", "transfer_params",
    "weight_decay_mask",
]
