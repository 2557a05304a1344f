"""Checkpoint round trips, atomic finalize, and run-identity checks."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qsf_jax.training import checkpoint as ck
from qsf_jax.training.errors import CheckpointMismatchError, NoCheckpointError
from qsf_jax.training.optim import make_optimizer
from qsf_jax.training.state import TrainState, create_train_state


def _state(seed=0, scale=1.0):
  k = jax.random.PRNGKey(seed)
  params = {"dense": {"kernel": scale * jax.random.normal(k, (4, 3)), "bias": jnp.zeros(3)},
            "alpha": jnp.ones(())}
  tx = make_optimizer(10)
  st = create_train_state(params, {"norm_stats": {"ema": jnp.float32(0.5)}}, tx, seed)
  # one real update so the optimizer moments are non-trivial
  grads = jax.tree.map(jnp.ones_like, params)
  updates, opt = tx.update(grads, st.opt_state, st.params)
  return st.replace(step=st.step + 3, params=jax.tree.map(jnp.add, params, updates),
                    opt_state=opt), tx


def _assert_trees_equal(a, b):
  la, ta = jax.tree.flatten(a)
  lb, tb_ = jax.tree.flatten(b)
  assert ta == tb_
  for x, y in zip(la, lb):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_round_trip_keeps_structure_and_values(tmp_path):
  st, tx = _state()
  c = ck.Checkpointer(tmp_path)
  c.save(3, st, {"stage": "koopman", "seed": 0})
  c.close()
  c = ck.Checkpointer(tmp_path, read_only=True)
  assert c.latest_step() == 3
  template, _ = _state(seed=1)  # different values, same structure
  restored = c.restore(template)
  _assert_trees_equal(restored, st)
  # optax state types (NamedTuples, tuples) survive, so the optimizer accepts it
  assert type(restored.opt_state[1][0]) is type(st.opt_state[1][0])
  tx.update(jax.tree.map(jnp.ones_like, restored.params), restored.opt_state, restored.params)
  meta = c.meta()
  assert meta["stage"] == "koopman" and meta["step"] == 3 and meta["format"] == ck.META_FORMAT
  params, coll = c.restore_params()
  np.testing.assert_array_equal(params["dense"]["kernel"], st.params["dense"]["kernel"])
  assert float(coll["norm_stats"]["ema"]) == 0.5
  c.close()


def test_read_only_open_drops_only_orbax_read_only_notices(tmp_path, caplog):
  import logging
  st, _ = _state()
  c = ck.Checkpointer(tmp_path)
  c.save(3, st, {"stage": "koopman"})
  c.close()
  absl_logger = logging.getLogger("absl")
  with caplog.at_level(logging.WARNING):
    c = ck.Checkpointer(tmp_path, read_only=True)
    assert c.latest_step() == 3
    c.close()
    absl_logger.warning("Given directory is read only=%s (outside the constructor)", tmp_path)
  messages = [r.getMessage() for r in caplog.records]
  assert not [m for m in messages if "read_only=True" in m], messages
  assert [m for m in messages if "outside the constructor" in m], messages  # filter removed
  assert not absl_logger.filters


def test_partial_checkpoint_never_replaces_last_good(tmp_path, monkeypatch):
  """A save that dies before orbax's atomic rename leaves step 1 as the latest."""
  from orbax.checkpoint._src.path import async_path

  good, _ = _state(scale=1.0)
  c = ck.Checkpointer(tmp_path)
  c.save(1, good, {"stage": "koopman"}, wait=True)

  async def failing_rename(src, dst):
    raise OSError("simulated crash before finalize")

  monkeypatch.setattr(async_path, "rename", failing_rename)
  bad, _ = _state(scale=100.0)
  with pytest.raises(Exception):
    c.save(2, bad, {"stage": "koopman"}, wait=True)
  monkeypatch.undo()
  try:
    c.close()
  except Exception:  # the failed background save may be re-raised here
    pass

  leftovers = [p.name for p in ck.checkpoint_dir(tmp_path).iterdir()]
  assert any(n.startswith("2.") and "tmp" in n for n in leftovers), leftovers  # partial write
  assert "2" not in leftovers
  c2 = ck.Checkpointer(tmp_path)
  assert c2.latest_step() == 1 and c2.all_steps() == [1]
  template, _ = _state(seed=5)
  _assert_trees_equal(c2.restore(template), good)
  # training can go on: the next save of step 2 succeeds and becomes the latest
  c2.save(2, bad, {"stage": "koopman"}, wait=True)
  assert c2.latest_step() == 2
  c2.close()


def test_has_checkpoint_and_missing(tmp_path):
  assert not ck.has_checkpoint(tmp_path)
  with pytest.raises(NoCheckpointError):
    ck.Checkpointer(tmp_path / "nothing", read_only=True)
  c = ck.Checkpointer(tmp_path)
  with pytest.raises(NoCheckpointError):
    c.meta()
  st, _ = _state()
  c.save(5, st, {}, wait=True)
  c.save(7, st, {}, wait=True)
  # a step that was never kept names the ones that were
  for call in (lambda: c.meta(6), lambda: c.restore_params(-1)):
    with pytest.raises(NoCheckpointError, match=r"no checkpoint at step -?\d+ in .*; the "
                       r"checkpoints kept are at steps: 5, 7$"):
      call()
  assert c.meta(5)["step"] == 5 and c.meta()["step"] == 7
  assert c.meta(np.int64(5))["step"] == 5
  for bad in (5.7, "5", True):  # int(5.7) loaded step 5 without a word
    with pytest.raises(ValueError, match="step must be an int"):
      c.meta(bad)
  c.close()
  assert ck.has_checkpoint(tmp_path)


def test_missing_checkpoint_names_the_runs_in_subfolders(tmp_path):
  """A progressive root holds one run per stage; evaluate on the root says so."""
  st, _ = _state()
  for name in ("koopman", "fnet"):
    c = ck.Checkpointer(tmp_path / name)
    c.save(1, st, {}, wait=True)
    c.close()
  (tmp_path / "tb").mkdir()
  err = str(ck.missing_checkpoint_error(tmp_path))
  assert err == (f"no checkpoint found in {tmp_path} (expected {tmp_path}/checkpoints/<step>); "
                 f"its subfolders fnet, koopman are runs: pass one of them, e.g. "
                 f"{tmp_path}/koopman")
  assert str(ck.missing_checkpoint_error(tmp_path / "tb")).endswith("/checkpoints/<step>)")
  assert str(ck.missing_checkpoint_error(tmp_path / "nothing")).startswith(
      f"no checkpoint found in {tmp_path}/nothing")
  from qsf_jax.training.restore import load_run  # pylint: disable=import-outside-toplevel
  with pytest.raises(NoCheckpointError, match="its subfolders fnet, koopman are runs"):
    load_run(tmp_path)


def test_identity_differences_and_refusal(tmp_path):
  stored = {"stage": "koopman", "model_config": {"d_model": 32, "n_layers": 2}, "seed": 0,
            "steps": 100, "lr": 1e-3, "git_sha": "aaa", "saved_at": "x"}
  same = dict(stored, git_sha="bbb", saved_at="y")  # provenance may differ
  assert ck.identity_differences(stored, same) == {}
  other = dict(stored, stage="fnet", model_config={"d_model": 64, "n_layers": 2})
  diffs = ck.identity_differences(stored, other)
  assert diffs == {"stage": ("koopman", "fnet"), "model_config.d_model": (32, 64)}
  with pytest.raises(CheckpointMismatchError, match="stage: stored 'koopman', requested 'fnet'"):
    ck.check_resumable(tmp_path, stored, other)
  ck.check_resumable(tmp_path, stored, same)


def test_every_identity_key_is_stored_and_refuses_a_change(tmp_path):
  # run_metadata stores every IDENTITY_KEY (a misspelt key would compare None == None
  # and go silent), and a change of any one of them refuses the resume.
  import types  # pylint: disable=import-outside-toplevel
  from qsf_jax.models import get_config  # pylint: disable=import-outside-toplevel
  from qsf_jax.training import setup  # pylint: disable=import-outside-toplevel
  from qsf_jax.training.config import TrainConfig  # pylint: disable=import-outside-toplevel
  cfg = TrainConfig(stage="koopman", preset="tiny", tokenizer="bytes", data="synthetic",
                    steps=10)
  corpus = types.SimpleNamespace(metadata={"cache_key": "k0", "source": "synthetic"},
                                 tokenizer=types.SimpleNamespace(name="bytes", sha256="s0"))
  meta = setup.run_metadata(cfg, get_config("koopman", "tiny"), corpus, 32, 1)
  assert set(ck.IDENTITY_KEYS) <= set(meta)
  # Every TrainConfig field is classified: stored under its own name, behind another
  # identity entry, or free to change on resume. A new field must be placed here.
  import dataclasses  # pylint: disable=import-outside-toplevel
  own = {"stage", "tokenizer", "data_mode", "steps", "batch_size", "seq_len", "seed", "lr",
         "weight_decay", "clip_norm", "cycle_momentum", "grad_accum"}
  behind = {"preset": "model_config", "model_overrides": "model_config",
            "dtype": "model_config", "data": "data_source", "max_train_stories": "data_source"}
  free = {"tokenizer_file", "cache_dir", "init_from", "checkpoint_every", "eval_every",
          "eval_batches", "log_every", "max_to_keep", "sample_prompt", "sample_tokens",
          "sample_temperature", "sample_top_k"}
  fields = {f.name for f in dataclasses.fields(TrainConfig)}
  assert fields == own | set(behind) | free and not own & free
  assert fields & set(ck.IDENTITY_KEYS) == own
  assert set(behind.values()) <= set(ck.IDENTITY_KEYS)
  for key in ck.IDENTITY_KEYS:
    value = meta[key]
    if isinstance(value, dict):
      field = "d_model" if key == "model_config" else sorted(value)[0]
      changed = dict(value, **{field: "changed"})
    else:
      changed = "changed" if isinstance(value, str) else (not value if isinstance(value, bool)
                                                          else value + 1)
    other = dict(meta, **{key: changed})
    diffs = ck.identity_differences(meta, other)
    assert list(diffs) and all(k == key or k.startswith(key + ".") for k in diffs), key
    with pytest.raises(CheckpointMismatchError):
      ck.check_resumable(tmp_path, meta, other)
  ck.check_resumable(tmp_path, meta, dict(meta))


def test_meta_of_a_run_stored_before_a_config_field_existed(tmp_path):
  # A run written before ModelConfig.attn_pallas_design existed reads back with
  # the default design, so resuming it with today's configuration is no mismatch.
  from qsf_jax.models import get_config
  today = {"stage": "gla", "model_config": get_config("gla", "tiny").to_dict(), "seed": 0}
  old = dict(today, model_config=dict(today["model_config"]))
  del old["model_config"]["attn_pallas_design"]
  st, _ = _state()
  c = ck.Checkpointer(tmp_path, async_save=False)
  c.save(3, st, old, wait=True)
  meta = c.meta()
  c.close()
  assert meta["model_config"]["attn_pallas_design"] == "default"
  assert ck.identity_differences(meta, today) == {}
  other = dict(today, model_config=get_config(
      "gla", "tiny", attn_pallas_design="bv64_w8_s3_chunkbwd").to_dict())
  # the design is an execution field: reported, but no mismatch
  assert ck.identity_differences(meta, other) == {}
  assert ck.execution_differences(meta, other) == {
      "model_config.attn_pallas_design": ("default", "bv64_w8_s3_chunkbwd")}


def test_meta_of_a_run_stored_before_a_behaviour_changing_field(tmp_path):
  # ls_stats_positions arrived with a new default ("loss"); a run stored before it
  # counted padding ("all") and must rebuild that way, and resuming it with today's
  # default is a mismatch, not a silent change.
  from qsf_jax.models import get_config
  from qsf_jax.training.config import TrainConfig
  mc = get_config("koopman_attn", "tiny").to_dict()
  del mc["ls_stats_positions"]
  tc = TrainConfig(stage="koopman_attn", preset="tiny").to_dict()
  del tc["cycle_momentum"]  # and before Adam's b1 was cycled (D10)
  st, _ = _state()
  c = ck.Checkpointer(tmp_path, async_save=False)
  c.save(3, st, {"stage": "koopman_attn", "model_config": mc, "train_config": tc}, wait=True)
  meta = c.meta()
  c.close()
  assert meta["model_config"]["ls_stats_positions"] == "all"
  cfg = TrainConfig.from_dict(meta["train_config"])
  assert dict(cfg.model_overrides)["ls_stats_positions"] == "all"
  assert cfg.cycle_momentum is False and meta["cycle_momentum"] is False
  today = {"stage": "koopman_attn", "model_config": get_config("koopman_attn", "tiny").to_dict(),
           "cycle_momentum": True}
  assert ck.identity_differences(meta, today) == {
      "model_config.ls_stats_positions": ("all", "loss"), "cycle_momentum": (False, True)}


def test_git_sha_is_a_hex_string_or_none():
  sha = ck.git_sha()
  assert sha is None or (len(sha) == 40 and int(sha, 16) >= 0)


def test_state_dict_round_trip():
  st, _ = _state()
  again = TrainState.from_dict(st.as_dict())
  _assert_trees_equal(again, st)
  assert set(st.as_dict()) == {"step", "params", "opt_state", "rng", "collections"}
  assert os.fspath(ck.checkpoint_dir("w")).endswith(ck.CHECKPOINT_SUBDIR)


def test_max_to_keep_deletes_the_oldest(tmp_path):
  st, _ = _state()
  c = ck.Checkpointer(tmp_path, max_to_keep=2, async_save=False)
  for step in (1, 2, 3):
    c.save(step, st, {"stage": "koopman"}, wait=True)
  assert c.all_steps() == [2, 3] and c.latest_step() == 3
  c.close()


def test_a_checkpoint_removed_during_its_read_is_not_called_damaged(tmp_path):
  # evaluate/analyze beside a training run with a small --max_to_keep: the trainer
  # deleted the checkpoint being read, and the reader called it "incomplete or
  # damaged" and said to move it aside (or, for the meta, "Checkpoint at ... not found.")
  import shutil  # pylint: disable=import-outside-toplevel
  st, _ = _state()
  c = ck.Checkpointer(tmp_path, max_to_keep=2, async_save=False)
  for step in (1, 2):
    c.save(step, st, {"stage": "koopman"}, wait=True)
  reader = ck.Checkpointer(tmp_path, read_only=True)
  restore = reader._mgr.restore  # pylint: disable=protected-access
  nxt = [3]

  def trainer_deletes_then_restore(step, *a, **kw):
    c.save(nxt[0], st, {"stage": "koopman"}, wait=True)  # the trainer's next save ...
    nxt[0] += 1
    shutil.rmtree(ck.checkpoint_dir(tmp_path) / str(step))  # ... deletes the oldest
    return restore(step, *a, **kw)

  reader._mgr.restore = trainer_deletes_then_restore  # pylint: disable=protected-access
  for read in (lambda: reader.restore_params(1), lambda: reader.meta(1)):
    if not (ck.checkpoint_dir(tmp_path) / "1").exists():
      c.save(1, st, {"stage": "koopman"}, wait=True)
    with pytest.raises(NoCheckpointError, match="was removed while it was read") as e:
      read()
    assert "damaged" not in str(e.value), e.value
    assert f"use step {nxt[0] - 1}" in str(e.value), e.value
  reader.close()
  c.close()


def test_a_failed_save_is_one_clear_error_naming_the_kept_checkpoint(tmp_path):
  # A full disk during an asynchronous save surfaced as TensorStore's message
  # (paths of temporary files, no word on what a rerun resumes from).
  from qsf_jax.training.errors import CheckpointSaveError  # pylint: disable=import-outside-toplevel
  st, _ = _state()
  c = ck.Checkpointer(tmp_path, async_save=False)
  c.save(1, st, {"stage": "koopman"}, wait=True)

  def disk_full(*_, **__):
    raise ValueError('RESOURCE_EXHAUSTED: Error writing "params.x/0" in OCDBT database at '
                     f'local file "{tmp_path}/checkpoints/2.orbax-checkpoint-tmp/state": '
                     "Failed to write 8 bytes to file 18: No space left on device "
                     "[os_error_code='28']")

  c._mgr.save = disk_full  # pylint: disable=protected-access
  with pytest.raises(CheckpointSaveError) as e:
    c.save(2, st, {"stage": "koopman"})
  msg = str(e.value)
  assert isinstance(e.value, OSError) and "\n" not in msg and "orbax-checkpoint-tmp" not in msg
  assert f"in {ck.checkpoint_dir(tmp_path)} (No space left on device)" in msg, msg
  assert "step 1, is kept" in msg and "run the same command again" in msg, msg
  c.close()


def test_an_unfinished_first_save_is_no_checkpoint(tmp_path):
  # A run killed during its first save leaves only orbax's temporary folder; the
  # same command must then start afresh instead of trying to resume.
  (ck.checkpoint_dir(tmp_path) / "5.orbax-checkpoint-tmp-1700000000").mkdir(parents=True)
  assert not ck.has_checkpoint(tmp_path)


def test_meta_keeps_a_stored_value_of_an_added_field(tmp_path):
  # ADDED_FIELDS fill in only what a stored train config lacks, never overwrite it.
  from qsf_jax.training.config import TrainConfig
  tc = TrainConfig(stage="koopman", preset="tiny", cycle_momentum=True).to_dict()
  st, _ = _state()
  c = ck.Checkpointer(tmp_path, async_save=False)
  c.save(3, st, {"stage": "koopman", "train_config": tc, "cycle_momentum": True}, wait=True)
  meta = c.meta()
  c.close()
  assert meta["train_config"]["cycle_momentum"] is True and meta["cycle_momentum"] is True
  assert TrainConfig.from_dict(meta["train_config"]).cycle_momentum is True
