"""absl-flag entry points, run from the repository root as ``python -m experiments.<name>``."""
