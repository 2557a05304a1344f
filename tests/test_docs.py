"""The Python blocks of the README and docs/NOTEBOOK.md run as written.

Each document's blocks run in order in one fresh interpreter (the notebook
switches on float64 globally, which must not leak into other tests), from a
temporary folder, with rank promotion raising as in the rest of the suite. The
notebook's own ``assert`` lines check the physics it demonstrates.
"""

import os
import re
import subprocess
import sys

import pytest

from conftest import REPO_ROOT

_BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def python_blocks(path) -> list[str]:
  """The fenced ```python blocks of a markdown file, in order."""
  return _BLOCK.findall(path.read_text(encoding="utf-8"))


def _run_blocks(doc, tmp_path, timeout, fast_compiles=False):
  """Runs ``doc``'s blocks; ``fast_compiles`` turns XLA's heavy passes off (as the
  ``fast_compiles`` fixture does), for documents whose time goes to compiling."""
  blocks = python_blocks(REPO_ROOT / doc)
  assert blocks, f"{doc} has no python blocks"
  script = tmp_path / "blocks.py"
  script.write_text("\n\n".join(blocks), encoding="utf-8")
  # TMPDIR: the notebook's tempfile.mkdtemp() run folder goes where pytest cleans up
  env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_NUMPY_RANK_PROMOTION="raise",
             TMPDIR=str(tmp_path))
  if fast_compiles:
    env["JAX_DISABLE_MOST_OPTIMIZATIONS"] = "1"
  else:  # XLA's default passes and CPU emitters, as users run (conftest picks others)
    env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split()
                                if not f.startswith("--xla_cpu_use_fusion_emitters"))
  proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env,
                        capture_output=True, text=True, timeout=timeout)
  assert proc.returncode == 0, f"{doc} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
  return blocks, proc.stdout


def test_block_parser_finds_only_python_fences(tmp_path):
  md = tmp_path / "x.md"
  md.write_text("text\n```bash\nls\n```\n```python\na = 1\n```\n\n```python\nb = a\n```\n")
  assert python_blocks(md) == ["a = 1\n", "b = a\n"]


def test_readme_python_blocks_run(tmp_path):
  # With XLA's default compiler settings (passes and CPU emitters), as users run.
  blocks, _ = _run_blocks("README.md", tmp_path, timeout=300)
  assert any("q.propagate(" in b for b in blocks)


@pytest.mark.slow
def test_notebook_runs(tmp_path):
  # The README's blocks run as a user runs them; the notebook, whose time goes to
  # many small compiles, with XLA's heavy passes off (47 s -> 33 s on one core).
  blocks, out = _run_blocks("docs/NOTEBOOK.md", tmp_path, timeout=600, fast_compiles=True)
  assert len(blocks) >= 8
  assert "kalman_bucy" in "".join(blocks)
  assert "continuous" in out or "discrete" in out  # reached the last block
