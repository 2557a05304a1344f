"""Training, evaluation, checkpointing and sampling."""
