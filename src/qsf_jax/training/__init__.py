"""Training, evaluation, checkpointing and sampling.

Typical use (what ``python -m experiments.train`` does)::

  from qsf_jax.training import TrainConfig, train_and_evaluate
  cfg = TrainConfig(stage="koopman_attn", preset="small", data="auto", steps=2000)
  result = train_and_evaluate(cfg, "runs/s3")      # resumes if runs/s3 has a checkpoint
  evaluate_workdir("runs/s3")                       # {"val_loss", "perplexity", ...}
  evaluate_workdir("runs/s3", per_token=True)       # + per-token outliers (token_losses)
  context_use.context_use_workdir("runs/s3")        # loss from the last k tokens alone
  sample_workdir("runs/s3", "Once upon a time,")   # recurrent decoding (D14)
"""

from qsf_jax.training.checkpoint import Checkpointer, has_checkpoint
from qsf_jax.training.config import TrainConfig
from qsf_jax.training.errors import (
    CheckpointMismatchError,
    DataChangedError,
    NoCheckpointError,
    NonFiniteLossError,
    TrainConfigError,
)
from qsf_jax.training.evaluation import evaluate_split, evaluate_workdir, perplexity
from qsf_jax.training.loop import TrainResult, train_and_evaluate
from qsf_jax.training.optim import decay_mask, make_optimizer, onecycle_schedule
from qsf_jax.training.progressive import InitReport, init_from_checkpoint
from qsf_jax.training.restore import LoadedRun, load_run
from qsf_jax.training.sampling import generate, sample_text, sample_workdir
from qsf_jax.training.state import TrainState, create_train_state, init_variables
from qsf_jax.training.step import eval_step, make_train_step, masked_xent_sum

__all__ = [
    "CheckpointMismatchError", "Checkpointer", "DataChangedError", "InitReport", "LoadedRun",
    "NoCheckpointError", "NonFiniteLossError", "TrainConfig", "TrainConfigError", "TrainResult",
    "TrainState",
    "create_train_state", "decay_mask", "eval_step", "evaluate_split", "evaluate_workdir",
    "generate", "has_checkpoint", "init_from_checkpoint", "init_variables", "load_run",
    "make_optimizer", "make_train_step", "masked_xent_sum", "onecycle_schedule",
    "perplexity", "sample_text", "sample_workdir", "train_and_evaluate",
]
