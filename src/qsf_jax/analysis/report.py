"""The analysis report: ``report.md`` and ``spectrum.json`` (QSF §4.4, §6.6).

``write_report`` renders the results dict assembled by ``analyze_workdir``
(or by hand in a notebook) as Markdown with the figures inline, and
``write_json`` stores it as JSON. Sections appear only for the keys present:
``run`` and ``spectrum`` are required; ``alpha``, ``validation``,
``propagation``, ``sse``, ``figures`` and ``notes`` are optional.
"""

from __future__ import annotations

import json
import math
import pathlib

import numpy as np

from qsf_jax.training.cli import finite_json

# QSF §4.4 / Table 1, verbatim where the paper states a number.
# ||P_g||_2 above which the report warns (Gaussian 128 x 128 K: 30-58, three seeds).
ILL_CONDITIONED_PROJECTOR = 100.0
PAPER = {"abs_range": (0.3, 27.9), "radius_layer": "32 (the last)", "z_rms": (1.02, 0.08),
         "alpha_range": (1.05, 1.35)}


def write_json(path, results: dict) -> pathlib.Path:
  """Writes ``results`` as strict JSON (numpy -> lists, NaN/inf -> null)."""
  path = pathlib.Path(path)
  path.write_text(json.dumps(finite_json(results), indent=1, allow_nan=False))
  return path


def _f(v, fmt=".4g") -> str:
  if v is None:
    return "n/a"
  if isinstance(v, float) and not math.isfinite(v):
    return str(v)
  return format(v, fmt)


def _fig(lines, results, name, caption):
  fn = results.get("figures", {}).get(name)
  if fn:
    lines += [f"![{caption}]({fn})", ""]


def _spectrum_section(lines, results):
  sp = results["spectrum"]
  lines += ["## Spectrum of the Koopman matrices (float64)", "",
            f"{sp['n_layers']} layers x d = {sp['dim']}: {sp['n_eigenvalues']} eigenvalues "
            f"lambda of K^(l), gamma = ln|lambda| (QSF §2.2, D17).", ""]
  _fig(lines, results, "spectrum", "eigenvalues in the complex plane")
  _fig(lines, results, "log_abs_hist", "histogram of log10|lambda|")
  lines += ["| tolerance tau | decay (gamma < -tau) | neutral | growth (gamma > tau) |",
            "|---|---|---|---|"]
  for t, c in sp["counts_by_tol"].items():
    lines.append(f"| {t} | {c['decay']} | {c['neutral']} | {c['growth']} |")
  lines += ["", f"- |lambda| range: {_f(sp['min_abs_eigenvalue'])} to "
            f"{_f(sp['spectral_radius'])} (paper: {PAPER['abs_range'][0]}-"
            f"{PAPER['abs_range'][1]})",
            f"- spectral radius maximal in layer {sp['argmax_layer']} (0-based; paper: layer "
            f"{PAPER['radius_layer']})"]
  uc = sp.get("unit_circle")
  if uc is not None:
    ok = "yes" if uc["all_on_unit_circle"] else "NO"
    lines.append(f"- Stage IV unit-circle check (|ln|lambda|| <= {uc['tol']:g}): {ok}, "
                 f"{uc['neutral']}/{uc['n_eigenvalues']} neutral "
                 f"({100 * uc['neutral_fraction']:.2f}%), max |ln|lambda|| = "
                 f"{uc['max_abs_log_abs']:.3g}")
  lines += ["", "### Energy budget (QSF eqs. 6-9)", "",
            "| quantity | value |", "|---|---|",
            f"| Gamma_decay = sum_(gamma<0) abs(gamma) | {_f(sp['gamma_decay'])} |",
            f"| Gamma_growth = sum_(gamma>0) gamma | {_f(sp['gamma_growth'])} |",
            f"| Gamma_net = sum gamma | {_f(sp['gamma_net'])} |",
            f"| sum_l ln abs(det K^(l)) (slogdet) | {_f(sp['slogdet_gamma_net'])} |",
            f"| abs difference | {_f(sp.get('slogdet_abs_error'), '.3g')} |",
            f"| slogdet check passed | {sp['slogdet_consistent']} |", "",
            f"**Verdict:** {sp['verdict']}.", ""]
  _fig(lines, results, "layers", "per-layer spectral radius and energy budget")
  lines += ["| layer | max abs(lambda) | min abs(lambda) | decay | neutral | growth | "
            "Gamma_decay | Gamma_growth | Gamma_net |", "|---|---|---|---|---|---|---|---|---|"]
  for l, r in enumerate(sp["layers"]):
    c = r["counts"]
    lines.append(f"| {l} | {_f(r['spectral_radius'])} | {_f(r['min_abs_eigenvalue'])} | "
                 f"{c['decay']} | {c['neutral']} | {c['growth']} | {_f(r['gamma_decay'])} | "
                 f"{_f(r['gamma_growth'])} | {_f(r['gamma_net'])} |")
  lines += ["", f"(classes per layer at tau = {sp['tol']:g}; Gamma_decay and Gamma_growth sum "
            "over the sign of gamma, eqs. 6-7, so a layer with no decay mode at tau can have "
            "Gamma_decay > 0)", ""]


def _generator_section(lines, results):
  """The (H, D) split of A = logm(K) (QSF eq. 1) per layer, when it was computed."""
  sp = results["spectrum"]
  gens = [r.get("generator") for r in sp["layers"]]
  if not any(gens):
    return
  lines += ["### Generator split A = logm(K) / dt = -iH + D (QSF eq. 1, D17)", "",
            "| layer | real logarithm | logm error | norm(H) | norm(D) | Tr D | "
            "norm([H, D]) / (norm(H) norm(D)) |", "|---|---|---|---|---|---|---|"]
  for l, g in enumerate(gens):
    real = "yes" if g["logm_real"] else f"no ({g['nonpositive_real_eigenvalues']} on (-inf, 0])"
    lines.append(f"| {l} | {real} | {_f(g['logm_rel_error'], '.2g')} | {_f(g['norm_H'])} | "
                 f"{_f(g['norm_D'])} | {_f(g['trace_D'])} | {_f(g['commutator'], '.3g')} |")
  n = sp.get("commutator_layers", 0)
  lines += ["", f"Commutator over the {n} layer(s) with a real logarithm: max "
            f"{_f(sp.get('commutator_max'), '.3g')}, mean {_f(sp.get('commutator_mean'), '.3g')} "
            "(0: H and D commute, the frequencies come from H and the rates from D alone; a "
            "part of round-off size counts as 0). A layer without a real logarithm is split "
            "from the complex principal log: its row is not the split of a real generator.",
            ""]


def _alpha_section(lines, results):
  a = results.get("alpha")
  lines += ["## Measurement strength alpha per layer (QSF Fig. 1)", ""]
  if a is None:
    lines += ["This stage has no alpha (no measurement).", ""]
    return
  if a.get("at_step") is not None:  # the analysed checkpoint's own alpha
    last, which = np.asarray(a["at_step"]), f"Alpha at step {a['step']} (this checkpoint)"
  else:
    last, which = np.asarray(a["alpha"])[-1], f"Alpha at step {int(a['steps'][-1])}"
  lines += [f"Source: {a['source']} ({len(a['steps'])} points, steps "
            f"{int(a['steps'][0])}-{int(a['steps'][-1])}).", ""]
  _fig(lines, results, "alpha", "alpha per layer over training")
  lines += [f"{which}: min {_f(float(last.min()))}, max {_f(float(last.max()))}, "
            f"mean {_f(float(last.mean()))} (paper: {PAPER['alpha_range'][0]}-"
            f"{PAPER['alpha_range'][1]}, increasing with depth, all > 1).", ""]


def _validation_section(lines, results):
  v = results.get("validation")
  if v is None:
    return
  z, h = v["z_rms"], v["h_rms"]
  lines += ["## Hidden-state norms (D9) and G_eff (QSF eq. 11)", "",
            f"{v['sequences']} validation sequences, {v['tokens']} tokens.", "",
            "| statistic (per-sequence mean of per-token RMS) | mean | std | max |",
            "|---|---|---|---|",
            f"| RMS of N_f(h_L) (D9) | {_f(z['mean'])} | {_f(z['std'])} | {_f(z['max'])} |",
            f"| RMS of h_L before the final norm | {_f(h['mean'])} | {_f(h['std'])} | "
            f"{_f(h['max'])} |", "",
            f"Paper: {PAPER['z_rms'][0]} +- {PAPER['z_rms'][1]} over 10,000 sequences.", "",
            "G_eff(u) = sum_k |lambda_k| w_k(u), w_k the occupancy of mode k by the "
            "Koopman input u (oblique projectors).", "",
            "| layer | spectral radius | mean G_eff | max G_eff | top-mode mean occupancy | "
            "max projector norm |",
            "|---|---|---|---|---|---|"]
  radii = results["spectrum"]["radius_per_layer"]
  for l, r in enumerate(v["layers"]):
    lines.append(f"| {l} | {_f(radii[l])} | {_f(r['g_eff_mean'])} | {_f(r['g_eff_max'])} | "
                 f"{_f(r['mean_occupancy'], '.3g')} | {_f(r.get('projector_norm'), '.3g')} |")
  lines.append("")
  ill = [l for l, r in enumerate(v["layers"])
         if (r.get("projector_norm") or 0.0) > ILL_CONDITIONED_PROJECTOR]
  if ill:
    lines += [f"Layers {ill} have a spectral projector of norm > "
              f"{ILL_CONDITIONED_PROJECTOR:g} (1 for a normal K): nearly defective modes "
              "whose weights ||P_g u||^2 dwarf the others, so G_eff and the occupancies "
              "there follow those modes' |lambda| rather than the state.", ""]
  _modes_section(lines, results, v)


def _modes_section(lines, results, v):
  l = results["spectrum"]["argmax_layer"]
  rec = v["layers"][l]
  lines += ["## Which tokens occupy the largest-|lambda| modes (QSF §4.4)", "",
            "Occupancy of a layer's top mode (largest |lambda| with its conjugate) by a "
            "token's Koopman input; enrichment = mean over the tokens / mean over all tokens.",
            ""]
  _fig(lines, results, "occupancy", "top-mode occupancy enrichment per layer")
  uc = results["spectrum"].get("unit_circle")
  if uc is not None and uc["all_on_unit_circle"]:
    lines += ["Every |lambda| is 1 here (Stage IV), so the 'largest' mode is only picked by "
              "round-off; the table is not evidence either way.", ""]
  lines += [f"Layer {l} (largest spectral radius), top mode lambda = "
            f"{_complex(rec['top_modes'])}:", "",
            "| category | tokens | share | mean occupancy | enrichment |", "|---|---|---|---|---|"]
  for c, s in rec["categories"].items():
    lines.append(f"| {c} | {s['tokens']} | {_f(s['share'], '.3f')} | "
                 f"{_f(s['mean_occupancy'], '.3g')} | {_f(s['enrichment'], '.3g')} |")
  lines += ["", "| token | count | mean occupancy | enrichment |", "|---|---|---|---|"]
  for t in rec["top_tokens"]:
    lines.append(f"| `{json.dumps(t['text'])[1:-1]}` | {t['count']} | "
                 f"{_f(t['mean_occupancy'], '.3g')} | {_f(t['enrichment'], '.3g')} |")
  lines.append("")


def _complex(pairs):
  if not pairs:
    return "n/a"
  return ", ".join(f"{re:.4g}{im:+.4g}i" for re, im in pairs)


def _dynamics_section(lines, results):
  p = results.get("propagation")
  if p is None:
    return
  lines += ["## Propagators of a trained layer (QSF eqs. 57-58, spec §6.3-6.4)", "",
            f"Layer {p['layer']} (0-based), first validation sequence ({p['tokens']} tokens; "
            f"the exact form on {p.get('exact_tokens', p['tokens'])} of them), one token "
            f"interval dt = {_f(p.get('dt', 1.0), 'g')}, sigma_m = {_f(p['sigma_m'], 'g')}, "
            f"sigma_K = {_f(p['sigma_K'], 'g')} on the layer's own (unscaled) states, variant "
            f"**{p['variant']}**: {p['variant_note']}", ""]
  _fig(lines, results, "propagation", "propagator means along a sentence")
  lines += ["| mean vs the layer update h^(l+1) - h^(l) | median relative deviation |",
            "|---|---|"]
  for k in ("prior", "paper", "exact"):
    lines.append(f"| {k} | {_f(p.get(f'dev_{k}_median'), '.3g')} |")
  if p["variant"] == "discrete":
    lines += ["", "Ratio of mean shifts paper/exact: n/a (discrete variant: the two forms "
              "coincide, so the ratio is 1 by construction).", ""]
  else:
    lines += ["", f"Median ratio of mean shifts paper/exact: "
              f"{_f(p.get('shift_ratio_median'), '.3g')} (spec §7: 2 for small dt, 1.31 at "
              "dt = 1 with M = I).", ""]
  s = results.get("sse")
  if s is not None:
    lines += ["### SSE ensemble (QSF eq. 43, §6.7)", "",
              f"{s['n_paths']} paths, {s['n_steps']} Euler-Maruyama steps over one token "
              f"interval, from token {s['token']!r} of that sentence; generator: "
              f"{_sse_generator(s['variant_dynamics'])}; measured target: the state x* with "
              "W_V x* = x_tgt; "
              f"all paths finite: {s['finite']}. States scaled by 1/||x0|| (||x0|| = "
              f"{_f(s.get('scale'), '.4g')}) and sigma_m = {_f(s.get('sigma_m', 1.0), 'g')} "
              "in those units (the SSE is not scale-invariant: in the layer's own units its "
              "measurement drift is that of sigma_m ||x0||); mean distance to "
              f"x* at t = 1: {_f(s['dist_end_mean'], '.3g')} with measurement, "
              f"{_f(s['free_dist_end'], '.3g')} without.", ""]
    _fig(lines, results, "sse", "SSE ensemble trajectories")


def _sse_generator(variant: str) -> str:
  """How the SSE's generator relates to the layer (``propagation.layer_dynamics``)."""
  if variant == "discrete":
    return ("the surrogate A = K - I (K has no real logarithm; the flow e^{K-I} matches the "
            "layer's map K only to first order, so the no-measurement curve is not the "
            "layer's own update)")
  return f"{variant} (A = logm(K): the flow without measurement is the layer's map)"


def render_report(results: dict) -> str:
  """The Markdown text of the report (see the module docstring for the keys)."""
  run = results["run"]
  lines = [f"# QSF spectral analysis: {run.get('stage')} / {run.get('preset')} at step "
           f"{run.get('step')}", ""]
  lines += [f"- {k}: {v}" for k, v in run.items()]
  lines.append("")
  _spectrum_section(lines, results)
  _generator_section(lines, results)
  _alpha_section(lines, results)
  if results.get("figures", {}).get("loss"):
    _fig(lines, results, "loss", "training and validation loss")
  _validation_section(lines, results)
  _dynamics_section(lines, results)
  notes = results.get("notes") or []
  if notes:
    lines += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
  return "\n".join(lines)


def write_report(out_dir, results: dict) -> pathlib.Path:
  """Writes ``out_dir/report.md``; returns its path."""
  out_dir = pathlib.Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  path = out_dir / "report.md"
  path.write_text(render_report(results))
  return path
