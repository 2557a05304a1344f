"""``analyze_workdir``: the whole QSF analysis of one checkpoint (QSF §2.3-2.4, §4.4, §6).

Behind ``python -m experiments.analyze``. For a Stage II-IV run folder it
restores the checkpoint, analyses every layer's Koopman matrix in float64
(D15), reads alpha over training, runs the model on validation sequences for
the norm statistics (D9), G_eff (eq. 11) and top-mode token occupancy, applies
the propagators and the SSE to one layer, and writes ``report.md``, PNG
figures and ``spectrum.json`` into the output folder.
"""

from __future__ import annotations

import contextlib
import errno
import os
import pathlib
import shutil
import tempfile
import time

import jax
import numpy as np

from qsf_jax import _checks
from qsf_jax import data as qdata
from qsf_jax.analysis import history, modes, propagation, report, spectrum, validation
from qsf_jax.analysis import plots_dynamics as pdyn
from qsf_jax.analysis import plots_spectrum as pspec
from qsf_jax.analysis.operators import check_koopman_stage, layer_operators
from qsf_jax.models.params import count_params
from qsf_jax.physics.koopman_log import on_nonpositive_axis
from qsf_jax.physics.spectral import ROUNDOFF_PER_MODE
from qsf_jax.training import setup
from qsf_jax.training.checkpoint import Checkpointer, has_checkpoint, missing_checkpoint_error
from qsf_jax.training.restore import load_run


def checkpoint_stage(workdir, step: int | None = None) -> str:
  """The stage recorded in a run folder's checkpoint, after checking one exists.

  Raises:
    NoCheckpointError: ``workdir`` holds no finalized checkpoint.
    ValueError: the stage has no Koopman matrices (Stage I, baselines, wave).
  """
  if not has_checkpoint(workdir):
    raise missing_checkpoint_error(workdir)
  ckpt = Checkpointer(workdir, read_only=True)
  try:
    stage = ckpt.meta(step)["stage"]
  finally:
    ckpt.close()
  try:
    check_koopman_stage(stage)
  except ValueError as e:
    raise ValueError(f"{workdir}: {e}") from None
  return stage


def _has_real_log(lam) -> bool:
  """No eigenvalue on (-inf, 0] (``physics.koopman_log.on_nonpositive_axis``)."""
  return float(np.max(np.abs(lam))) > 0 and not np.any(on_nonpositive_axis(lam))


def pick_layer(eigs, radii, candidates=None) -> int | None:
  """The propagator layer: the largest radius among the candidate layers with a real
  log K (continuous variant, spec §6.4), else among all candidates; None if none.

  Args:
    eigs: eigenvalues per layer (list of (d,) complex).
    radii: spectral radius per layer.
    candidates: layers allowed (default: all).
  """
  pool = list(range(len(eigs))) if candidates is None else list(candidates)
  if not pool:
    return None
  ok = [l for l in pool if _has_real_log(eigs[l])]
  # Radii equal to 1e-9 (Stage IV: all 1 up to round-off) tie; the deepest layer wins.
  return max(ok or pool, key=lambda l: (round(float(radii[l]), 9), l))


def _decode_one(tokenizer):
  def decode(ids):
    try:
      return tokenizer.decode(list(ids))
    except Exception:  # pylint: disable=broad-except  # e.g. a lone EOT in some tokenizers
      return f"<{ids[0]}>"
  return decode


# The files ``analyze_workdir`` may write (figures by name, then the report).
OUTPUT_FILES = tuple(f"{n}.png" for n in ("spectrum", "log_abs_hist", "alpha", "loss", "layers",
                                          "occupancy", "propagation", "sse")) + (
                                              "report.md", "spectrum.json")


@contextlib.contextmanager
def _staged_output(out: pathlib.Path):
  """Yields a temporary folder beside ``out``; on success moves its files into ``out``.

  ``out`` is created only then, and this analysis's outputs replace those of an
  earlier one (an earlier figure this run does not make is removed, so the
  folder never mixes two analyses). On an error, ``out`` is left as it was, and
  the parent folders made for it are removed again.
  """
  new_parents = []  # the missing ancestors of out, innermost first
  p = out.parent.absolute()
  while not p.exists() and p != p.parent:
    new_parents.append(p)
    p = p.parent
  out.parent.mkdir(parents=True, exist_ok=True)
  work = pathlib.Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
  done = False
  try:
    try:
      yield work
    except OSError as e:
      if e.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        raise
      raise OSError(e.errno, f"cannot write the analysis in {out.parent} ({e.strerror}); "
                    f"{out} was left as it was; free space and run again") from e
    out.mkdir(exist_ok=True)
    made = {p.name for p in work.iterdir()}
    for name in OUTPUT_FILES:
      if name not in made and (out / name).is_file():
        (out / name).unlink()
    for name in sorted(made):
      os.replace(work / name, out / name)
    done = True
  finally:
    shutil.rmtree(work, ignore_errors=True)
    if not done:
      for d in new_parents:
        try:
          d.rmdir()
        except OSError:  # something else was put there meanwhile
          break


def analyze_workdir(workdir, *, out=None, data: str | None = None, step: int | None = None,
                    max_sequences: int = 64, batch_size: int = 8, sentence_tokens: int = 48,
                    exact_tokens: int = 12, layer: int | None = None, sse_paths: int = 32,
                    sse_steps: int | None = None, seed: int = 0,
                    tokenizer_file: str | None = None,
                    cache_dir: str | None = None, commutator: bool = False,
                    attn_impl: str | None = None, log=print) -> dict:
  """Analyses the checkpoint in ``workdir`` and writes the report (QSF §6.6, §4.4).

  Args:
    workdir: a run folder of a Koopman stage (koopman, koopman_attn, hamiltonian_attn).
    out: output folder (default ``workdir/analysis``).
    data: validation data (default: the run's own).
    step: checkpoint step (default: the latest).
    max_sequences: validation sequences for the hidden-state statistics.
    batch_size: sequences per forward pass.
    sentence_tokens: tokens of the propagated sentence.
    exact_tokens: tokens (evenly spaced) on which the exact propagator is
      evaluated (one (2d+2)-square matrix exponential each).
    layer: the layer for the propagators and the SSE (default: ``pick_layer``).
    sse_paths: SSE ensemble size.
    sse_steps: SSE Euler-Maruyama steps per token interval (None: enough for a
      stable explicit step, ``propagation.stable_sse_steps``).
    seed: SSE noise seed, in [0, 2^32).
    tokenizer_file: local GPT-2 vocabulary (default: the run's).
    cache_dir: token-cache folder (default: the run's).
    commutator: also report logm K, its (H, D) split and ||[H, D]|| per layer.
    attn_impl: linear-attention impl to run the model with (default: the run's
      own; see ``load_run``).
    log: progress printer (None: silent).

  Returns:
    The results dict written to ``spectrum.json`` (plus ``out``). The files are
    made in a temporary folder beside ``out`` and moved into it at the end, so
    an error part-way leaves ``out`` as it was (``_staged_output``).

  Raises:
    NoCheckpointError: no checkpoint in ``workdir``.
    ValueError: a non-Koopman stage, or bad arguments.
  """
  log = log or (lambda *_: None)
  seed = _checks.check_seed("seed", seed, "SSE noise key")  # before the restore
  t0 = time.perf_counter()
  timings = {}
  stage = checkpoint_stage(workdir, step)
  out = pathlib.Path(out) if out is not None else pathlib.Path(workdir) / "analysis"
  setup.check_output_folder("--out", out)  # before the restore and the analysis
  run = load_run(workdir, step=step, tokenizer_file=tokenizer_file, attn_impl=attn_impl)
  mcfg = run.model_config
  if layer is not None and not 0 <= layer < mcfg.n_layers:
    raise ValueError(f"--layer must be in [0, {mcfg.n_layers}), got {layer}")
  # Everything is written into a temporary sibling folder and moved into ``out`` at
  # the end: a failure part-way leaves ``out`` as it was.
  with _staged_output(out) as work:
    notes, figures = [], {}
    ops = layer_operators(run.params, mcfg)
    timings["restore_s"] = time.perf_counter() - t0

    t = time.perf_counter()
    spec = spectrum.spectrum_summary(ops.K, commutator=commutator,
                                     unit_circle=stage == "hamiltonian_attn")
    eigs = spectrum.eigenvalues_per_layer(spec)
    if stage == "hamiltonian_attn":
      dev32 = max(float(np.max(np.abs(np.abs(np.linalg.eigvals(K)) - 1.0))) for K in ops.K_model)
      spec["float32_model_max_abs_deviation"] = dev32
      notes.append("Stage IV: K = expm(S - S^T) is rebuilt from S in float64 for the analysis; "
                   f"the float32 K the model evaluates has max ||lambda| - 1| = {dev32:.3g}.")
    title = f"{stage}/{run.cfg.preset}, step {run.step}"
    figures["spectrum"] = _save(pspec.plot_spectrum, work / "spectrum.png", eigs,
                                tol=spec["tol"], title=title)
    figures["log_abs_hist"] = _save(pspec.plot_log_abs_histogram, work / "log_abs_hist.png", eigs,
                                    tol=spec["tol"], title=title)
    timings["spectrum_s"] = time.perf_counter() - t
    log(f"spectrum: {spec['n_eigenvalues']} eigenvalues, |lambda| in "
        f"[{spec['min_abs_eigenvalue']:.3g}, {spec['spectral_radius']:.3g}], {spec['verdict']}")

    t = time.perf_counter()
    alpha = None
    if stage != "koopman":
      alpha = history.alpha_history(workdir, mcfg.n_layers, up_to_step=run.step)
      if alpha is not None and ops.alpha is not None:
        # the analysed checkpoint's own alpha (--step may pick an earlier one)
        alpha = dict(alpha, step=run.step, at_step=ops.alpha.tolist())
      if alpha is not None:
        if alpha["source"] == "checkpoints":
          notes.append("metrics.jsonl does not log alpha; alpha over training is read from the "
                       f"{len(alpha['steps'])} retained checkpoint(s).")
        figures["alpha"] = _save(pdyn.plot_alpha, work / "alpha.png", alpha["steps"],
                                 alpha["alpha"], source=alpha["source"])
    curves = history.loss_curves(history.read_metrics(workdir))
    if any(len(c[0]) for c in curves.values()):
      figures["loss"] = _save(pdyn.plot_losses, work / "loss.png", curves, mark_step=run.step)
    timings["history_s"] = time.perf_counter() - t

    t = time.perf_counter()
    cfg, corpus = setup.load_run_corpus(run, data=data, cache_dir=cache_dir, where=str(workdir))
    bases = [modes.mode_basis(K) for K in ops.K]
    for l, b in enumerate(bases):
      if b is None:
        notes.append(f"layer {l}: K is too close to defective to separate its modes; no G_eff "
                     "or mode occupancy.")
    batches = qdata.iter_eval_batches(corpus.valid, batch_size=batch_size, seq_len=run.seq_len,
                                      mode=cfg.data_mode)
    val = validation.validation_statistics(
        run.params, run.collections, mcfg, bases, batches, beta=run.beta,
        max_sequences=max_sequences, sentence_tokens=sentence_tokens,
        decode=_decode_one(run.tokenizer), eot_id=run.tokenizer.eot_id)
    sentence = val.pop("sentence")
    figures["layers"] = _save(
        pspec.plot_layer_budget, work / "layers.png", spec["radius_per_layer"],
        [r["gamma_decay"] for r in spec["layers"]], [r["gamma_growth"] for r in spec["layers"]],
        spec["gamma_net_per_layer"],
        g_eff_L=[np.nan if r["g_eff_mean"] is None else r["g_eff_mean"] for r in val["layers"]],
        roundoff=ROUNDOFF_PER_MODE * spec["dim"], title=title)
    figures["occupancy"] = _save(pdyn.plot_occupancy, work / "occupancy.png", val["layers"])
    timings["validation_s"] = time.perf_counter() - t
    z = val["z_rms"]
    log(f"validation: {val['sequences']} sequences, RMS(N_f(h_L)) = "
        + ("non-finite" if z["mean"] is None else f"{z['mean']:.4g} +- {z['std']:.3g}"))

    bad = val["z_rms"]["non_finite"]
    if bad:
      notes.append(f"{bad} of {val['sequences']} validation sequences have non-finite final "
                   "states (the model overflows); the norm statistics use the others.")
    results = {"run": _run_info(workdir, run, corpus, ops), "spectrum": spec, "alpha": alpha,
               "validation": val, "figures": figures, "notes": notes}
    if ops.W_V is None:
      notes.append("Stage II has no measurement (no attention target): no propagator or SSE.")
    else:
      t = time.perf_counter()
      finite = [l for l in range(mcfg.n_layers) if np.all(np.isfinite(sentence.k_in[l]))
                and np.all(np.isfinite(sentence.x_tgt[l]))]
      l = pick_layer(eigs, spec["radius_per_layer"], finite) if layer is None else layer
      if l is None or l not in finite:
        notes.append("the model's states along the sentence are not finite at "
                     f"{'every layer' if l is None else f'layer {l}'}: no propagator or SSE.")
      else:
        _dynamics(results, work, ops, sentence, l, run.tokenizer, sse_paths, sse_steps, seed,
                  exact_tokens)
      timings["dynamics_s"] = time.perf_counter() - t
    timings["total_s"] = time.perf_counter() - t0
    results["timings"] = timings
    report.write_report(work, results)
    report.write_json(work / "spectrum.json", results)
  log(f"analysis written to {out} in {timings['total_s']:.1f}s")
  return dict(results, out=str(out))


def _save(fn, path, *args, **kwargs) -> str:
  fn(*args, path=path, **kwargs)
  return path.name


def _finite_mean(a) -> float | None:
  a = np.asarray(a, np.float64)
  a = a[np.isfinite(a)]
  return float(a.mean()) if a.size else None


def _run_info(workdir, run, corpus, ops) -> dict:
  return {"workdir": os.fspath(workdir), "stage": run.cfg.stage, "preset": run.cfg.preset,
          "step": run.step, "total_steps": run.cfg.steps, "layers": ops.n_layers,
          "d_model": ops.dim, "parameters": count_params(run.params),
          "anneal_beta": round(float(run.beta), 6), "tokenizer": run.tokenizer.name,
          "validation_data": corpus.metadata.get("source"),
          "analysis": "float64 on the host (D15)"}


def _dynamics(results, out, ops, sentence, l, tokenizer, sse_paths, sse_steps, seed,
              exact_tokens):
  """Propagators along the sentence and the SSE ensemble for layer ``l``."""
  dyn = propagation.layer_dynamics(ops.K[l], ops.b[l])
  prop = propagation.propagate_sentence(ops.K[l], ops.b[l], ops.W_V[l], sentence.k_in[l],
                                        sentence.x_tgt[l], step_ND=sentence.step[l],
                                        exact_tokens=exact_tokens, dynamics=dyn)
  decode = _decode_one(tokenizer)
  labels = [decode([int(i)]) for i in sentence.tokens]
  results["figures"]["propagation"] = _save(pdyn.plot_propagation, out / "propagation.png",
                                            prop, labels, layer=l)
  note = ("K has a real logarithm: A = logm(K), dt = 1, Sigma_K from Van Loan; paper and "
          "exact forms differ." if prop["variant"] == "continuous" else
          "K has an eigenvalue on (-inf, 0], so no real generator: discrete prior "
          "N(K u + b, sigma_K^2 I) then the measurement update; paper and exact coincide.")
  med = lambda a: float(np.nanmedian(a)) if np.any(np.isfinite(a)) else None
  results["propagation"] = {
      "layer": l, "variant": prop["variant"], "variant_note": note,
      "tokens": int(sentence.tokens.size), "token_ids": sentence.tokens.tolist(),
      "exact_tokens": int(len(prop["exact_index"])),
      "dev_prior_median": med(prop["dev_prior"]), "dev_paper_median": med(prop["dev_paper"]),
      "dev_exact_median": med(prop["dev_exact"]), "shift_ratio_median": med(prop["shift_ratio"]),
      "sigma_m": 1.0, "sigma_K": 1.0, "dt": 1.0}
  n = sentence.tokens.size - 1
  x_star = propagation.state_target(ops.W_V[l], sentence.x_tgt[l][n])
  sse = propagation.sse_ensemble(jax.random.key(seed), ops.K[l], ops.b[l], sentence.k_in[l][n],
                                 x_star, n_paths=sse_paths, n_steps=sse_steps, dynamics=dyn)
  results["figures"]["sse"] = _save(pdyn.plot_sse, out / "sse.png", sse, layer=l,
                                    token=labels[n])
  results["sse"] = {
      "layer": l, "token": labels[n], "position": n, "n_paths": sse_paths,
      "n_steps": sse["n_steps"], "variant_dynamics": sse["variant_dynamics"],
      "sse_variant": sse["sse_variant"], "finite": sse["finite"], "scale": sse["scale"],
      "sigma_m": 1.0,
      "dist_end_mean": _finite_mean(sse["dist"][:, -1]),
      "free_dist_end": float(sse["free_dist"][-1])}
