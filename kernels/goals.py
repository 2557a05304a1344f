"""The kernels' performance goals, checked against benchmark rows.

The goals (stated for an H100, bf16, B = H = 8):
  1. forward at T=4096, D=128 within 1.5x of its HBM floor (90 us on an H100);
  2. forward + backward at the same shape within 1.5x of its floor;
  3. faster than the "xla" path at every T >= 1K (both modes, every D measured);
  4. at least 3x faster than causal softmax attention (cuDNN) at T=4096.
The floors follow kernels spec §7: t_floor = max(bytes / bandwidth,
flops / matmul peak) with the ceilings of the device the rows come from
(``roofline.DevicePeak``), so on another card the targets scale with its
ceilings. Each goal is judged on one Pallas configuration (the default one
unless told otherwise); a goal with a missing row is "unmeasured", never met.
"""

from __future__ import annotations

from . import roofline

GOAL_SWEEP = dict(T=(1024, 2048, 4096, 8192, 16384), D=(64, 128))
FLOOR_FACTOR = 1.5
SOFTMAX_FACTOR = 3.0


def _find(rows, impl, mode, T, D, config=""):
  for r in rows:
    if (r["impl"], r["mode"], r["T"], r["D"]) == (impl, mode, T, D) and "ms" in r and (
        impl != "pallas" or r["config"] == config):
      return r
  return None


def floor_ms(mode, B, H, T, D, peak: roofline.DevicePeak, elem_bytes=2, chunk=64):
  """The roofline floor (ms) of one mode ("fwd" or "fwdbwd") at K = V = D."""
  flops = roofline.fwd_flops(B, H, T, D, D, chunk)
  nbytes = roofline.fwd_bytes(B, H, T, D, D, chunk, elem_bytes=elem_bytes)
  if mode == "fwdbwd":
    flops += roofline.bwd_flops(B, H, T, D, D, chunk)
    nbytes += roofline.bwd_bytes(B, H, T, D, D, chunk, elem_bytes=elem_bytes)
  return 1e3 * max(nbytes / peak.bandwidth, flops / peak.flops)


def evaluate(rows, peak: roofline.DevicePeak | None, config: str):
  """Judges the four goals on the rows of ``bench.run``.

  Args:
    rows: benchmark rows (dicts with impl, config, mode, T, D, B, H and ms).
    peak: the ceilings of the device, or None (goals 1-2 are then unmeasured).
    config: the Pallas configuration judged (a ``candidates.PALLAS_CONFIGS`` name).

  Returns:
    a list of dicts with keys goal, measured, target and verdict ("met", "NOT met"
    or "unmeasured").
  """
  out = []
  verdict = lambda ok: "met" if ok else "NOT met"
  for n, mode in ((1, "fwd"), (2, "fwdbwd")):
    r = _find(rows, "pallas", mode, 4096, 128, config)
    goal = f"{n}. {mode} T=4096 D=128 within {FLOOR_FACTOR}x of its floor"
    if r is None or peak is None:
      out.append(dict(goal=goal, measured="–", target="–", verdict="unmeasured"))
      continue
    target = FLOOR_FACTOR * floor_ms(mode, r["B"], r["H"], 4096, 128, peak)
    out.append(dict(goal=goal, measured=f"{r['ms']:.3f} ms", target=f"<= {target:.3f} ms",
                    verdict=verdict(r["ms"] <= target)))
  slower, missing, n_ok = [], 0, 0
  for mode in ("fwd", "fwdbwd"):
    for D in GOAL_SWEEP["D"]:
      for T in GOAL_SWEEP["T"]:
        p, x = _find(rows, "pallas", mode, T, D, config), _find(rows, "xla", mode, T, D)
        if p is None or x is None:
          missing += 1
        elif p["ms"] < x["ms"]:
          n_ok += 1
        else:
          slower.append(f"{mode} T={T} D={D}")
  measured = f"faster in {n_ok} of {n_ok + len(slower)} rows" + (
      f"; slower: {', '.join(slower)}" if slower else "") + (
          f"; {missing} rows unmeasured" if missing else "")
  out.append(dict(goal="3. faster than xla at every T >= 1K", measured=measured,
                  target="every row", verdict="NOT met" if slower else (
                      "unmeasured" if missing else "met")))
  for D in (128, 64):
    for mode in ("fwd", "fwdbwd"):
      p, s = _find(rows, "pallas", mode, 4096, D, config), _find(rows, "softmax", mode, 4096, D)
      goal = f"4. >= {SOFTMAX_FACTOR}x faster than softmax, {mode} T=4096 D={D}"
      if p is None or s is None:
        out.append(dict(goal=goal, measured="–", target="–", verdict="unmeasured"))
        continue
      ratio = s["ms"] / p["ms"]
      out.append(dict(goal=goal, measured=f"{ratio:.2f}x", target=f">= {SOFTMAX_FACTOR}x",
                      verdict=verdict(ratio >= SOFTMAX_FACTOR)))
  return out


def markdown(results, header):
  """The goal verdicts as a markdown table."""
  lines = [header, "", "| goal | measured | target | verdict |", "| --- | --- | --- | --- |"]
  lines += [f"| {r['goal']} | {r['measured']} | {r['target']} | {r['verdict']} |"
            for r in results]
  return "\n".join(lines)
