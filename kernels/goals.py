"""The kernels' performance goals, checked against benchmark rows.

The goals (stated for an H100 SXM, bf16, B = H = 8):
  1. forward at T=4096, D=128 within 1.5x of its HBM floor (90 us on an H100);
  2. forward + backward at the same shape within 1.5x of its floor;
  3. faster than the "xla" path at every T >= 1K (both modes, every D measured);
  4. at least 3x faster than causal softmax attention (cuDNN) at T=4096.

The floors of goals 1-2 follow kernels spec §7, t_floor = max(bytes /
bandwidth, flops / matmul peak), with the H100's ceilings of the spec's table
(``roofline.PEAKS["H100"]``: 3.0 TB/s, 800 TFLOP/s), so the targets are fixed:
0.1347 ms forward, 0.3707 ms forward + backward (741 MB at 3.0 TB/s, x1.5). They are never rescaled to
another card's ceilings: on a card that is not an H100 SXM, goals 1-2 are "not
judged" (the measured time and its multiple of that card's own floor are still
shown where its ceilings are known), and the verdicts of the relative goals 3-4
carry "(not an H100)".

The floors are device time, so goals 1-2 are judged only on CUPTI timing
(``bench --timing=cupti``). An end-to-end time ("sync", "pipelined") is at
least the device time: at or under the target it still proves the goal met;
over it, the verdict is "unclear".

Each goal is judged on one Pallas configuration (the default one unless told
otherwise); a goal whose rows are missing, hold no finite positive time, or
(goals 3-4) were timed differently, is "unmeasured", never met.
"""

from __future__ import annotations

import math

from . import roofline

GOAL_SWEEP = dict(T=(1024, 2048, 4096, 8192, 16384), D=(64, 128))
FLOOR_FACTOR = 1.5
SOFTMAX_FACTOR = 3.0
H100_PEAK = roofline.PEAKS["H100"]  # the ceilings the goals are stated with
NOT_H100 = "not judged (not an H100)"


def is_h100(device_kind: str) -> bool:
  """Whether a ``jax.Device.device_kind`` names an H100 SXM (PCIe and NVL cards differ)."""
  return "H100" in device_kind and not any(s in device_kind for s in roofline.OTHER_VARIANTS)


def _timed(r) -> bool:
  return r is not None and isinstance(r.get("ms"), (int, float)) and math.isfinite(
      r["ms"]) and r["ms"] > 0


def _same_timing(a, b) -> bool:
  """Whether two rows were timed alike (rows without a ``timing`` share the run's)."""
  return a.get("timing") == b.get("timing")


def _find(rows, impl, mode, T, D, config=""):
  """The first row of (impl, mode, T, D) (and Pallas ``config``) holding a time, or None."""
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


def target_ms(mode, B=8, H=8):
  """Goal 1 ("fwd") or 2 ("fwdbwd"): 1.5x the H100 floor at T=4096, D=128 (ms)."""
  return FLOOR_FACTOR * floor_ms(mode, B, H, 4096, 128, H100_PEAK)


def _floor_goal(n, mode, r, h100, timing, peak):
  goal = f"{n}. {mode} T=4096 D=128 within {FLOOR_FACTOR}x of its H100 floor"
  if not _timed(r):
    measured = "–" if r is None else f"no valid time ({r['ms']!r} ms)"
    return dict(goal=goal, measured=measured, target="–", verdict="unmeasured")
  timing = r.get("timing", timing)  # a row's own timing (bench falls back from cupti)
  target = target_ms(mode, r["B"], r["H"])
  measured = f"{r['ms']:.4f} ms ({timing})"
  if peak is not None:
    floor = floor_ms(mode, r["B"], r["H"], 4096, 128, peak)
    measured += f", {r['ms'] / floor:.2f}x this device's floor"
  if not h100:
    verdict = NOT_H100
  elif timing == "cupti":
    verdict = "met" if r["ms"] <= target else "NOT met"
  else:  # end-to-end time >= device time: only "met" is conclusive
    verdict = "met" if r["ms"] <= target else "unclear (end-to-end time; judge with cupti)"
  return dict(goal=goal, measured=measured, target=f"<= {target:.4f} ms", verdict=verdict)


def evaluate(rows, *, device_kind: str, timing: str, config: str,
             peak: roofline.DevicePeak | None = None):
  """Judges the four goals on the rows of ``bench.run``.

  Args:
    rows: benchmark rows (dicts with impl, config, mode, T, D, B, H and ms).
    device_kind: the device the rows were measured on (``jax.Device.device_kind``).
    timing: how the rows were timed (``timing.TIMINGS``), where a row does not
      say (its "timing" key); goals 1-2 need "cupti" to be found NOT met.
    config: the Pallas configuration judged (a ``candidates.PALLAS_CONFIGS`` name).
    peak: this device's ceilings, or None; only to show each time as a multiple
      of this device's own floor (the targets are the H100's).

  Returns:
    a list of dicts with keys goal, measured, target and verdict ("met", "NOT
    met", "unmeasured", "unclear (...)", or ``NOT_H100``; goals 3-4 off an
    H100 add " (not an H100)").
  """
  h100 = is_h100(device_kind)
  where = "" if h100 else " (not an H100)"
  verdict = lambda ok: ("met" if ok else "NOT met") + where
  out = [_floor_goal(n, mode, _find(rows, "pallas", mode, 4096, 128, config), h100, timing,
                     peak) for n, mode in ((1, "fwd"), (2, "fwdbwd"))]
  slower, missing, n_ok = [], 0, 0
  for mode in ("fwd", "fwdbwd"):
    for D in GOAL_SWEEP["D"]:
      for T in GOAL_SWEEP["T"]:
        p, x = _find(rows, "pallas", mode, T, D, config), _find(rows, "xla", mode, T, D)
        if not (_timed(p) and _timed(x) and _same_timing(p, x)):
          missing += 1
        elif p["ms"] < x["ms"]:
          n_ok += 1
        else:
          slower.append(f"{mode} T={T} D={D}")
  measured = f"faster in {n_ok} of {n_ok + len(slower)} rows" + (
      f"; slower: {', '.join(slower)}" if slower else "") + (
          f"; {missing} rows unmeasured" if missing else "")
  out.append(dict(goal="3. faster than xla at every T >= 1K", measured=measured,
                  target="every row", verdict=verdict(False) if slower else (
                      "unmeasured" if missing else verdict(True))))
  for D in (128, 64):
    for mode in ("fwd", "fwdbwd"):
      p, s = _find(rows, "pallas", mode, 4096, D, config), _find(rows, "softmax", mode, 4096, D)
      goal = f"4. >= {SOFTMAX_FACTOR}x faster than softmax, {mode} T=4096 D={D}"
      if not (_timed(p) and _timed(s) and _same_timing(p, s)):
        out.append(dict(goal=goal, measured="–", target="–", verdict="unmeasured"))
        continue
      ratio = s["ms"] / p["ms"]
      out.append(dict(goal=goal, measured=f"{ratio:.2f}x", target=f">= {SOFTMAX_FACTOR}x",
                      verdict=verdict(ratio >= SOFTMAX_FACTOR)))
  return out


def header(config: str, decay: str, device_kind: str, timing: str, date: str) -> str:
  """The heading of a goal table: what was judged, on what, and against which ceilings."""
  h100 = H100_PEAK
  text = (f"Goals (stated for an H100 SXM; floors at the spec's H100 ceilings, "
          f"{h100.bandwidth / 1e12:.1f} TB/s and {h100.flops / 1e12:.0f} TFLOP/s), judged on "
          f"{config}, decay {decay}, {device_kind}, {timing} timing, {date}")
  if not is_h100(device_kind):
    text += ". This device is not an H100 SXM: goals 1-2 are not judged, 3-4 are indicative"
  return text


def markdown(results, heading):
  """The goal verdicts as a markdown table."""
  lines = [heading, "", "| goal | measured | target | verdict |", "| --- | --- | --- | --- |"]
  lines += [f"| {r['goal']} | {r['measured']} | {r['target']} | {r['verdict']} |"
            for r in results]
  return "\n".join(lines)
