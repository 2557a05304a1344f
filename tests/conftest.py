"""Test configuration: CPU only, offline hubs, no silent rank promotion."""

import os

os.environ["JAX_PLATFORMS"] = "cpu"
# XLA's multithreaded Eigen pool on CPU can wedge: a computation never finishes, the
# main thread waits in block_until_ready and every pool thread sits idle. Seen once in
# this suite (the batched complex64 Cayley gradient, jaxlib 0.10.2, 2 cores) and
# reported elsewhere with the same stacks; single-threaded Eigen avoids it. Subprocess
# tests inherit the flag through the environment.
if "xla_cpu_multi_thread_eigen" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                             + " --xla_cpu_multi_thread_eigen=false").strip()
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pathlib

import jax
import pytest

jax.config.update("jax_numpy_rank_promotion", "raise")

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture
def x64():
  """Runs the test body with 64-bit types enabled (spec: float64 checks)."""
  with jax.enable_x64(True):
    yield


@pytest.fixture(scope="session")
def shared_data_dir():
  """The shared offline data folder (GPT-2 BPE files, TinyStories samples).

  Looked up from $QSF_SHARED_DATA, else ``<repo>/../shared/data``; tests that
  need it are skipped, with the reason, where it is absent.
  """
  p = pathlib.Path(os.environ.get("QSF_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))
  if not (p / "gpt2" / "r50k_base.tiktoken").exists():
    pytest.skip(f"shared data folder not found at {p} (set QSF_SHARED_DATA)")
  return p


@pytest.fixture(scope="module")
def fast_compiles():
  """Small models compile several times faster without XLA's heavy passes.

  Request it per module with ``pytestmark = pytest.mark.usefixtures("fast_compiles")``.
  """
  old = jax.config.read("jax_disable_most_optimizations")
  jax.config.update("jax_disable_most_optimizations", True)
  yield
  jax.config.update("jax_disable_most_optimizations", old)
