"""Parameter bookkeeping: counts, the paper's Table 2, progressive-init mapping, decay mask.

Naming convention (stable across stages; paths join keys with "/"; every
``layers/...`` leaf has a leading layer axis L from ``nn.scan``):

=========================  ===============================================
``embed/embedding``        token embedding E (V, d), tied output head
``pos_embed/embedding``    learned positions P (T_max, d)
``layers/norm1``           the pre-mixing norm (the only norm of III/IV)
``layers/norm2``           the pre-FFN norm (I, II, baseline, GLA)
``layers/ffn/{wi,wo}``     the FFN
``layers/koopman/K``       Koopman matrix (II, III), orientation h += K u
``layers/koopman/S``       Stage IV free matrix, K = expm(S - S^T)
``layers/koopman/b``       Koopman bias b
``layers/attn/...``        attention projections (III/IV: query/key/value)
``layers/alpha``           measurement strength alpha_l (III/IV)
``final_norm``             the norm before the head
=========================  ===============================================

Progressive init (QSF D12; §3.3, §3.4, §3.5): II <- I copies the embeddings,
positions, both norms, the FFN and the final norm, and an untied output head
(``lm_head``, ``tie_embeddings=False``) where both models have one (K, b are new); III <- II
copies the embeddings, positions, ``norm1``, K, b and the final norm (the
attention and alpha are new; II's ``norm2``/``ffn`` are dropped unless
``stage3_keep_ffn``); IV <- II is the same without K (S is new, so K ~ I).
"""

from __future__ import annotations

import math
import numbers

import jax
import numpy as np

from qsf_jax.models.config import STAGES

# QSF Table 2 (verbatim): parameters, validation loss (nats), perplexity.
PAPER_TABLE2 = {
    "transformer": {"params": 36_300_000, "val_loss": 2.73, "ppl": 15.3},
    "fnet": {"params": 42_500_000, "val_loss": 3.68, "ppl": 39.6},
    "koopman": {"params": 36_000_000, "val_loss": 2.73, "ppl": 15.3},
    "koopman_attn": {"params": 29_400_000, "val_loss": 2.08, "ppl": 8.0},
    "hamiltonian_attn": {"params": 29_400_000, "val_loss": 3.76, "ppl": 43.0},
}

# lm_head exists only with an untied head (tie_embeddings=False); it is copied
# where both stages have one, like the embedding it would otherwise share.
_COMMON = ("embed", "pos_embed", "final_norm", "lm_head")
_SHARED = {
    ("fnet", "koopman"): _COMMON + ("layers/norm1", "layers/norm2", "layers/ffn"),
    ("koopman", "koopman_attn"): _COMMON + ("layers/norm1", "layers/koopman/K",
                                            "layers/koopman/b", "layers/norm2",
                                            "layers/ffn"),
    ("koopman", "hamiltonian_attn"): _COMMON + ("layers/norm1", "layers/koopman/b",
                                                "layers/norm2", "layers/ffn"),
}

# Leaf names that receive weight decay (QSF D11: E, K, S, W_*, FFN matrices).
_DECAYED = ("kernel", "embedding", "K", "S", "lm_head", "W_re", "W_im")


def count_params(params) -> int:
  """Total number of scalars in a parameter pytree (arrays or ShapeDtypeStructs).

  Raises:
    ValueError: for a leaf that is not an array, a ShapeDtypeStruct or a number.
  """
  total = 0
  for path, x in jax.tree_util.tree_flatten_with_path(params)[0]:
    shape = getattr(x, "shape", None)
    if shape is None:
      if isinstance(x, bool) or not isinstance(x, numbers.Number):
        raise ValueError(f"count_params takes a pytree of arrays; the leaf at "
                         f"{jax.tree_util.keystr(path) or '(root)'} is {type(x).__name__}")
      shape = ()
    total += math.prod(shape)
  return int(total)


def paper_param_counts() -> dict[str, int]:
  """The paper's Table 2 parameter counts by stage (QSF §4.2; rounded to 0.1M)."""
  return {stage: row["params"] for stage, row in PAPER_TABLE2.items()}


def flatten(params) -> dict[str, object]:
  """{"a/b/c": leaf} for a nested-dict pytree."""
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  return {"/".join(str(getattr(k, "key", k)) for k in path): leaf for path, leaf in flat}


def unflatten(flat: dict[str, object]) -> dict:
  """Inverse of :func:`flatten`."""
  out: dict = {}
  for path, leaf in flat.items():
    node = out
    keys = path.split("/")
    for k in keys[:-1]:
      node = node.setdefault(k, {})
    node[keys[-1]] = leaf
  return out


def shared_param_paths(src_stage: str, dst_stage: str) -> tuple[str, ...]:
  """Path prefixes copied from a ``src_stage`` checkpoint into ``dst_stage`` (QSF D12).

  Supported: the spec's hand-offs II <- I, III <- II, IV <- II, and any stage
  from itself (every parameter).

  Args:
    src_stage: the stage of the checkpoint.
    dst_stage: the stage being initialised.

  Returns:
    Path prefixes (e.g. ``"layers/koopman/K"``); a leaf is shared when its path
    starts with one of them and it exists in both trees.

  Raises:
    ValueError: for an unknown stage or an unsupported pair (lists the pairs).
  """
  for name, s in (("src_stage", src_stage), ("dst_stage", dst_stage)):
    if s not in STAGES:
      raise ValueError(f"{name} must be one of {list(STAGES)}, got {s!r}")
  if src_stage == dst_stage:
    return ("",)
  if (src_stage, dst_stage) not in _SHARED:
    pairs = [f"{a} -> {b}" for a, b in _SHARED] + ["any stage -> itself"]
    raise ValueError(f"no progressive-init mapping {src_stage} -> {dst_stage}; "
                     f"supported: {pairs}")
  return _SHARED[(src_stage, dst_stage)]


def transfer_params(src_params, dst_params, src_stage: str, dst_stage: str):
  """Copies the shared parameters of a ``src_stage`` model into fresh ``dst_params``.

  Args:
    src_params: trained parameters of the source stage (nested dicts).
    dst_params: freshly initialised parameters of the destination stage.
    src_stage: source stage.
    dst_stage: destination stage.

  Returns:
    (params, report): the merged parameters and a dict of sorted path lists
    ``copied``, ``new`` (kept from ``dst_params``) and ``dropped`` (source
    leaves not used).

  Raises:
    ValueError: if a shared leaf has different shapes in the two trees (e.g. a
      different d_model or depth), naming the path and both shapes; if either
      tree is a whole variables dict (``{"params": ...}``) rather than its
      ``"params"`` collection; or if no leaf is shared at all.
  """
  prefixes = shared_param_paths(src_stage, dst_stage)
  for name, tree in (("src_params", src_params), ("dst_params", dst_params)):
    if isinstance(tree, dict) and "params" in tree:
      raise ValueError(f"{name} looks like a whole variables dict (it has a 'params' key); "
                       f"pass its 'params' collection, e.g. variables['params']")
  src, dst = flatten(src_params), flatten(dst_params)
  is_shared = lambda p: any(p == q or p.startswith(q + "/") or q == "" for q in prefixes)
  copied = sorted(p for p in dst if p in src and is_shared(p))
  if not copied:
    raise ValueError(
        f"no parameter of the {dst_stage} model is shared with the {src_stage} tree "
        f"(source paths {sorted(src)[:4]}..., destination paths {sorted(dst)[:4]}...): "
        f"are these parameter trees of those stages?")
  for p in copied:
    if np.shape(src[p]) != np.shape(dst[p]):
      raise ValueError(f"parameter {p!r} has shape {np.shape(src[p])} in the {src_stage} "
                       f"checkpoint but {np.shape(dst[p])} in the {dst_stage} model")
  merged = dict(dst)
  merged.update({p: src[p] for p in copied})
  report = {"copied": copied,
            "new": sorted(p for p in dst if p not in copied),
            "dropped": sorted(p for p in src if p not in copied)}
  return unflatten(merged), report


def weight_decay_mask(params):
  """True for the leaves that get weight decay (QSF D11), as a matching pytree.

  Decayed: matrices E, P (``embedding``), K, S, every Dense ``kernel``,
  ``lm_head`` and the wave readout W. Not decayed: biases, norm parameters,
  alpha, the wave generators (H0, G), psi_0 and the readout scale. Decided by
  name, not by rank, because scanned layers add a leading axis to every leaf.
  """
  flat = flatten(params)
  mask = {p: p.rsplit("/", 1)[-1] in _DECAYED for p in flat}
  return unflatten(mask)
