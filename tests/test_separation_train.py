"""Training, sweep and entry point of the separation experiment (wave-function spec §2.5, §5)."""

import dataclasses
import json
import subprocess
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qsf_jax.separation import bounds, models, plot, sweep, train
from qsf_jax.tasks import separation as ts

from conftest import REPO_ROOT

pytestmark = pytest.mark.usefixtures("fast_compiles")  # tiny models: compile time dominates


@pytest.fixture(scope="module")
def task3():
  return ts.make_task(3)


def _cfg(task, kind, dim):
  return models.ModelConfig(kind=kind, dim=dim, num_tokens=task.num_tokens,
                            num_outcomes=task.K, eta=task.eta)


def test_numpy_scalars_in_separation_configs_become_python_numbers():
  cfg = models.ModelConfig(kind="real", dim=np.int64(3), num_tokens=4, num_outcomes=5)
  tcfg = train.TrainConfig(steps=np.int64(5), lr=np.float32(0.5))
  assert type(cfg.dim) is int and type(tcfg.steps) is int and type(tcfg.lr) is float
  sweep_cfg = sweep.SweepConfig(Ns=np.arange(3, 5), seeds=np.int64(2),
                                readout_ranks=[np.int64(1)])
  assert sweep_cfg.Ns == (3, 4) and sweep_cfg.readout_ranks == [1]
  assert json.loads(json.dumps(dataclasses.asdict(sweep_cfg)))["Ns"] == [3, 4]


def test_init_draws_are_those_of_the_parameter_shapes():
  # init_params draws each matrix flat and reshapes it (a flat draw compiles faster);
  # the values must stay those of a draw of the matrix's shape, so that seeds keep
  # giving the initialisations the recorded results were trained from.
  key = jax.random.key(7)
  k1, _, k3, k4 = jax.random.split(key, 4)
  for kind, dim in (("complex", 3), ("real", 4)):
    cfg = models.ModelConfig(kind=kind, dim=dim, num_tokens=4, num_outcomes=5)
    got = models.init_params(key, cfg)
    scale = 1.0 / dim ** 0.5
    if kind == "complex":
      want = {"X": scale * jax.random.normal(k1, (4, dim, dim)),
              "W_im": jax.random.normal(k4, (5, dim))}
    else:
      want = {"S": scale * jax.random.normal(k1, (4, dim, dim)),
              "W": jax.random.normal(k3, (5, dim))}
    for name, value in want.items():
      np.testing.assert_array_equal(np.asarray(got[name]), np.asarray(value), err_msg=name)


def test_complex_training_lowers_kl_by_orders_of_magnitude(task3):
  """Dynamics learned from scratch with the task's POVM as readout (spec §2.4, §5)."""
  cfg = _cfg(task3, "complex", 3)
  init = sweep.fixed_povm_init(cfg, (0,), jnp.float32)
  tcfg = train.TrainConfig(steps=600, lr=0.02, log_every=200, frozen=("W_re", "W_im"))
  result = train.train(task3, cfg, (0,), tcfg, init=init)
  kl0, kl = result.kl_history[0, 0], result.kl[0]
  assert kl0 > 0.1
  assert kl < 1e-3 * kl0
  np.testing.assert_array_equal(result.params["W_re"], init["W_re"])  # frozen readout


def test_readout_alone_is_learnable_at_rank_two_not_rank_one(task3):
  """The explicit dynamics of spec §2.4 fixed, the Born readout learned from random values.

  A measured property of this task instance and these seeds (docs/RESULTS_separation.md):
  the rank-one POVM readout stalls, the rank-two one reaches the target.
  """
  seeds = (0, 1, 2)
  kls = {}
  for rank in (1, 2):
    cfg = models.ModelConfig(kind="complex", dim=3, num_tokens=task3.num_tokens,
                             num_outcomes=task3.K, eta=task3.eta, readout_rank=rank)
    init = sweep.fixed_dynamics_init(task3, cfg, seeds, jnp.float32)
    tcfg = train.TrainConfig(steps=1500, lr=0.02, log_every=1500, frozen=("X", "Y"))
    result = train.train(task3, cfg, seeds, tcfg, init=init)
    np.testing.assert_array_equal(result.params["X"], init["X"])  # frozen dynamics
    kls[rank] = result.kl
  assert np.all(kls[2] < 1e-4), kls
  assert np.all(kls[1] > 1e-2), kls


def test_trained_real_model_stays_above_the_bound(task3):
  """A real orthogonal model with D = N cannot beat the Eckart-Young bound (spec §2.5)."""
  cfg = _cfg(task3, "real", 3)
  result = train.train(task3, cfg, (0, 1), train.TrainConfig(steps=300, lr=0.02, log_every=150))
  bound = bounds.eckart_young_bound(task3.probs_CK, 3)
  assert bound > 0.5
  assert result.kl_history[0, -1] < result.kl_history[0, 0]  # it did train
  for logq in result.log_probs:
    assert bounds.rms_centred_log_error(logq, task3.probs_CK) >= bound
  assert np.all(result.kl > 0.1)


def test_expected_cross_entropy_weights_the_contexts(x64):
  """L = -sum_c w_c sum_k p* log q: KL(p* || q) plus the weighted target entropy, with
  unequal context weights (the task builders' uniform ones cannot tell w_c from 1/C)."""
  from scipy.special import log_softmax, rel_entr  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(1)
  P = np.exp(log_softmax(rng.normal(size=(5, 4)), axis=1))
  logQ = log_softmax(rng.normal(size=(5, 4)), axis=1)
  w = np.array([0.5, 0.05, 0.25, 0.15, 0.05])
  want = float(w @ (rel_entr(P, np.exp(logQ)).sum(axis=1) - (P * np.log(P)).sum(axis=1)))
  got = float(train.expected_cross_entropy(jnp.asarray(logQ), jnp.asarray(P), jnp.asarray(w)))
  assert got == pytest.approx(want, rel=1e-12)


def test_train_result_metrics_are_consistent(task3):
  cfg = _cfg(task3, "realified", 6)
  result = train.train(task3, cfg, (3,), train.TrainConfig(steps=20, log_every=10))
  assert result.kl_history.shape == (1, 3) and list(result.steps_logged) == [0, 10, 20]
  assert result.log_probs.dtype == np.float64
  # KL from the float32 training loss agrees with the float64 re-evaluation.
  assert abs(result.kl_history[0, -1] - result.kl[0]) < 1e-5
  np.testing.assert_allclose(np.exp(result.log_probs[0]).sum(axis=1), 1.0, atol=1e-6)
  # The history's first point is the KL at the initial parameters (step 0), not after
  # the first chunk: recomputed here in float64 from the seed's draw.
  p0 = train.init_params_for_seeds(cfg, (3,), jnp.float32)
  with jax.enable_x64(True):
    p64 = jax.tree.map(lambda x: jnp.asarray(np.asarray(x)[0], jnp.float64), p0)
    logq0 = np.asarray(train.task_log_probs_fn(task3, cfg)(p64))
  kl0 = bounds.expected_kl(logq0, task3.probs_CK, task3.weights_C)
  assert abs(result.kl_history[0, 0] - kl0) < 1e-5
  assert result.kl_history[0, 1] < kl0 - 1e-3  # ten steps later it has moved


def test_train_bad_inputs(task3):
  with pytest.raises(ValueError, match="steps must be a positive integer"):
    train.TrainConfig(steps=0)
  with pytest.raises(ValueError, match="lr"):
    train.TrainConfig(lr=-1.0)
  with pytest.raises(ValueError, match="does not match the task"):
    train.train(task3, models.ModelConfig(kind="real", dim=3, num_tokens=5, num_outcomes=12),
                (0,), train.TrainConfig(steps=1))
  with pytest.raises(ValueError, match="seeds must be non-empty"):
    train.train(task3, _cfg(task3, "real", 3), (), train.TrainConfig(steps=1))
  with pytest.raises(ValueError, match="frozen names"):
    train.train(task3, _cfg(task3, "real", 3), (0,), train.TrainConfig(steps=1, frozen=("Q",)))
  with pytest.raises(ValueError, match="frozen must be a tuple of parameter names"):
    train.TrainConfig(frozen="W_re")  # was read as the names 'W', '_', 'e', 'r'
  # init must be stacked over exactly the seeds trained, with the model's shapes.
  cfg = _cfg(task3, "real", 3)
  init = train.init_params_for_seeds(cfg, (0, 1))
  with pytest.raises(ValueError, match="stacked over the 3 seeds"):
    train.train(task3, cfg, (0, 1, 2), train.TrainConfig(steps=1), init=init)
  with pytest.raises(ValueError, match="stacked over the 2 seeds"):
    train.train(task3, _cfg(task3, "real", 4), (0, 1), train.TrainConfig(steps=1), init=init)
  r = train.train(task3, cfg, (0, 1), train.TrainConfig(steps=1), init=init)
  assert r.kl.shape[0] == 2


def test_sweep_rows_record_kl_and_rms_in_their_places(task3):
  """A row's "kl" is eq. 5's expected KL and its "rms_log_err" the centred log error."""
  logq = np.log(task3.probs_CK) + 0.3 * np.random.default_rng(0).normal(size=task3.probs_CK.shape)
  kl, rms = sweep._metrics([logq], task3)  # pylint: disable=protected-access
  want_kl = bounds.expected_kl(logq, task3.probs_CK, task3.weights_C)
  want_rms = bounds.rms_centred_log_error(logq, task3.probs_CK)
  assert abs(want_kl - want_rms) > 0.01
  np.testing.assert_allclose([kl[0], rms[0]], [want_kl, want_rms], rtol=1e-12)


def test_default_dims_rule():
  assert sweep.default_dims(3) == (3, 6, 9, 11, 24)
  assert sweep.default_dims(4) == (4, 8, 16, 23, 48)
  assert sweep.default_dims(5) == (5, 10, 25, 39, 80)


@pytest.mark.parametrize("kwargs,match", [
    (dict(Ns=(1,)), "each entry of N must be >= 2"),
    (dict(Ns=()), "N must be a non-empty list"),
    (dict(Ns=(3.5,)), "each entry of N must be an integer"),
    (dict(dims=(0, 3)), "each entry of dims must be >= 1"),
    (dict(dims=()), "dims must be a non-empty list"),
    (dict(steps=0), "steps must be >= 1"),
    (dict(seeds=0), "seeds must be >= 1"),
    (dict(lr=0.0), "lr must be finite and > 0"),
    (dict(eta=0.0), "eta"),
    (dict(num_cues=2, length=2), "fewer than"),
    (dict(num_cues=200, length=3), r"num_cues\*\*length = 8000000 contexts, more than"),
    # 8^3 = 512 >= K = 144, but only 120 distinct (commuting) contexts
    (dict(Ns=(9,)), "give 120 distinct contexts .* fewer than K = 144"),
    (dict(Ns=(6,), num_cues=4, length=4), "give 35 distinct contexts"),
    (dict(task="born_logit", Ns=(4,), num_cues=2, length=3), "fewer than the log-target rank 12"),
    (dict(readout_ranks=(1, 0)), "each entry of readout_ranks must be >= 1"),
    (dict(readout_ranks=(2, 2)), "must not repeat"),
    (dict(Ns=(3, 3)), r"N must not repeat a value, got \(3, 3\)"),
    (dict(dims=(3, 4, 3)), r"dims must not repeat a value"),
    # the target softmax underflows to 0 (the KL needs every p* > 0)
    (dict(task="born_logit", Ns=(3,), beta=1e5), r"beta = 100000.0 is too large: .*underflows"),
    (dict(models=("complex", "quantum")), r"unknown models \['quantum'\]"),
    (dict(models=()), "models must be a non-empty list"),
    (dict(models=("real_hardcoded",)), r"unknown models \['real_hardcoded'\] for task 'pairwise'"),
    (dict(task="born_logit", models=("realified",)),
     r"unknown models \['realified'\] for task 'born_logit'"),
    (dict(task="tight"), "task must be one of"),
    (dict(task="born_logit", contexts="mixed"), "contexts must be one of"),
    (dict(task="born_logit", beta=-1.0), "beta must be a finite number > 0"),
    (dict(task="born_logit", beta="1"), "beta must be a finite number > 0"),
    (dict(task="born_logit", contexts="generic", Ns=(2, 3)), "each entry of N must be >= 3"),
    (dict(Ns=(3, 300)), r"the task at N = 300 has K = 179,400 outputs and C = 512 contexts"),
    (dict(complex_dims=()), "complex_dims must be a non-empty list"),
    (dict(complex_dims="N"), "complex_dims must be a non-empty list"),
    (dict(complex_dims=("N", "M+1")), "must be an integer or an expression like N"),
    (dict(complex_dims=(True,)), "must be an integer or an expression like N"),
    (dict(complex_dims=("N-3",)), r"'N-3' gives dimension 0 < 1 for N = 3"),
    (dict(complex_dims=("-1",)), r"'-1' gives dimension -1 < 1 for N = 3"),
    (dict(Ns=(3,), complex_dims=("N", "3")), r"'3' repeats dimension 3 for N = 3"),
    (dict(Ns=(2,), complex_dims=("N", "5")), r"complex dimension 5 at N = 2 exceeds K \* r = 4"),
])
def test_validate_config_errors(kwargs, match):
  with pytest.raises(ValueError, match=match):
    sweep.validate_config(sweep.SweepConfig(**kwargs))


def test_flag_parsing():
  sys.path.insert(0, str(REPO_ROOT))
  from experiments import separation as exp
  assert exp.parse_int_list("N", ["3", " 4"]) == (3, 4)
  with pytest.raises(ValueError, match="--N must be a comma-separated list of integers"):
    exp.parse_int_list("N", ["3", "x"])


_BAD_FLAGS = [
    ("--N=3,1", "each entry of N must be >= 2"),
    ("--models=complex,bogus", "unknown models ['bogus']"),
    ("--readout_ranks=2,x", "--readout_ranks must be a comma-separated list of integers"),
    ("--complex_dims=N,2M", "must be an integer or an expression like N, 2N or N+1, got '2M'"),
    ("--task=born_logit --eta=0.2", "--eta does not apply to --task=born_logit"),
    ("--beta=3 --contexts=generic", "--contexts, --beta does not apply to --task=pairwise"),
    ("--task=born_logit --models=realified", "unknown models ['realified'] for task 'born_logit'"),
]


def test_a_diverged_row_is_null_in_strict_json(tmp_path, capsys):
  """A non-finite KL (lr far too large) was written as a bare NaN token, with no word."""
  sys.path.insert(0, str(REPO_ROOT))
  from experiments import separation as exp
  assert exp.run(["separation", "--models=real", "--dims=3", "--N=2", "--lr=1e6",
                  "--steps=20", "--seeds=1", "--num_cues=3", "--length=2",
                  f"--out={tmp_path}"]) == 0
  assert "warning: 1 row(s) have a non-finite KL" in capsys.readouterr().err
  text = (tmp_path / "results.json").read_text()
  res = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-JSON token {c}"))
  assert res["runs"][0]["kl"] == [None]


@pytest.mark.parametrize("flag,message", _BAD_FLAGS)
def test_entry_point_rejects_bad_flags(tmp_path, capsys, flag, message):
  """The entry point in this process (a Python and JAX start per flag set would cost
  more than the check); the test below runs the ``python -m`` entry itself."""
  sys.path.insert(0, str(REPO_ROOT))
  from experiments import separation as exp
  assert exp.run(["separation", *flag.split(), f"--out={tmp_path}"]) == 1
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("separation: error: ") and message in err[0], err
  assert not (tmp_path / "results.json").exists()


def test_entry_point_module_rejects_bad_flags(tmp_path):
  flag, message = _BAD_FLAGS[0]
  proc = subprocess.run(
      [sys.executable, "-m", "experiments.separation", *flag.split(), f"--out={tmp_path}"],
      cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
  assert proc.returncode != 0
  assert message in proc.stderr + proc.stdout
  assert "Traceback" not in proc.stderr
  assert not (tmp_path / "results.json").exists()


@pytest.fixture(scope="module")
def pairwise_sweep():
  """One small T_2 sweep of every model, with a second complex dimension (2N).

  Shared by the smoke test and the complex-dimension test: each trained row compiles
  its own programs, so one sweep of all rows costs far less than two that repeat most.
  """
  cfg = sweep.SweepConfig(Ns=(2,), dims=(2,), steps=4, seeds=1, log_every=2, num_cues=3,
                          length=2, complex_dims=("N", "2N"))
  return sweep.run_sweep(cfg, log=lambda s: None)


@pytest.mark.slow
def test_sweep_smoke(pairwise_sweep, tmp_path):
  results = pairwise_sweep
  models_run = [r["model"] for r in results["runs"]]
  assert models_run == ["complex_hardcoded", "realified_hardcoded", "complex", "complex_r2",
                        "complex_d4", "complex_r2_d4", "complex_fixed_povm",
                        "complex_fixed_dynamics", "complex_r2_fixed_dynamics", "realified",
                        "real"]
  ranks = {r["model"]: r["readout_rank"] for r in results["runs"]}
  assert ranks["complex_r2"] == ranks["complex_r2_fixed_dynamics"] == 2
  assert ranks["complex"] == ranks["complex_fixed_dynamics"] == 1 and ranks["real"] is None
  assert results["tasks"]["2"]["rank"] == 3
  task = results["tasks"]["2"]
  assert task["bound_dims"][-1] == max(max(task["dims"]), task["K"]) and task["bound"][-1] < 1e-12
  real = next(r for r in results["runs"] if r["model"] == "real")
  assert real["rms_log_err"][0] >= task["bound"][real["dim"]] - 1e-12  # eq. 8's bound
  assert all(abs(r["kl"][0]) < 1e-10 for r in results["runs"] if r["model"].endswith("hardcoded"))
  json.dumps(results)  # serialisable
  table = sweep.summary_table(results)
  assert "complex_fixed_povm" in table and "EY bound" in table
  plot.plot_results(results, str(tmp_path / "fig.png"))
  assert (tmp_path / "fig.png").stat().st_size > 10_000


@pytest.mark.slow
def test_born_logit_sweep_smoke(tmp_path):
  cfg = sweep.SweepConfig(Ns=(3,), dims=(7, 8), steps=4, seeds=1, log_every=2, num_cues=3,
                          length=3, task="born_logit", contexts="generic", beta=2.0,
                          readout_ranks=(1, 2))
  results = sweep.run_sweep(cfg, log=lambda s: None)
  assert [(r["model"], r["dim"]) for r in results["runs"]] == [
      ("complex_hardcoded", 3), ("real_hardcoded", 8), ("complex", 3), ("complex_r2", 3),
      ("complex_fixed_head", 3), ("complex_fixed_dynamics", 3),
      ("complex_r2_fixed_dynamics", 3), ("real", 7), ("real", 8)]
  task = results["tasks"]["3"]
  assert task["rank"] == task["exact_real_dim"] == 8
  assert task["contexts"] == "generic" and task["beta"] == 2.0
  assert [r["readout_rank"] for r in results["runs"][2:8]] == [1, 2, 1, 1, 2, None]
  hard = [r for r in results["runs"] if r["model"].endswith("hardcoded")]
  assert all(abs(r["kl"][0]) < 1e-12 for r in hard)
  assert hard[1]["bound"] < 1e-12
  bounds_by_dim = {r["dim"]: r["bound"] for r in results["runs"] if r["model"] == "real"}
  assert bounds_by_dim[7] > 1e-3 and bounds_by_dim[8] < 1e-12
  json.dumps(results)
  assert "real_hardcoded" in sweep.summary_table(results)
  plot.plot_results(results, str(tmp_path / "fig.png"))
  assert (tmp_path / "fig.png").stat().st_size > 10_000


def test_resolve_complex_dims():
  assert sweep.resolve_complex_dims(("N", "N+1", "2N", "3N-2", "7", 9), 4) == (4, 5, 8, 10, 7, 9)
  assert sweep.resolve_complex_dims([" 2 N "], 3) == (6,)
  # the isometry bound K r >= n is checked with the smallest readout rank
  sweep.validate_config(sweep.SweepConfig(Ns=(2,), complex_dims=("N", "4"), readout_ranks=(1,)))


def test_sweep_complex_dims_rows(pairwise_sweep, tmp_path):
  """Extra complex dimensions add learned rows named _d<n>; the fixed rows stay at N."""
  results = pairwise_sweep
  rows = [(r["model"], r["dim"], r["real_dim"], r["readout_rank"]) for r in results["runs"]]
  assert [row for row in rows if row[0].startswith("complex") and "povm" not in row[0]
          and not row[0].endswith("hardcoded")] == [
      ("complex", 2, 4, 1), ("complex_r2", 2, 4, 2), ("complex_d4", 4, 8, 1),
      ("complex_r2_d4", 4, 8, 2), ("complex_fixed_dynamics", 2, 4, 1),
      ("complex_r2_fixed_dynamics", 2, 4, 2)]
  assert ("complex_fixed_povm", 2, 4, 1) in rows
  # The figure draws the _d<n> rows (hollow, at n) and leaves the diagnostics out.
  styles = {r["model"]: plot._style(r["model"]) for r in results["runs"]}
  assert styles["complex_d4"]["fillstyle"] == "none"
  assert styles["complex_d4"]["color"] == styles["complex"]["color"]
  assert styles["complex_r2_d4"]["label"].endswith("rank-2 POVM, all learned, complex dimension 4")
  assert styles["complex_fixed_dynamics"] is None and plot._style("complex_dx") is None
  assert plot._style("complex_d4", "born_logit")["label"].startswith(
      "complex U(N) + Born-logit")
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # no matplotlib complaint about the hollow markers
    plot.plot_results(results, str(tmp_path / "fig.png"))
  cfg = sweep.SweepConfig(Ns=(3,), dims=(3,), steps=2, seeds=1, log_every=2, num_cues=3,
                          length=3, task="born_logit", readout_ranks=(1,),
                          complex_dims=("N+1",), models=("complex",))
  results = sweep.run_sweep(cfg, log=lambda s: None)
  assert [(r["model"], r["dim"], r["real_dim"]) for r in results["runs"]] == [
      ("complex_d4", 4, 8)]
  assert np.isfinite(results["runs"][0]["kl"]).all()
  json.dumps(results)


def test_sweep_model_subset():
  cfg = sweep.SweepConfig(Ns=(2,), dims=(2,), steps=2, seeds=1, log_every=2, num_cues=3,
                          length=2, readout_ranks=(3,), models=("complex", "real"))
  results = sweep.run_sweep(cfg, log=lambda s: None)
  assert [r["model"] for r in results["runs"]] == ["complex_r3", "real"]
  assert results["runs"][0]["readout_rank"] == 3
  assert np.asarray(results["runs"][0]["kl"]).shape == (1,)
