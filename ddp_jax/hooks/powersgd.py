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

from ddp_jax import _pack, _phase
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


def orthogonalize(matrices, epsilon: float = 0.0, rows=None):
  """Orthonormal columns for a batch ``(b, n, r)`` by Gram-Schmidt at every rank (PyTorch:
  QR above rank 2), each column projected against the earlier ones twice ("twice is
  enough"): the same basis as QR up to column signs, which PowerSGD's ``P Qᵀ`` does not
  see, and more orthogonal than a float32 Householder QR (P Pᵀ M of a constant 300 x 5
  gradient, 300 random starts: 1.6e-6 against up to 1.3e-5 of its scale). 16-bit inputs are orthogonalized in
  float32 and cast back (PyTorch runs Gram-Schmidt in half precision, which loses
  orthogonality quickly beyond rank 2).

  ``rows`` (static, one per matrix) marks rows past ``rows[i]`` of matrix ``i`` as zero
  padding: they stay zero and are never picked below. Matrices of different heights so
  share one batch, and the columns run in one ``fori_loop``: a constant number of
  compiled kernels for any number of matrices and any rank (one QR per matrix was a
  fifth of PowerSGD's XLA compile time on ResNet-50; a batched LAPACK QR can wait forever
  on a multi-device CPU mesh for a thread pool that every other device's all-reduce holds).

  A column that is dependent on the earlier ones (what is left after the projections is
  at most ``4 n`` float32 epsilons of its norm: the worst-case rounding of two length-``n``
  projections) or zero is replaced by a unit vector orthogonal to them, as QR does. Its
  residual would otherwise be rounding noise, possibly parallel to an earlier column, and
  normalizing it would count that direction twice in ``P Pᵀ M`` (a rank-deficient
  gradient, e.g. a small batch's, came back doubled); a zero column kept zero would never
  recover under warm start. So the result is always an orthonormal basis and ``P Pᵀ M`` a
  projection.

  Examples:
    >>> import jax.numpy as jnp
    >>> q = orthogonalize(jnp.ones((1, 4, 2)))   # rank 1: the second column completes
    >>> bool(jnp.allclose(q[0].T @ q[0], jnp.eye(2), atol=1e-6))
    True
  """
  if jnp.finfo(matrices.dtype).bits <= 16:
    return orthogonalize(matrices.astype(jnp.float32), epsilon, rows).astype(matrices.dtype)
  b, n, rank = matrices.shape
  # The basis does not change when a column is scaled by a positive number: bring every
  # column to entries of at most 1 first, so no squared norm underflows (gradients of
  # 1e-35) or overflows (1e36).
  peak = jnp.max(jnp.abs(matrices), axis=1, keepdims=True)
  matrices = matrices / jnp.where(peak > 0, peak, 1)
  heights = np.full((b, 1), n) if rows is None else np.asarray(rows).reshape(b, 1)
  valid = lax.broadcasted_iota(jnp.int32, (b, n), 1) < jnp.asarray(heights, jnp.int32)
  tol = jnp.asarray(4 * heights * float(jnp.finfo(matrices.dtype).eps), matrices.dtype)

  sizes = jnp.linalg.norm(matrices, axis=1)  # (b, r): every column's norm

  def project_out(cols, basis):  # (b, n, c); the basis's columns not filled yet are zero
    return cols - jnp.einsum("bnr,brc->bnc", basis, jnp.einsum("bnr,bnc->brc", basis, cols))

  def column(k, basis):
    # The candidate and its completion, projected out twice together: the unit vector
    # e_j where the earlier columns are smallest (its part outside their span has norm
    # >= sqrt(1 - k / n) > 0), used where the candidate is dependent.
    weight = jnp.where(valid, jnp.sum(jnp.abs(basis), axis=2), jnp.inf)
    unit = jax.nn.one_hot(jnp.argmin(weight, axis=1), n, dtype=matrices.dtype)
    pair = jnp.stack([lax.dynamic_index_in_dim(matrices, k, axis=2, keepdims=False), unit], 2)
    pair = project_out(project_out(pair, basis), basis)
    norms = jnp.linalg.norm(pair, axis=1)  # (b, 2)
    dependent = norms[:, 0] <= tol[:, 0] * lax.dynamic_index_in_dim(sizes, k, 1, False)
    scale = norms + epsilon if epsilon else jnp.where(norms > 0, norms, 1)
    pair = pair / scale[:, None, :]
    new = jnp.where(dependent[:, None], pair[:, :, 1], pair[:, :, 0])
    return lax.dynamic_update_index_in_dim(basis, new, k, axis=2)

  return lax.fori_loop(0, rank, column, jnp.zeros_like(matrices))


class _Padded:
  """Static: groups of same-height matrices (``units``: ``(count, rows)`` each, all
  ``width`` wide) as a few zero-padded batches for :func:`orthogonalize`. Sorted by
  height, a batch takes the next group while it stays within 2x of its matrices' rows or
  within 2**20 elements."""

  def __init__(self, units, width):
    self.units, self.width = list(units), width
    self.batches = []  # (unit positions, padded height)
    for u in sorted(range(len(self.units)), key=lambda u: -self.units[u][1]):
      count, rows = self.units[u]
      if self.batches:
        members, top = self.batches[-1]
        total = sum(self.units[v][0] for v in members) + count
        actual = sum(c * r for c, r in (self.units[v] for v in members)) + count * rows
        if total * top <= 2 * actual or total * top * width <= 1 << 20:
          members.append(u)
          continue
      self.batches.append(([u], rows))

  def orthogonalize(self, parts, epsilon, key=None):
    """``parts``: one ``(count, rows, width)`` array per group; returns them with every
    matrix orthonormalized. With a PRNG ``key`` the matrices are standard normal draws
    instead, one draw per batch (a draw per matrix compiles into a large kernel each:
    15 s on ResNet-50's 54)."""
    out = [None] * len(parts)
    for b, (members, top) in enumerate(self.batches):
      heights = [rows for u in members for rows in [self.units[u][1]] * self.units[u][0]]
      batch = jnp.concatenate([jnp.pad(parts[u], ((0, 0), (0, top - self.units[u][1]), (0, 0)))
                               for u in members])
      if key is not None:
        valid = lax.broadcasted_iota(jnp.int32, batch.shape, 1) < jnp.asarray(
            np.reshape(heights, (-1, 1, 1)), jnp.int32)
        drawn = jax.random.normal(jax.random.fold_in(key, b), batch.shape, batch.dtype)
        batch = jnp.where(valid, drawn, 0)
      done = orthogonalize(batch, epsilon, heights)
      start = 0
      for u in members:
        count, rows = self.units[u]
        out[u] = done[start:start + count, :rows]
        start += count
    return out


def _check(rank, start_iter, min_compression_rate, orthogonalization_epsilon, name):
  check_int(rank, 1, f"{name}: rank")
  check_int(start_iter, 0, f"{name}: start_iter")
  if not (isinstance(min_compression_rate, (int, float)) and min_compression_rate >= 0):
    raise ValueError(f"{name}: min_compression_rate must be >= 0, got {min_compression_rate!r}.")
  if not (isinstance(orthogonalization_epsilon, (int, float)) and orthogonalization_epsilon >= 0):
    raise ValueError(f"{name}: orthogonalization_epsilon must be >= 0, got "
                     f"{orthogonalization_epsilon!r}.")


class _Layout:
  """Static: which leaves of a bucket are compressed; the units (all compressed leaves of
  one matrix shape, in order of first appearance: their products batched, and their Qs
  consecutive in the state's one Q buffer); the runs of consecutive uncompressed leaves;
  the orthogonalization batches, one set per rank."""

  def __init__(self, spec, rank, min_compression_rate):
    self.compressed, self.uncompressed = [], []
    shapes = defaultdict(list)
    for i, shape in enumerate(spec.shapes):
      n, m = matrix_shape(shape)
      r = min(n, m, rank)
      if should_compress(n, m, r, min_compression_rate)[0]:
        self.compressed.append(i)
        shapes[(n, m, r)].append(i)
      else:
        self.uncompressed.append(i)
    self.units = [(tuple(g), n, m, r) for (n, m, r), g in shapes.items()]
    self.q_shapes = [(len(g), m, r) for g, n, m, r in self.units]
    self.p_size = sum(len(g) * n * r for g, n, m, r in self.units)
    self.q_size = sum(len(g) * m * r for g, n, m, r in self.units)
    self.uncompressed_size = sum(spec.lengths[i] for i in self.uncompressed)
    self.runs = []  # (first, last + 1) leaf positions of consecutive uncompressed leaves
    for i in self.uncompressed:
      if self.runs and self.runs[-1][1] == i:
        self.runs[-1] = (self.runs[-1][0], i + 1)
      else:
        self.runs.append((i, i + 1))
    self.by_rank = []  # (unit positions, P batches, Q batches)
    for r in sorted({r for *_, r in self.units}):
      units = [u for u, (*_, ur) in enumerate(self.units) if ur == r]
      self.by_rank.append((units, _Padded([(len(self.units[u][0]), self.units[u][1])
                                           for u in units], r),
                           _Padded([(len(self.units[u][0]), self.units[u][2])
                                    for u in units], r)))

  def orthogonalize(self, parts, side, epsilon, key=None):
    """Per unit ``(count, rows, r)`` arrays, every matrix orthonormalized (random normal
    ones first with a ``key``); ``side`` 1 for Ps (``n`` rows), 2 for Qs (``m`` rows)."""
    out = [None] * len(parts)
    for b, (units, *padded) in enumerate(self.by_rank):
      done = padded[side - 1].orthogonalize(
          [parts[u] for u in units], epsilon, None if key is None else jax.random.fold_in(key, b))
      for u, x in zip(units, done):
        out[u] = x
    return out


def _first_q(layout, spec, seed):
  """Warm start's first Qs as the state's one buffer: standard normal, drawn on the host
  from ``(seed, bucket index)`` leaf by leaf in leaf order (so the order of the buffer
  does not change them), the same on every replica. Constants of the init program: a
  draw in the step compiled into ~15 kernels per bucket (a second of XLA compile on
  GPT-2's 19 buckets)."""
  rng = np.random.default_rng([seed, spec.index])
  dims = {i: (m, r) for g, n, m, r in layout.units for i in g}
  drawn = {i: rng.standard_normal(dims[i]).astype(np.float32) for i in sorted(dims)}
  flat = [drawn[i].ravel() for g, *_ in layout.units for i in g]
  return jnp.asarray(np.concatenate(flat) if flat else np.zeros(0, np.float32), spec.dtype)


class PowerSGDState(NamedTuple):
  """:func:`powersgd`'s state for one bucket, per replica: the update count, the
  warm-started Q matrices (one flat buffer for the bucket, as PyTorch's ``q_memory_dict``:
  the compressed leaves' ``m x r`` Qs grouped by matrix shape, in order of first
  appearance, leaf order within a shape), the PRNG key data for fresh Qs, and error
  feedback's residual and quality (as :class:`~ddp_jax.hooks.FeedbackState`)."""

  iter: Any
  q: Any
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
  residual becomes ``corrected - result``; with warm start Q is kept across steps,
  starting from the standard normal Qs ``init`` draws from ``seed`` (the same on every
  replica), otherwise drawn afresh each step from ``key``. Same-shape leaves' products
  are always batched and the Qs kept in one buffer per bucket, so
  ``batch_tensors_with_same_shape`` (PyTorch's option) changes nothing.

  State (per replica, checkpointable): ``iter``, ``residual``, ``q``, ``key``, and the
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
    layout = _Layout(spec, rank, min_compression_rate)
    return PowerSGDState(jnp.zeros((), jnp.int32), _first_q(layout, spec, seed),
                         jax.random.key_data(jax.random.key(seed)),
                         *_feedback.residual_state(spec))

  def compressed_step(bucket, state, ctx):
    # Named scopes (in the HLO's op names and profiles) mark each phase:
    # benchmarks/bench_kernels.py counts the compiled kernels per phase.
    layout = _Layout(bucket.spec, rank, min_compression_rate)
    corrected = _feedback.correct(bucket, state, ctx, use_error_feedback)
    offsets = bucket.spec.offsets + (bucket.size,)
    pieces = {}  # leaf position of a run's first leaf or of a compressed leaf -> result
    with jax.named_scope("uncompressed"):
      # Runs of consecutive uncompressed leaves go in one slice each, both ways.
      runs = [lax.slice_in_dim(corrected, offsets[a], offsets[b]) for a, b in layout.runs]
      if runs:
        mean = _allreduce_mean(_pack.ravel(runs), ctx)
        start = 0
        for (first, _), run in zip(layout.runs, runs):
          pieces[first] = lax.slice_in_dim(mean, start, start + run.size)
          start += run.size
    if layout.units:
      dtype = bucket.dtype
      # 16-bit buckets: P, Q and the products are computed in f32 on the bucket divided by
      # a shared maximum (one scalar pmax), and P and Q travel scaled by static factors to
      # entries of at most 1, so nothing overflows f16 (gradients of 3e4 did: P = M Q).
      # Orthogonalization ignores P's scale; Q's scale is undone on the result.
      half = jnp.finfo(dtype).bits <= 16
      work = jnp.float32 if half else dtype
      shared = 1.0
      with jax.named_scope("matrices"):
        mats = [jnp.stack([lax.slice_in_dim(corrected, offsets[i], offsets[i + 1]).reshape(n, m)
                           for i in g]) for g, n, m, r in layout.units]
        if half:
          amax = lax.pmax(jnp.max(jnp.abs(corrected.astype(jnp.float32))), ctx.axis_name)
          shared = jnp.where(jnp.logical_and(jnp.isfinite(amax), amax > 0), amax, 1.0)
          mats = [mat.astype(jnp.float32) / shared for mat in mats]
      with jax.named_scope("orthogonalize_q"):
        # Warm start begins from the Qs drawn at init; without it, fresh ones every step.
        key = None if warm_start else jax.random.fold_in(
            jax.random.wrap_key_data(state.key), state.iter)
        qs = [q.astype(work) for q in layout.orthogonalize(
            _pack.split_shapes(state.q, layout.q_shapes), 2, orthogonalization_epsilon, key)]
      with jax.named_scope("compute_p"):
        ps = [jnp.einsum("bnm,bmr->bnr", mat, q) for mat, q in zip(mats, qs)]
        if half:  # |M q| <= sqrt(m) per replica, N replicas
          ps = [p / (ctx.axis_size * math.sqrt(u[2])) for p, u in zip(ps, layout.units)]
        p_all = lax.psum(_pack.ravel(ps).astype(dtype), ctx.axis_name)  # summed: orthogonalized
        ps = _pack.split_shapes(p_all, [p.shape for p in ps])
      with jax.named_scope("orthogonalize_p"):
        ps = [p.astype(work) for p in layout.orthogonalize(ps, 1, orthogonalization_epsilon)]
      with jax.named_scope("compute_q"):
        qs = [jnp.einsum("bnm,bnr->bmr", mat, p) for mat, p in zip(mats, ps)]
        if half:  # |M^T p| <= sqrt(n)
          qs = [q / math.sqrt(u[1]) for q, u in zip(qs, layout.units)]
        q_all = _allreduce_mean(_pack.ravel(qs).astype(dtype), ctx)
        qs = _pack.split_shapes(q_all, layout.q_shapes)
      with jax.named_scope("approximation"):
        for (g, n, *_), p, q in zip(layout.units, ps, qs):
          approx = jnp.einsum("bnr,bmr->bnm", p, q.astype(work))
          if half:
            approx = (approx * (shared * math.sqrt(n))).astype(dtype)
          for j, i in enumerate(g):
            pieces[i] = approx[j]
        new_q = q_all  # the state keeps Q as it traveled (16-bit: scaled, see above)
    else:
      new_q = state.q
    with jax.named_scope("result"):
      result = _pack.ravel([pieces[i] for i in sorted(pieces)])
      feedback = _feedback.next_residual(corrected, corrected - result, state, ctx,
                                         use_error_feedback)
    return result, state._replace(iter=state.iter + 1, q=new_q, **feedback)

  def vanilla_step(bucket, state, ctx):
    return _allreduce_mean(bucket.buffer(), ctx), state._replace(iter=state.iter + 1)

  def update_fn(bucket, state, ctx):
    check_real(bucket, "powersgd")
    if start_iter == 0:
      return compressed_step(bucket, state, ctx)
    bucket.buffer()  # ravel once, outside the branches (the buffer is cached)
    return _phase.until(state.iter, start_iter,
                        lambda s: _varying_state(vanilla_step(bucket, s, ctx), ctx),
                        lambda s: _varying_state(compressed_step(bucket, s, ctx), ctx), state,
                        ctx.warm_up)

  def wire_fn(spec, world):
    layout = _Layout(spec, rank, min_compression_rate)
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
    return _phase.until(
        state.iter, start_iter,
        lambda s: _varying_state((_allreduce_mean(bucket.buffer(), ctx),
                                  s._replace(iter=s.iter + 1)), ctx),
        lambda s: _varying_state(compressed_step(bucket, s, ctx), ctx), state, ctx.warm_up)

  def wire_fn(spec, world):
    side = side_of(spec.size)
    r = min(side, rank)
    return WireCost(2 * allreduce_bytes(side * r * spec.dtype.itemsize, world), 2)

  return CommHook(init_fn, update_fn, wire_fn)
