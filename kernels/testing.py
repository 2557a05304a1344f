"""Test utilities for the linear-attention op: float64 reference, inputs, error metric.

The float64 NumPy recurrence here is independent of every impl in the package
and is the ground truth of the tests (kernels spec §5.1); the error metric is
FLA's relative RMS error (spec §5.2).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

# Relative-RMS tolerances of kernels spec §5.2 ("suggested bound" column).
TOL = {
    "float32": {"o": 1e-5, "grad": 1e-5, "dg": 1e-4},
    "bfloat16": {"o": 1e-2, "grad": 1e-2, "dg": 2e-2},
}


def rel_rms_error(a, b) -> float:
  """||a - b||_2 / ||b||_2 in float64 (FLA ``get_err_ratio``, spec §5.2)."""
  a, b = _f64(a), _f64(b)
  if a.shape != b.shape:
    raise ValueError(f"shapes differ: {a.shape} vs {b.shape}")
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


def _f64(x) -> np.ndarray:
  """A float64 NumPy copy (bf16 goes through NumPy's ml_dtypes cast, no XLA op)."""
  return np.asarray(x).astype(np.float64)


def numpy_linear_attention(q, k, v, log_decay=None, initial_state=None):
  """Float64 recurrence S_t = exp(g_t) S_{t-1} + k_t v_t^T, o_t = S_t^T q_t.

  Kernels spec §1.1 (scale 1), evaluated step by step in NumPy float64.

  Args:
    q: queries (B, T, H, Dk).
    k: keys (B, T, H, Dk).
    v: values (B, T, H, Dv).
    log_decay: log-decays (B, T, H), or None.
    initial_state: S_0 (B, H, Dk, Dv), or None.

  Returns:
    (o (B, T, H, Dv), S_T (B, H, Dk, Dv)) as float64 NumPy arrays.
  """
  q, k, v = _f64(q), _f64(k), _f64(v)
  B, T, H, Dk = q.shape
  Dv = v.shape[-1]
  g = np.zeros((B, T, H)) if log_decay is None else _f64(log_decay)
  S = np.zeros((B, H, Dk, Dv)) if initial_state is None else _f64(initial_state)
  o = np.empty((B, T, H, Dv))
  for t in range(T):
    S = S * np.exp(g[:, t])[:, :, None, None] + k[:, t, :, :, None] * v[:, t, :, None, :]
    o[:, t] = np.einsum("bhk,bhkv->bhv", q[:, t], S)
  return o, S


def random_inputs(seed, B, T, H, Dk, Dv, *, dtype=jnp.float32, gate="medium",
                  initial_state=True):
  """Random (q, k, v, log_decay, initial_state) for tests and benchmarks.

  Drawn with NumPy (no XLA compilation per shape). Gates follow kernels spec
  §1.4: g = logsigmoid(x) / n with x ~ N(0, 1) and n = 10 ("weak"), 1
  ("medium"), 0.1 ("strong"); "none" gives None (no decay), "zero" g = 0,
  "head" a per-head constant log(1 - 2^(-5-h)) (retention), "extreme"
  g ~ U[-20, 0]. q, k are scaled by Dk^-1/4 so that q . k is O(1).

  Args:
    seed: integer seed.
    B, T, H, Dk, Dv: sizes.
    dtype: dtype of q, k, v (the log-decay and the state are float32).
    gate: one of "none", "zero", "weak", "medium", "strong", "head", "extreme".
    initial_state: whether to draw a random initial state.

  Returns:
    (q, k, v, log_decay or None, initial_state or None) as jnp arrays.
  """
  rng = np.random.default_rng(seed)
  sc = Dk ** -0.25
  np_dtype = jnp.dtype(dtype)
  q = (rng.standard_normal((B, T, H, Dk)) * sc).astype(np_dtype)
  k = (rng.standard_normal((B, T, H, Dk)) * sc).astype(np_dtype)
  v = rng.standard_normal((B, T, H, Dv)).astype(np_dtype)
  x = rng.standard_normal((B, T, H))
  norm = {"weak": 10.0, "medium": 1.0, "strong": 0.1}
  if gate == "none":
    g = None
  elif gate == "zero":
    g = np.zeros((B, T, H))
  elif gate in norm:
    g = -np.logaddexp(0.0, -x) / norm[gate]
  elif gate == "head":
    g = np.broadcast_to(np.log1p(-2.0 ** (-5.0 - np.arange(H)))[None, None, :], (B, T, H))
  elif gate == "extreme":
    g = rng.uniform(-20.0, 0.0, (B, T, H))
  else:
    raise ValueError(f"unknown gate {gate!r}")
  S0 = rng.standard_normal((B, H, Dk, Dv)) * 0.5 if initial_state else None
  as_f32 = lambda a: None if a is None else jnp.asarray(np.asarray(a, np.float32))
  return jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), as_f32(g), as_f32(S0)


def float64_grads(args, do, dS):
  """Float64 autodiff of the quadratic reference (kernels spec §5.1 item 4).

  Args:
    args: (q, k, v, log_decay, initial_state) arrays.
    do: output cotangent (B, T, H, Dv).
    dS: final-state cotangent (B, H, Dk, Dv).

  Returns:
    d/d(q, k, v, log_decay, initial_state) of <o, do> + <S_T, dS>, as float64
    NumPy arrays.
  """
  from .op import linear_attention  # pylint: disable=import-outside-toplevel
  with jax.enable_x64(True):
    a64 = [jnp.asarray(_f64(x)) for x in args]
    def loss(q, k, v, g, S0):
      o, S_T = linear_attention(q, k, v, g, initial_state=S0, return_final_state=True,
                                impl="reference")
      return jnp.sum(o * _f64(do)) + jnp.sum(S_T * _f64(dS))
    return [np.asarray(x) for x in jax.grad(loss, argnums=range(5))(*a64)]


@functools.lru_cache(maxsize=None)
def gradient_case(B, T, H, Dk, Dv, dtype_name, gate, seed):
  """Inputs, random cotangents and float64 reference gradients, cached per case.

  Returns:
    (args, do, dS, ref): args = (q, k, v, log_decay, initial_state) from
    :func:`random_inputs`; do (B, T, H, Dv) and dS (B, H, Dk, Dv) float32
    cotangents; ref the :func:`float64_grads` of args.
  """
  args = random_inputs(seed, B, T, H, Dk, Dv, dtype=jnp.dtype(dtype_name), gate=gate)
  rng = np.random.default_rng(seed + 100)
  do = rng.standard_normal((B, T, H, Dv)).astype(np.float32)
  dS = rng.standard_normal((B, H, Dk, Dv)).astype(np.float32)
  return args, do, dS, float64_grads(args, do, dS)


GRAD_NAMES = ("q", "k", "v", "log_decay", "initial_state")


def assert_grads_match(impl, B, T, H, Dk, Dv, *, dtype=jnp.float32, gate="medium", seed=0,
                       chunk_size=32, **op_kwargs):
  """Asserts every gradient of ``impl`` is within the kernels spec §5.2 tolerance.

  Differentiates <o, do> + <S_T, dS> (random cotangents) with respect to q, k,
  v, log_decay and initial_state and compares with :func:`float64_grads`.

  Args:
    impl: the ``linear_attention`` impl.
    B, T, H, Dk, Dv: sizes.
    dtype: dtype of q, k, v.
    gate: gate family of :func:`random_inputs`.
    seed: integer seed.
    chunk_size: chunk for "xla" and "pallas".
    **op_kwargs: further ``linear_attention`` keywords (e.g. interpret=True).
  """
  from .op import linear_attention  # pylint: disable=import-outside-toplevel
  args, do, dS, ref = gradient_case(B, T, H, Dk, Dv, jnp.dtype(dtype).name, gate, seed)

  def loss(q, k, v, g, S0):
    o, S_T = linear_attention(q, k, v, g, initial_state=S0, return_final_state=True,
                              impl=impl, chunk_size=chunk_size, **op_kwargs)
    return jnp.sum(o.astype(jnp.float32) * do) + jnp.sum(S_T * dS)

  grads = jax.grad(loss, argnums=range(5))(*args)
  tol = TOL[jnp.dtype(dtype).name]
  for name, x, gr, r in zip(GRAD_NAMES, args, grads, ref):
    assert gr.dtype == x.dtype and gr.shape == x.shape, (impl, name, gr.dtype, gr.shape)
    assert np.all(np.isfinite(_f64(gr))), (impl, name)
    err = rel_rms_error(gr, r)
    bound = tol["dg"] if name == "log_decay" else tol["grad"]
    assert err <= bound, f"{impl}: d{name} rel RMS error {err:.2e} > {bound:.0e}"


def _sub_jaxprs(eqn):
  """The jaxprs nested in one equation's parameters (pjit, custom_vjp, scan, ...)."""
  for p in eqn.params.values():
    for sub in p if isinstance(p, (list, tuple)) else [p]:
      inner = getattr(sub, "jaxpr", sub)
      if hasattr(inner, "eqns"):
        yield inner


def pallas_eqns(fun, *args) -> list:
  """Every ``pallas_call`` equation of the traced ``fun(*args)``, nested jaxprs included."""
  found = []

  def walk(jaxpr):
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == "pallas_call":
        found.append(eqn)
        continue
      for inner in _sub_jaxprs(eqn):
        walk(inner)

  walk(jax.make_jaxpr(fun)(*args).jaxpr)
  return found


def pallas_calls(fun, *args) -> list[tuple[str, int, int, set]]:
  """Every ``pallas_call`` in the traced ``fun(*args)``, nested jaxprs included.

  Returns:
    one (kernel name, #inputs, #outputs, primitive names of the kernel body)
    per call, in trace order.
  """
  def prims(jaxpr, acc):
    for eqn in jaxpr.eqns:
      acc.add(eqn.primitive.name)
      for inner in _sub_jaxprs(eqn):
        prims(inner, acc)
    return acc

  return [(e.params["name"], len(e.invars), len(e.outvars), prims(e.params["jaxpr"], set()))
          for e in pallas_eqns(fun, *args)]
