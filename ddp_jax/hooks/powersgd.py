"""PowerSGD (Vogels et al. 2019) with PyTorch's semantics: ``powersgd`` and
``batched_powersgd``.

All state lives in the hook state (per replica): the iteration, the error-feedback
residual, the warm-started Q matrices, a PRNG key, and quality metrics.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from ddp_jax import _pack
from ddp_jax._validate import check_int
from ddp_jax.hooks import _feedback
from ddp_jax.hooks._collectives import as_varying, divide
from ddp_jax.hooks._protocol import CommHook, check_real, configured
from ddp_jax.hooks._wire import WireCost, allreduce_bytes


def should_compress(n: int, m: int, rank: int, min_compression_rate: float):
  """PyTorch's ``_should_compress``: ``(worth it, uncompressed size, compressed size)``."""
  uncompressed = n * m
  compressed = (n + m) * rank
  return compressed * min_compression_rate < uncompressed, uncompressed, compressed


def matrix_shape(shape) -> tuple[int, int]:
  """A leaf as a matrix: ``n`` = product of the leading dims, ``m`` = the last dim.

  For a flax kernel ``(in, out)`` (or a conv ``(kh, kw, in, out)``) this is the
  transpose of torch's ``weight.view(shape[0], -1)`` on the matching torch weight,
  so every decision that is symmetric in ``n`` and ``m`` (all of PowerSGD's) agrees.
  """
  if len(shape) == 0:
    return 1, 1
  return math.prod(shape[:-1]), shape[-1]


def orthogonalize(matrices, epsilon: float = 0.0):
  """Orthonormal columns for a batch ``(b, n, r)``: Gram-Schmidt for ``r <= 2``, QR
  otherwise (as PyTorch). 16-bit inputs are orthogonalized in float32 and cast back
  (PyTorch runs Gram-Schmidt in half precision, which loses orthogonality quickly
  beyond rank 2).

  Gram-Schmidt projects each column against the earlier ones a second time before
  normalizing it ("twice is enough"). A column that is dependent on the earlier ones
  (what is left after the projections is at most ``4 n`` float32 epsilons of its
  norm: the worst-case rounding of two length-``n`` projections) or zero is replaced
  by a unit vector orthogonal to them, as QR does. Its residual would otherwise be
  rounding noise, possibly parallel to an earlier column, and normalizing it would
  count that direction twice in ``P Q^T`` (a rank-deficient gradient, e.g. a small
  batch's, came back doubled); a zero column kept zero would never recover under warm
  start. So the result is always an orthonormal basis and ``P P^T M`` a projection.

  Examples:
    >>> import jax.numpy as jnp
    >>> q = orthogonalize(jnp.ones((1, 4, 2)))   # rank 1: the second column completes
    >>> bool(jnp.allclose(q[0].T @ q[0], jnp.eye(2), atol=1e-6))
    True
  """
  if jnp.finfo(matrices.dtype).bits <= 16:
    return orthogonalize(matrices.astype(jnp.float32), epsilon).astype(matrices.dtype)
  # The basis (Gram-Schmidt's, or QR's Q) does not change when a column is scaled by a
  # positive number: bring every column to entries of at most 1 first, so no squared
  # norm underflows (gradients of 1e-35) or overflows (1e36).
  peak = jnp.max(jnp.abs(matrices), axis=1, keepdims=True)
  matrices = matrices / jnp.where(peak > 0, peak, 1)
  rank = matrices.shape[2]
  if rank > 2:
    if matrices.shape[0] == 1:
      return jnp.linalg.qr(matrices)[0]
    # One QR at a time: a batched LAPACK QR on a multi-device CPU mesh can wait forever
    # for a thread pool that every other device's all-reduce holds.
    return lax.map(lambda m: jnp.linalg.qr(m)[0], matrices)
  n = matrices.shape[1]
  tol = 4 * n * float(jnp.finfo(matrices.dtype).eps)

  def project_out(col, basis):
    for q in basis:
      col = col - jnp.sum(q * col, axis=1, keepdims=True) * q
    return col

  def normalize(col):
    norm = jnp.linalg.norm(col, axis=1, keepdims=True)
    return col / (norm + epsilon if epsilon else jnp.where(norm > 0, norm, 1))

  basis = []
  for i in range(rank):
    col = matrices[:, :, i]
    size = jnp.linalg.norm(col, axis=1, keepdims=True)
    col = project_out(project_out(col, basis), basis)
    dependent = jnp.linalg.norm(col, axis=1, keepdims=True) <= tol * size
    # The completion: the unit vector e_j where the earlier columns are smallest (its
    # part outside their span has norm >= sqrt(1 - i / n) > 0), projected out twice.
    weight = sum((jnp.abs(q) for q in basis), jnp.zeros_like(col))
    unit = jax.nn.one_hot(jnp.argmin(weight, axis=1), n, dtype=col.dtype)
    unit = normalize(project_out(project_out(unit, basis), basis))
    basis.append(jnp.where(dependent, unit, normalize(col)))
  return jnp.stack(basis, axis=2)


def _check(rank, start_iter, min_compression_rate, orthogonalization_epsilon, name):
  check_int(rank, 1, f"{name}: rank")
  check_int(start_iter, 0, f"{name}: start_iter")
  if not (isinstance(min_compression_rate, (int, float)) and min_compression_rate >= 0):
    raise ValueError(f"{name}: min_compression_rate must be >= 0, got {min_compression_rate!r}.")
  if not (isinstance(orthogonalization_epsilon, (int, float)) and orthogonalization_epsilon >= 0):
    raise ValueError(f"{name}: orthogonalization_epsilon must be >= 0, got "
                     f"{orthogonalization_epsilon!r}.")


class _Layout:
  """Static: which leaves of a bucket are compressed, grouped into batches of one shape."""

  def __init__(self, spec, rank, min_compression_rate, batch_same_shape):
    self.compressed, self.uncompressed = [], []
    groups = defaultdict(list)
    for i, shape in enumerate(spec.shapes):
      n, m = matrix_shape(shape)
      r = min(n, m, rank)
      if should_compress(n, m, r, min_compression_rate)[0]:
        self.compressed.append(i)
        groups[(n, m, r)].append(i)
      else:
        self.uncompressed.append(i)
    # Each group: (leaf positions, n, m, r); batched by shape or one leaf at a time.
    self.groups = []
    for (n, m, r), members in groups.items():
      chunks = [members] if batch_same_shape else [[i] for i in members]
      self.groups.extend((tuple(c), n, m, r) for c in chunks)
    self.p_size = sum(len(g) * n * r for g, n, m, r in self.groups)
    self.q_size = sum(len(g) * m * r for g, n, m, r in self.groups)
    self.uncompressed_size = sum(spec.lengths[i] for i in self.uncompressed)


def _draw(key, layout, dtype) -> list:
  """Fresh Q for every group from one normal draw over all compressed leaves, each leaf
  its own slice in leaf order (batching by shape does not change Q). One draw, not one
  per leaf: each threefry draw is a large kernel, and 54 of them (ResNet-50) cost 15 s
  of XLA compile."""
  sizes = {i: m * r for g, n, m, r in layout.groups for i in g}
  order = sorted(sizes)
  offsets = dict(zip(order, np.cumsum([0] + [sizes[i] for i in order])[:-1].tolist()))
  flat = jax.random.normal(key, (sum(sizes.values()),), dtype)
  return [jnp.stack([lax.dynamic_slice_in_dim(flat, offsets[i], m * r).reshape(m, r)
                     for i in g]) for g, n, m, r in layout.groups]


class PowerSGDState(NamedTuple):
  """:func:`powersgd`'s state for one bucket, per replica: the update count, the
  warm-started Q matrices (one per group of same-shape compressed leaves), the PRNG key
  data for fresh Qs, and error feedback's residual and quality (as
  :class:`~ddp_jax.hooks.FeedbackState`)."""

  iter: Any
  qs: tuple
  key: Any
  residual: Any
  rel_error: Any
  residual_norm: Any


class BatchedPowerSGDState(NamedTuple):
  """:func:`batched_powersgd`'s state: as :class:`PowerSGDState` with one Q for the
  whole bucket viewed as a square matrix."""

  iter: Any
  q: Any
  key: Any
  residual: Any
  rel_error: Any
  residual_norm: Any


def _varying_state(result, ctx):
  reduced, state = result
  return reduced, as_varying(state, ctx.axis_name)


def _allreduce_mean(x, ctx):
  return divide(lax.psum(x, ctx.axis_name), ctx.divisor)


@configured
def powersgd(rank: int = 1, start_iter: int = 1000, min_compression_rate: float = 2,
             use_error_feedback: bool = True, warm_start: bool = True,
             orthogonalization_epsilon: float = 0.0, seed: int = 0,
             batch_tensors_with_same_shape: bool = False) -> CommHook:
  """PyTorch's ``powerSGD_hook``: layer-wise rank-``rank`` compression.

  Until ``start_iter`` a plain all-reduce. Then each leaf viewed as an ``n x m`` matrix
  (see :func:`matrix_shape`) is compressed when ``(n + m) * r * min_compression_rate <
  n * m`` (``r = min(n, m, rank)``); the others are all-reduced uncompressed in one
  collective. Compressed leaves: ``P = M Q`` (all-reduced, summed, orthogonalized),
  ``Q = M^T P`` (all-reduced, averaged), ``M ~ P Q^T``; Ps and Qs travel as packed
  buffers. With error feedback the bucket is corrected by the residual first and the
  residual becomes ``corrected - result``; with warm start Q is kept across steps.

  State (per replica, checkpointable): ``iter``, ``residual``, ``qs``, ``key``, and the
  quality metrics ``rel_error`` (``|residual| / |corrected|`` of the last step) and
  ``residual_norm``.

  Examples:
    >>> import jax, jax.numpy as jnp, ddp_jax
    >>> hook = powersgd(rank=2, start_iter=0)
    >>> tx = ddp_jax.sync_gradients("i", hook=hook)
    >>> g = {"w": jnp.ones((4, 32, 16))}
    >>> out = jax.vmap(lambda g: tx.update(g, tx.init(g))[0], axis_name="i")(g)
    >>> bool(jnp.allclose(out["w"], 1.0, atol=1e-5))
    True
  """
  _check(rank, start_iter, min_compression_rate, orthogonalization_epsilon, "powersgd")

  def init_fn(spec):
    layout = _Layout(spec, rank, min_compression_rate, batch_tensors_with_same_shape)
    qs = tuple(jnp.zeros((len(g), m, r), spec.dtype) for g, n, m, r in layout.groups)
    return PowerSGDState(jnp.zeros((), jnp.int32), qs, jax.random.key_data(jax.random.key(seed)),
                         *_feedback.residual_state(spec))

  def compressed_step(bucket, state, ctx):
    layout = _Layout(bucket.spec, rank, min_compression_rate, batch_tensors_with_same_shape)
    corrected = _feedback.correct(bucket, state, ctx, use_error_feedback)
    leaves = list(bucket.from_flat(corrected))
    out = [None] * len(leaves)
    if layout.uncompressed:
      flat = _pack.ravel([leaves[i] for i in layout.uncompressed])
      mean = _allreduce_mean(flat, ctx)
      parts = _pack.split_shapes(mean, [bucket.shapes[i] for i in layout.uncompressed])
      for i, part in zip(layout.uncompressed, parts):
        out[i] = part
    if layout.groups:
      dtype = bucket.dtype
      mats = [jnp.stack([leaves[i].reshape(n, m) for i in g]) for g, n, m, r in layout.groups]
      # 16-bit buckets: P, Q and the products are computed in f32 on the bucket divided by
      # a shared maximum (one scalar pmax), and P and Q travel scaled by static factors to
      # entries of at most 1, so nothing overflows f16 (gradients of 3e4 did: P = M Q).
      # Orthogonalization ignores P's scale; Q's scale is undone on the result.
      half = jnp.finfo(dtype).bits <= 16
      shared = 1.0
      if half:
        amax = lax.pmax(jnp.max(jnp.abs(corrected.astype(jnp.float32))), ctx.axis_name)
        shared = jnp.where(jnp.logical_and(jnp.isfinite(amax), amax > 0), amax, 1.0)
        mats = [mat.astype(jnp.float32) / shared for mat in mats]
      work = jnp.float32 if half else dtype
      fresh = jnp.logical_or(not warm_start, state.iter == start_iter)
      key = jax.random.fold_in(jax.random.wrap_key_data(state.key), state.iter)
      drawn = _draw(key, layout, state.qs[0].dtype)
      qs = [orthogonalize(jnp.where(fresh, d, q), orthogonalization_epsilon).astype(work)
            for d, q in zip(drawn, state.qs)]
      ps = [jnp.einsum("bnm,bmr->bnr", mat, q) for mat, q in zip(mats, qs)]
      if half:  # |M q| <= sqrt(m) per replica, N replicas
        ps = [p / (ctx.axis_size * math.sqrt(g[2])) for p, g in zip(ps, layout.groups)]
      p_all = lax.psum(_pack.ravel(ps).astype(dtype), ctx.axis_name)  # summed: orthogonalized
      ps = [orthogonalize(p, orthogonalization_epsilon).astype(work)
            for p in _pack.split_shapes(p_all, [p.shape for p in ps])]
      qs = [jnp.einsum("bnm,bnr->bmr", mat, p) for mat, p in zip(mats, ps)]
      if half:  # |M^T p| <= sqrt(n)
        qs = [q / math.sqrt(g[1]) for q, g in zip(qs, layout.groups)]
      q_all = _allreduce_mean(_pack.ravel(qs).astype(dtype), ctx)
      qs = _pack.split_shapes(q_all, [q.shape for q in qs])
      for (g, n, *_), p, q in zip(layout.groups, ps, qs):
        approx = jnp.einsum("bnr,bmr->bnm", p, q.astype(work))
        if half:
          approx = (approx * (shared * math.sqrt(n))).astype(dtype)
        for j, i in enumerate(g):
          out[i] = approx[j].reshape(bucket.shapes[i])
      new_qs = tuple(qs)
    else:
      new_qs = state.qs
    result = _pack.ravel(out)
    return result, state._replace(iter=state.iter + 1, qs=new_qs, **_feedback.next_residual(
        corrected, corrected - result, state, ctx, use_error_feedback))

  def vanilla_step(bucket, state, ctx):
    return _allreduce_mean(bucket.buffer(), ctx), state._replace(iter=state.iter + 1)

  def update_fn(bucket, state, ctx):
    check_real(bucket, "powersgd")
    if start_iter == 0:
      return compressed_step(bucket, state, ctx)
    bucket.buffer()  # ravel once, outside the branches (the buffer is cached)
    return lax.cond(state.iter < start_iter,
                    lambda s: _varying_state(vanilla_step(bucket, s, ctx), ctx),
                    lambda s: _varying_state(compressed_step(bucket, s, ctx), ctx), state)

  def wire_fn(spec, world):
    layout = _Layout(spec, rank, min_compression_rate, batch_tensors_with_same_shape)
    item = spec.dtype.itemsize
    parts = [x for x in (layout.uncompressed_size, layout.p_size, layout.q_size) if x]
    return WireCost(sum(allreduce_bytes(x * item, world) for x in parts), len(parts))

  return CommHook(init_fn, update_fn, wire_fn)


@configured
def batched_powersgd(rank: int = 1, start_iter: int = 1000, use_error_feedback: bool = True,
                     warm_start: bool = True, orthogonalization_epsilon: float = 0.0,
                     seed: int = 0) -> CommHook:
  """PyTorch's ``batched_powerSGD_hook``: the whole bucket, zero-padded, viewed as one
  square ``side x side`` matrix (``side = ceil(sqrt(size))``) and compressed at once."""
  _check(rank, start_iter, 0, orthogonalization_epsilon, "batched_powersgd")

  def side_of(size):
    return math.ceil(math.sqrt(size))

  def init_fn(spec):
    side = side_of(spec.size)
    r = min(side, rank)
    return BatchedPowerSGDState(jnp.zeros((), jnp.int32), jnp.zeros((1, side, r), spec.dtype),
                                jax.random.key_data(jax.random.key(seed)),
                                *_feedback.residual_state(spec))

  def compressed_step(bucket, state, ctx):
    side = side_of(bucket.size)
    corrected = _feedback.correct(bucket, state, ctx, use_error_feedback)
    mat = jnp.pad(corrected, (0, side * side - bucket.size)).reshape(1, side, side)
    fresh = jnp.logical_or(not warm_start, state.iter == start_iter)
    key = jax.random.fold_in(jax.random.wrap_key_data(state.key), state.iter)
    q = state.q
    q = orthogonalize(jnp.where(fresh, jax.random.normal(key, q.shape, q.dtype), q),
                      orthogonalization_epsilon)
    p = orthogonalize(lax.psum(jnp.einsum("bnm,bmr->bnr", mat, q), ctx.axis_name),
                      orthogonalization_epsilon)
    q = _allreduce_mean(jnp.einsum("bnm,bnr->bmr", mat, p), ctx)
    result = jnp.einsum("bnr,bmr->bnm", p, q).reshape(-1)[: bucket.size]
    return result, state._replace(iter=state.iter + 1, q=q, **_feedback.next_residual(
        corrected, corrected - result, state, ctx, use_error_feedback))

  def update_fn(bucket, state, ctx):
    check_real(bucket, "batched_powersgd")
    if start_iter == 0:
      return compressed_step(bucket, state, ctx)
    bucket.buffer()  # ravel once, outside the branches (the buffer is cached)
    return lax.cond(
        state.iter < start_iter,
        lambda s: _varying_state((_allreduce_mean(bucket.buffer(), ctx),
                                  s._replace(iter=s.iter + 1)), ctx),
        lambda s: _varying_state(compressed_step(bucket, s, ctx), ctx), state)

  def wire_fn(spec, world):
    side = side_of(spec.size)
    r = min(side, rank)
    return WireCost(2 * allreduce_bytes(side * r * spec.dtype.itemsize, world), 2)

  return CommHook(init_fn, update_fn, wire_fn)
