"""Test configuration: CPU only, offline hubs, no silent rank promotion."""

import functools
import gc
import json
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


def _fast_cpu_codegen_flag() -> str:
  """XLA's older CPU emitters compile the suite's small programs 2-3x faster than its
  default fusion emitters (jaxlib 0.10.2; neither uses fast-math), and the tests spend
  most of their time compiling. A jaxlib that does not know the flag aborts the
  process on it, so it is tried once in a subprocess; the test processes and the
  processes they start inherit it through XLA_FLAGS. QSF_TEST_FAST_CODEGEN=0 keeps
  XLA's default."""
  flag = "--xla_cpu_use_fusion_emitters=false"
  if (os.environ.get("QSF_TEST_FAST_CODEGEN", "1") == "0"
      or "xla_cpu_use_fusion_emitters" in os.environ.get("XLA_FLAGS", "")):
    return ""
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  env = dict(os.environ, XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} {flag}".strip(),
             JAX_PLATFORMS="cpu")
  try:
    probe = subprocess.run(
        [sys.executable, "-c", "import jax; jax.numpy.zeros(1).block_until_ready()"],
        env=env, capture_output=True, timeout=120, check=False)
  except subprocess.TimeoutExpired:
    return ""
  return flag if probe.returncode == 0 else ""


_codegen = _fast_cpu_codegen_flag()
if _codegen:
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_codegen}".strip()
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pathlib
import shutil
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest

jax.config.update("jax_numpy_rank_promotion", "raise")

# Python's cyclic garbage collector, tuned for a test process that accumulates a
# large heap of traced and compiled programs: with the default thresholds
# (700, 10, 10) each full collection walks that whole heap, and over a whole run
# (2 workers, 2-core CPU, 2026-12-08) the collector took 21 s and 30 s of the two
# workers' time, 16 s and 24 s of it in 32 and 49 full collections. Young
# collections still run, every 10,000 net allocations, and free the cycles each
# test makes; full collections wait for 1,000 middle ones. Processes the tests
# start keep Python's defaults. QSF_TEST_GC_DEFAULTS=1 keeps them here too.
if os.environ.get("QSF_TEST_GC_DEFAULTS", "0") != "1":
  gc.set_threshold(10_000, 50, 1_000)

# A persistent compilation cache for each process that runs tests, inherited by the
# processes its tests start (the entry points, the documents' blocks): many tests
# compile the same small models, and a second compile of an identical program (same
# HLO, same options) loads the first one's executable. The cache starts empty, so
# every program is still compiled once per process, and it is removed when the run
# ends. One folder per xdist worker: JAX writes entries without a lock unless a size
# limit is set, and a size limit makes every write rescan the folder.
# QSF_TEST_COMPILE_CACHE=0, or a JAX_COMPILATION_CACHE_DIR of your own, opts out.
_COMPILE_CACHE = None


def pytest_configure(config):
  global _COMPILE_CACHE
  if getattr(config.option, "dist", "no") == "loadscope":
    # xdist would queue the modules by their number of tests, largest first, which
    # left the few-test, many-second modules (subprocess runs, the documents) to the
    # end of the run and one worker idle while the other finished them; the
    # workers' collection order (``pytest_collection_modifyitems``) is kept instead.
    config.option.loadscopereorder = False
  runs_tests = hasattr(config, "workerinput") or not getattr(config.option, "numprocesses",
                                                             None)
  if (not runs_tests or os.environ.get("QSF_TEST_COMPILE_CACHE", "1") == "0"
      or os.environ.get("JAX_COMPILATION_CACHE_DIR")):
    return
  _COMPILE_CACHE = pathlib.Path(tempfile.mkdtemp(prefix="qsf_jax_test_compile_cache_"))
  settings = {"jax_compilation_cache_dir": str(_COMPILE_CACHE),
              "jax_persistent_cache_min_compile_time_secs": 0,
              "jax_persistent_cache_min_entry_size_bytes": 0}
  for name, value in settings.items():
    jax.config.update(name, value)
    os.environ[name.upper()] = str(value)


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session):
  """On an xdist worker, freezes the objects the session made before it reports back.

  pytest runs full garbage collections after that report (its unraisable-exception
  plugin, in unconfigure and cleanup), and over a worker's heap of traced and
  compiled programs each took up to 2 s; execnet interrupts a worker that is still
  busy 5 s after the run ends, which showed as a KeyboardInterrupt inside JAX's gc
  callback after the last test. Frozen objects are left to the process's exit.
  """
  if hasattr(session.config, "workerinput"):
    gc.freeze()


# Each test module's time (setup, call and teardown summed over its tests), measured
# with --durations=0 (2 workers, 2-core CPU, 2026-12-08). It only orders the modules;
# stale or missing entries cost balance, not correctness.
_MODULE_TIMES = pathlib.Path(__file__).with_name("module_times.json")


def module_order(module_names, times) -> list[str]:
  """The modules longest first (``times[name]`` seconds; a module without a time
  counts as the median), ties by name: the longest-processing-time-first order,
  which keeps two workers that each take the next module from finishing far apart."""
  known = sorted(times.values())
  default = known[len(known) // 2] if known else 0.0
  return sorted(set(module_names), key=lambda m: (-times.get(m, default), m))


def pytest_collection_modifyitems(config, items):
  """On an xdist worker (whose ``dist`` option reads "no"), orders the tests module by
  module, longest module first (``module_order``); tests keep their order within a
  module. Plain runs keep pytest's order."""
  if not hasattr(config, "workerinput"):
    return
  times = json.loads(_MODULE_TIMES.read_text(encoding="utf-8"))
  stem = lambda item: pathlib.Path(str(item.path)).stem
  rank = {m: i for i, m in enumerate(module_order([stem(i) for i in items], times))}
  items.sort(key=lambda item: rank[stem(item)])  # stable: order within a module kept


def pytest_unconfigure(config):
  if _COMPILE_CACHE is not None:
    shutil.rmtree(_COMPILE_CACHE, ignore_errors=True)


REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


@functools.cache
def _init_variables_jit():
  from qsf_jax.training.state import init_variables  # pylint: disable=g-import-not-at-top
  return jax.jit(init_variables, static_argnums=(0, 1, 2))


def init_compiled(model, seed, seq_len):
  """``init_variables`` compiled whole, as the training loop initialises (called
  eagerly, flax compiles every primitive on its own)."""
  return _init_variables_jit()(model, seed, seq_len)


def perturbed(tree, seed, scale):
  """``tree`` + scale * N(0, 1) draws, leaf by leaf, in each leaf's dtype.

  Drawn on the host with NumPy: ``jax.random`` would compile its sampler once per
  leaf shape, which costs more than the tests that use it.
  """
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda p: jnp.asarray(np.asarray(p) + scale * rng.standard_normal(p.shape),
                                            p.dtype), tree)


def count_lowerings(fn):
  """(fn()'s result, the number of programs jax lowered to MLIR while running it).

  A call whose program is already in jax's dispatch cache lowers nothing; one that
  re-traces (a fresh closure under ``lax.scan``, a new jit) lowers again, whether or
  not the persistent compilation cache then spares the XLA compile.
  """
  events = []

  def listener(event, duration, **kw):
    if event == "/jax/core/compile/jaxpr_to_mlir_module_duration":
      events.append(duration)

  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    out = jax.block_until_ready(fn())
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
  return out, len(events)


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


class FakeClock:
  """A ``time`` module stand-in for timing tests: ``perf_counter`` returns ``now``,
  which moves only when a fake timed call advances it."""

  def __init__(self):
    self.now = 0.0

  def perf_counter(self):
    return self.now
