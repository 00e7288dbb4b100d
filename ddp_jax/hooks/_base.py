"""The comm hook protocol: ``CommHook(init, update)``, ``GradBucket``, ``HookContext``.

A hook is a pair of pure functions, like an optax transformation::

    init(spec: BucketSpec) -> state
    update(bucket: GradBucket, state, ctx: HookContext) -> (reduced, new_state)

``reduced`` is the bucket averaged over the replicas, either as one 1-D array
of ``bucket.size`` elements (the raveled layout of ``bucket.buffer()``) or as a
sequence of arrays shaped like ``bucket.leaves``; in the bucket's dtype. The
sync transformation keeps one state per bucket in its optax state.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax

from ddp_jax import _pack
from ddp_jax._plan import BucketSpec


class HookContext(NamedTuple):
  """What a hook knows about the mapped axis it reduces over."""

  axis_name: Any  # a name or a tuple of names, as given to lax.psum
  axis_size: int  # number of replicas (static)


class CommHook(NamedTuple):
  """A communication hook: ``init(spec) -> state``, ``update(bucket, state, ctx)``."""

  init: Callable[[BucketSpec], Any]
  update: Callable[[Any, Any, HookContext], tuple[Any, Any]]


class GradBucket:
  """One bucket of gradients as a hook sees it.

  ``leaves`` are the gradients in their own shapes; ``buffer()`` ravels them
  (lazily, once) into one 1-D array; ``operands()`` returns them packed the way
  the sync's ``pack`` mode asks, and ``from_operands`` undoes that.
  """

  def __init__(self, spec: BucketSpec, leaves, groups, is_last: bool):
    self.spec = spec
    self.leaves = tuple(leaves)
    self.groups = groups
    self.is_last = is_last

  index = property(lambda self: self.spec.index)
  dtype = property(lambda self: self.spec.dtype)
  paths = property(lambda self: self.spec.paths)
  shapes = property(lambda self: self.spec.shapes)
  offsets = property(lambda self: self.spec.offsets)
  lengths = property(lambda self: self.spec.lengths)
  size = property(lambda self: self.spec.size)

  @functools.cached_property
  def _buffer(self) -> jax.Array:
    return _pack.ravel(self.leaves)

  def buffer(self) -> jax.Array:
    """The bucket raveled into one 1-D array (computed once)."""
    return self._buffer

  def operands(self) -> tuple[jax.Array, ...]:
    """The arrays to hand to an elementwise collective, per the pack mode."""
    if len(self.groups) == 1 and len(self.groups[0]) > 1:
      return (self.buffer(),)
    return _pack.to_operands(self.leaves, self.groups)

  def from_operands(self, operands) -> tuple[jax.Array, ...]:
    """Leaves from operands shaped like :meth:`operands`."""
    return _pack.from_operands(operands, self.groups, self.shapes)

  def __repr__(self) -> str:
    return (f"GradBucket(index={self.index}, dtype={self.dtype.name}, "
            f"leaves={len(self.leaves)}, size={self.size})")
