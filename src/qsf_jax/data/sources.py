"""Resolves a ``data`` string to a ``StorySource``.

``data`` is one of:

* ``"tinystories"``: ``roneneldan/TinyStories`` (``train`` / ``validation``) from
  the Hugging Face hub via ``datasets`` (QSF spec §4.1, D13). The hub is not
  contacted when ``HF_HUB_OFFLINE=1`` (``datasets`` then fails at once).
* ``"synthetic"``: the built-in entity-tracking stories (``synthetic.py``).
* ``"auto"``: TinyStories when the hub answers, otherwise the synthetic corpus,
  with one log line saying which was used.
* a PATH: a local file or directory (conventions in ``local_files.py``).
"""

from __future__ import annotations

import pathlib
from collections.abc import Iterator

from absl import logging

from qsf_jax import _checks
from qsf_jax.data.errors import DataNotFoundError, DataUnavailableError, UnknownDataSpecError
from qsf_jax.data.local_files import SUPPORTED_SUFFIXES, StorySource, local_source
from qsf_jax.data.synthetic import SYNTHETIC_VERSION, synthetic_stories

DATA_NAMES = ("auto", "tinystories", "synthetic")
TINYSTORIES_HUB_ID = "roneneldan/TinyStories"
_LOCAL_HINT = (
    "To use local files, pass --data=PATH: a .txt with <|endoftext|> between stories, "
    "a .jsonl/.parquet with a 'text' field, or a folder with *train* and *valid* files")


def _iter_hub_split(ds) -> Iterator[str]:
  for batch in ds.iter(batch_size=4096):
    for text in batch["text"]:
      if text is not None and text.strip():
        yield text.strip()


def hub_source(dataset: str = TINYSTORIES_HUB_ID, *, revision: str | None = None) -> StorySource:
  """A ``StorySource`` for a hub dataset with ``train``/``validation`` splits.

  Args:
    dataset: Hugging Face dataset id with a ``text`` column.
    revision: git revision (branch, tag or commit) or None for the default.

  Raises:
    DataUnavailableError: the dataset could not be loaded (e.g. offline).
  """
  try:
    import datasets
    splits = {s: datasets.load_dataset(dataset, split=s, revision=revision)
              for s in ("train", "validation")}
  except Exception as e:  # ConnectionError, OfflineModeIsEnabled, DatasetNotFoundError, ...
    raise DataUnavailableError(
        f"could not load {dataset!r} from the Hugging Face hub ({type(e).__name__}: {e}). "
        + _LOCAL_HINT) from e
  for s, ds in splits.items():
    if "text" not in ds.column_names:
      raise ValueError(f"{dataset} split {s!r} has no 'text' column ({ds.column_names})")
  identity = {
      "kind": "hub", "dataset": dataset, "revision": revision,
      # The fingerprint hashes the builder config and the downloaded files.
      "fingerprints": {s: ds._fingerprint for s, ds in splits.items()},
      "num_rows": {s: ds.num_rows for s, ds in splits.items()},
  }
  return StorySource(
      name="tinystories" if dataset == TINYSTORIES_HUB_ID else f"hub:{dataset}",
      description=f"{dataset} from the Hugging Face hub (revision {revision or 'default'})",
      identity=identity, train=lambda: _iter_hub_split(splits["train"]),
      valid=lambda: _iter_hub_split(splits["validation"]))


def synthetic_source(*, seed: int = 0, n_train: int = 20000, n_valid: int = 1000) -> StorySource:
  """A ``StorySource`` for the built-in synthetic stories.

  Args:
    seed: corpus seed.
    n_train: number of training stories.
    n_valid: number of validation stories.
  """
  # Python ints out: the identity is JSON.
  seed, n_train, n_valid = (_checks.check_int(name, v) for name, v in
                            (("seed", seed), ("n_train", n_train), ("n_valid", n_valid)))
  if n_train < 1 or n_valid < 1:
    raise ValueError(f"n_train and n_valid must be >= 1, got {n_train} and {n_valid}")
  identity = {"kind": "synthetic", "version": SYNTHETIC_VERSION, "seed": seed,
              "n_train": n_train, "n_valid": n_valid}
  return StorySource(
      name="synthetic",
      description=f"built-in synthetic stories (seed {seed}, {n_train} train / {n_valid} valid)",
      identity=identity,
      train=lambda: synthetic_stories(n_train, seed=seed, split="train"),
      valid=lambda: synthetic_stories(n_valid, seed=seed, split="validation"))


def _looks_like_path(data: str) -> bool:
  return ("/" in data or "\\" in data or data.startswith((".", "~"))
          or pathlib.Path(data).suffix.lower() in SUPPORTED_SUFFIXES)


def resolve_source(data: str = "auto", *, valid_fraction: float = 0.05,
                   synthetic_seed: int = 0, synthetic_train_stories: int = 20000,
                   synthetic_valid_stories: int = 1000,
                   hub_dataset: str = TINYSTORIES_HUB_ID,
                   hub_revision: str | None = None) -> StorySource:
  """Maps a ``data`` string to a ``StorySource`` (see the module docstring).

  Args:
    data: ``"auto"``, ``"tinystories"``, ``"synthetic"`` or a local PATH.
    valid_fraction: share held out for validation when a PATH has no
      validation file.
    synthetic_seed: seed of the synthetic corpus.
    synthetic_train_stories: synthetic training stories.
    synthetic_valid_stories: synthetic validation stories.
    hub_dataset: hub id used by ``tinystories`` and ``auto``.
    hub_revision: hub revision, or None for the default.

  Raises:
    UnknownDataSpecError: ``data`` is not a known name and not a path.
    DataNotFoundError: ``data`` looks like a path that does not exist.
    DataUnavailableError: ``tinystories`` was requested and the hub failed.
  """
  if not isinstance(data, str):
    raise UnknownDataSpecError(f"data must be a string, got {type(data).__name__}")
  def synth() -> StorySource:
    return synthetic_source(seed=synthetic_seed, n_train=synthetic_train_stories,
                            n_valid=synthetic_valid_stories)

  if data == "synthetic":
    return synth()
  if data == "tinystories":
    return hub_source(hub_dataset, revision=hub_revision)
  if data == "auto":
    try:
      source = hub_source(hub_dataset, revision=hub_revision)
    except DataUnavailableError as e:
      source = synth()
      reason = str(e.__cause__ or e).splitlines()[0][:200]
      logging.warning(
          "data=auto: the Hugging Face hub did not answer for %s (%s: %s); using the "
          "built-in synthetic corpus instead (%s). %s.", hub_dataset,
          type(e.__cause__ or e).__name__, reason, source.description, _LOCAL_HINT)
      return source
    logging.info("data=auto: using %s.", source.description)
    return source
  path = pathlib.Path(data).expanduser()
  if data.strip() and path.exists():
    return local_source(path, valid_fraction=valid_fraction)
  if data and _looks_like_path(data):
    raise DataNotFoundError(f"data path {path.resolve()} does not exist")
  raise UnknownDataSpecError(
      f"unknown data spec {data!r}: expected one of {list(DATA_NAMES)} or a path to a "
      f"{'/'.join(SUPPORTED_SUFFIXES)} file or a directory of them")
