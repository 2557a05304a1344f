"""Markdown tables of the kernel benchmark's rows (``bench``)."""

from __future__ import annotations

from . import goals
from .candidates import DEFAULT_CONFIG


def add_speedups(rows, default_config):
  """Adds vs_xla and vs_softmax (time(ref) / time(row)) to every timed row.

  The references are the rows of impl "xla" and "softmax" (and a Pallas row of
  ``default_config``) at the same mode, T and D.
  """
  key = lambda r: (r["mode"], r["T"], r["D"])
  base = {(r["impl"],) + key(r): r["ms"] for r in rows
          if "ms" in r and r["config"] in ("", default_config)}
  for r in rows:
    if "ms" not in r:
      continue
    for ref in ("xla", "softmax"):
      t = base.get((ref,) + key(r))
      r[f"vs_{ref}"] = None if t is None else t / r["ms"]


def markdown_table(rows, header):
  """The rows as a markdown table (speed-ups are time(ref) / time(row))."""
  fmt = lambda x, f: "–" if x is None else format(x, f)
  out = [header, "",
         "| impl | mode | T | D | ms | TFLOP/s | GB/s | % roofline | vs xla | vs softmax |",
         "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
  for r in rows:
    name = r["impl"] + (f" ({r['config']})" if r["config"] else "")
    if r.get("cupti_error"):
      name += " [sync: cupti failed]"
    if "ms" not in r:
      out.append(f"| {name} | {r['mode']} | {r['T']} | {r['D']} | skipped: {r['skipped']} "
                 "| | | | | |")
      continue
    out.append(f"| {name} | {r['mode']} | {r['T']} | {r['D']} | {r['ms']:.3f} | "
               f"{r['tflops']:.3f} | {r['gbps']:.1f} | {fmt(r['roofline_pct'], '.1f')} | "
               f"{fmt(r['vs_xla'], '.2f')} | {fmt(r['vs_softmax'], '.2f')} |")
  return "\n".join(out)


def kernel_breakdown(rows, top=4):
  """Markdown table of the ``top`` slowest kernels of each row timed with CUPTI."""
  out = ["| impl | mode | T | D | kernel | ms | share |",
         "| --- | --- | --- | --- | --- | --- | --- |"]
  for r in rows:
    if not r.get("kernels_ms"):
      continue
    name = r["impl"] + (f" ({r['config']})" if r["config"] else "")
    total = sum(r["kernels_ms"].values())
    for kernel, ms in sorted(r["kernels_ms"].items(), key=lambda kv: -kv[1])[:top]:
      out.append(f"| {name} | {r['mode']} | {r['T']} | {r['D']} | {kernel} | {ms:.3f} | "
                 f"{100 * ms / total:.0f}% |")
  return "\n".join(out)


def design_ranking(rows, default_config):
  """Markdown table of the fastest Pallas configuration per (mode, T, D), or "".

  For each (mode, T, D) with at least two timed Pallas configurations: the
  fastest one, its time, the default configuration's time and the speed-up of
  the fastest over the default (the figure that decides whether to change
  ``designs.DEFAULT_DESIGN``). Empty where no (mode, T, D) has two.
  """
  groups = {}
  for r in rows:
    if r["impl"] == "pallas" and "ms" in r:
      groups.setdefault((r["mode"], r["T"], r["D"]), []).append(r)
  out = ["| mode | T | D | fastest | ms | default ms | speed-up over default | configs timed |",
         "| --- | --- | --- | --- | --- | --- | --- | --- |"]
  for (mode, T, D), rs in groups.items():
    if len(rs) < 2:
      continue
    best = min(rs, key=lambda r: r["ms"])
    dflt = next((r for r in rs if r["config"] == default_config), None)
    ms_d = "–" if dflt is None else f"{dflt['ms']:.3f}"
    gain = "–" if dflt is None else f"{dflt['ms'] / best['ms']:.2f}x"
    out.append(f"| {mode} | {T} | {D} | {best['config']} | {best['ms']:.3f} | {ms_d} | "
               f"{gain} | {len(rs)} |")
  return "\n".join(out) if len(out) > 2 else ""


def results_markdown(data: dict) -> str:
  """A benchmark's JSON (``bench --out``) as markdown, as ``bench`` printed it.

  The rows' table under a header naming the device, jax version, shape, timing,
  date and the roofline ceilings used; the per-kernel breakdown where the rows were timed with CUPTI; the
  fastest Pallas configuration per (mode, T, D) where several were timed
  (``design_ranking``); and the goal verdicts of a ``--goals`` run. A run cut short (``"partial": true``)
  says so in the header.

  Raises:
    ValueError: if ``data`` lacks the keys ``bench`` writes.
  """
  missing = sorted({"date", "device", "jax_version", "timing", "decay", "reps", "rows"}
                   - set(data))
  if missing:
    raise ValueError(f"not a benchmark JSON written by bench --out: no {missing}")
  rows = data["rows"]
  shape = f"B={rows[0]['B']} H={rows[0]['H']} {rows[0]['dtype']}, " if rows else ""
  header = (f"Causal linear attention, {data['device']}, jax {data['jax_version']}, {shape}"
            f"decay {data['decay']}, median of {data['reps']}, {data['timing']} timing, "
            f"{data['date']}" + (" (PARTIAL: the run was cut short)" if data.get("partial")
                                 else ""))
  peak = data.get("peak")
  if peak:
    header += (f"\n\nRoofline ceilings of the % roofline column: "
               f"{peak['bandwidth'] / 1e12:.2f} TB/s, {peak['flops'] / 1e12:.0f} TFLOP/s "
               f"({peak['source']})")
  parts = [markdown_table(rows, header)]
  if any(r.get("kernels_ms") for r in rows):
    parts.append(kernel_breakdown(rows))
  ranking = design_ranking(rows, data.get("default_config", DEFAULT_CONFIG))
  if ranking:
    parts.append("Fastest Pallas configuration per row:\n\n" + ranking)
  if data.get("goals"):
    parts.append(goals.markdown(data["goals"], goals.header(
        data.get("goal_config", DEFAULT_CONFIG), data["decay"], data["device"],
        data["timing"], data["date"])))
  return "\n\n".join(parts)

