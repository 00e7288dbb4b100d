"""Per-leaf statistics of a raveled bucket in a constant number of ops (no slice per
leaf: XLA:CPU compiles each slice at its own offset into its own kernel)."""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ddp_jax._plan import BucketSpec

# Beyond this many leaf ends in one chunk (thousands of tiny leaves packed among large
# ones), the per-leaf helpers below slice leaf by leaf instead: exact, slower to compile.
_MAX_WIDTH = 16


class _Chunks(NamedTuple):
  """Where the leaves of a raveled bucket start and end, per fixed-size chunk."""
  size: int  # elements per chunk
  first: np.ndarray  # (chunks,) the leaf at each chunk's start
  inner: np.ndarray  # (chunks, width) leaf ends inside each chunk, padded with int32 max


@functools.lru_cache(maxsize=256)
def _chunks(lengths: tuple[int, ...]) -> _Chunks:
  """The chunk size (a power of two, at most 1/64 of the bucket: little padding) with the
  fewest leaf ends inside any one chunk among those whose tables hold at most 2**20
  entries (ties: one that divides the bucket, then the larger); the smallest tables where
  none does."""
  ends = np.cumsum(lengths)[:-1]  # where leaf i + 1 starts
  size = int(sum(lengths))
  options = []
  for k in range(max(1, size // 64).bit_length() - 1, -1, -1):
    chunk = 1 << k
    starts = np.arange(0, size, chunk)
    first = np.searchsorted(ends, starts, side="right")
    last = np.searchsorted(ends, starts + chunk, side="left")
    width = int((last - first).max(initial=0))
    options.append((len(starts) * (width + 1), width, chunk, first, last))
    if width == 0 and size % chunk == 0:
      break
  fits = [o for o in options if o[0] <= 1 << 20]  # then fewest ends, no padding, largest
  best = (min(fits, key=lambda o: (o[1], size % o[2] != 0)) if fits
          else min(options, key=lambda o: o[0]))
  _, width, chunk, first, last = best
  inner = np.full((len(first), width), np.iinfo(np.int32).max, np.int32)
  for j in range(width):  # j-th leaf end inside each chunk
    has = first + j < last
    inner[has, j] = ends[first[has] + j]
  return _Chunks(chunk, first.astype(np.int32), inner)


def _blocked(t: _Chunks, x: jax.Array) -> jax.Array:
  """``x`` (``(size, ...)``) zero-padded and reshaped to ``(chunks, chunk size, ...)``."""
  padded = jnp.pad(x, [(0, len(t.first) * t.size - x.shape[0])] + [(0, 0)] * (x.ndim - 1))
  return padded.reshape(len(t.first), t.size, *x.shape[1:])


def _local_ids(t: _Chunks) -> jax.Array:
  """``(chunks, chunk size)``: each element's leaf minus its chunk's first leaf (broadcast
  compares against each chunk's own leaf ends: no per-element gather)."""
  pos = jax.lax.broadcasted_iota(jnp.int32, (len(t.first), t.size), 0) * t.size
  pos = pos + jax.lax.broadcasted_iota(jnp.int32, (len(t.first), t.size), 1)
  local = jnp.zeros(pos.shape, jnp.int32)
  for j in range(t.inner.shape[1]):
    local = local + (pos >= jnp.asarray(t.inner[:, j:j + 1])).astype(jnp.int32)
  return local


def _leaf_of_slot(t: _Chunks, num_leaves: int) -> np.ndarray:
  """``(chunks, width + 1)``: the leaf of each chunk's j-th slot (clipped past the end)."""
  return np.minimum(t.first[:, None] + np.arange(t.inner.shape[1] + 1), num_leaves - 1)


def segment_ids(spec: BucketSpec) -> jax.Array:
  """The leaf index of every element of the bucket's flat layout (int32, ``spec.size``).

  A constant number of ops for any number of leaves (slicing each leaf out costs XLA:CPU
  one kernel per leaf: seconds of compile time on a few hundred leaves), from two small
  tables over chunks of the buffer: the leaf at each chunk's start, the leaf ends inside it.

  Examples:
    >>> from ddp_jax import plan_buckets
    >>> spec = plan_buckets({"a": jnp.zeros(3), "b": jnp.zeros(2)}).buckets[0]
    >>> spec.lengths, segment_ids(spec).tolist()  # DDP order: the last leaf ("b") first
    ((2, 3), [0, 0, 1, 1, 1])
  """
  t = _chunks(spec.lengths)
  if t.inner.shape[1] > _MAX_WIDTH:
    return jnp.concatenate([jnp.full((n,), i, jnp.int32) for i, n in enumerate(spec.lengths)])
  ids = jnp.asarray(t.first[:, None]) + _local_ids(t)
  return ids.reshape(-1)[:spec.size]


def segment_spread(values: jax.Array, spec: BucketSpec) -> jax.Array:
  """One value per leaf spread over the bucket's flat layout: ``values`` is
  ``(num_leaves,)``, the result ``(spec.size,)``, equal to ``values[segment_ids(spec)]``
  without a per-element gather (each chunk broadcasts its few leaves' values).

  Examples:
    >>> from ddp_jax import plan_buckets
    >>> spec = plan_buckets({"a": jnp.zeros(3), "b": jnp.zeros(2)}).buckets[0]
    >>> segment_spread(jnp.array([1.0, 2.0]), spec).tolist()
    [1.0, 1.0, 2.0, 2.0, 2.0]
  """
  t = _chunks(spec.lengths)
  width = t.inner.shape[1]
  if width > _MAX_WIDTH:
    return values[segment_ids(spec)]
  per_chunk = values[jnp.asarray(_leaf_of_slot(t, len(spec.lengths)))]  # (chunks, width + 1)
  out = jnp.broadcast_to(per_chunk[:, :1], (len(t.first), t.size))
  if width:
    local = _local_ids(t)
    for j in range(1, width + 1):
      out = jnp.where(local == j, per_chunk[:, j:j + 1], out)
  return out.reshape(-1)[:spec.size]


def _apart(parts: jax.Array) -> jax.Array:
  """``parts`` computed before the scatter that adds them per leaf, except on CPU
  (``lax.platform_dependent``: decided for the platform the step is lowered for). XLA:GPU
  otherwise fuses the chunk reductions into the scatter (``input_scatter_fusion``), whose
  threads then add into a dozen leaves with atomics: ``sign_compress`` on GPT-2 small took
  27.3 ms a sync on an H100, 1.7 ms with the parts apart. On CPU the fused form is ~10%
  faster (ResNet-50: 189-193 vs 213-214 ms), so it is kept there."""
  return jax.lax.platform_dependent(parts, cpu=lambda p: p,
                                    default=jax.lax.optimization_barrier)


def _segment_reduce(x: jax.Array, spec: BucketSpec, reduce, segment_reduce) -> jax.Array:
  """Per-leaf reductions of a raveled bucket by dense reductions over chunks (one masked
  reduction per leaf end a chunk can hold) and a scatter of the few per-chunk parts: no
  per-element scatter, no per-leaf slice. The mask fills with 0: right for sums, and for
  maxima of non-negative values."""
  t = _chunks(spec.lengths)
  width = t.inner.shape[1]
  if width > _MAX_WIDTH:
    return jnp.stack([reduce(jax.lax.slice_in_dim(x, o, o + n), axis=0)
                      for o, n in zip(spec.offsets, spec.lengths)])
  blocks = _blocked(t, x)
  if width:
    local = _local_ids(t).reshape(*blocks.shape[:2], *(1,) * (x.ndim - 1))
    parts = jnp.stack([reduce(jnp.where(local == j, blocks, 0), axis=1)
                       for j in range(width + 1)], axis=1)
  else:
    parts = reduce(blocks, axis=1)[:, None]
  leaf = _leaf_of_slot(t, len(spec.lengths)).reshape(-1)
  return segment_reduce(_apart(parts).reshape(-1, *x.shape[1:]), jnp.asarray(leaf),
                        len(spec.lengths), indices_are_sorted=True)


def segment_sum(x: jax.Array, spec: BucketSpec) -> jax.Array:
  """Per-leaf sums of a raveled bucket: ``x`` is ``(spec.size, ...)``, the result
  ``(num_leaves, ...)``, in ``x``'s dtype.

  Examples:
    >>> from ddp_jax import plan_buckets
    >>> spec = plan_buckets({"a": jnp.zeros(3), "b": jnp.zeros(2)}).buckets[0]
    >>> segment_sum(jnp.arange(5.0), spec).tolist()
    [1.0, 9.0]
  """
  return _segment_reduce(x, spec, jnp.sum, jax.ops.segment_sum)


def segment_max_abs(x: jax.Array, spec: BucketSpec) -> jax.Array:
  """Per-leaf ``max |x|`` of a raveled bucket (``(num_leaves, ...)``, ``x``'s dtype).

  Examples:
    >>> from ddp_jax import plan_buckets
    >>> spec = plan_buckets({"a": jnp.zeros(3), "b": jnp.zeros(2)}).buckets[0]
    >>> segment_max_abs(jnp.array([1.0, -4.0, 2.0, -3.0, 0.5]), spec).tolist()
    [4.0, 3.0]
  """
  return _segment_reduce(jnp.abs(x), spec, jnp.max, jax.ops.segment_max)
