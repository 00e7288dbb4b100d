"""Horovod's Adasum: a scale-invariant pairwise combination by recursive doubling."""

from __future__ import annotations

import dataclasses
import functools
import math

import jax.numpy as jnp
from jax import lax

from ddp_jax.hooks._base import (
  CommHook,
  WireCost,
  allreduce_bytes,
  check_real,
  segment_spread,
  segment_sum,
)


def _pair(a, b, spec):
  """Adasum of two operands, per leaf: ``(1 - a.b/2|a|^2) a + (1 - a.b/2|b|^2) b``.
  ``spec`` None: the operand is one leaf; else the leaves raveled in it (their per-leaf
  dot products and norms by ``segment_sum``, no slice per leaf)."""
  a32, b32 = a.astype(jnp.float32), b.astype(jnp.float32)
  total = jnp.sum if spec is None else functools.partial(segment_sum, spec=spec)
  spread = (lambda v: v) if spec is None else functools.partial(segment_spread, spec=spec)
  dot, na, nb = (total(x) for x in (a32 * b32, a32 * a32, b32 * b32))
  ca = jnp.where(na > 0, 1 - dot / (2 * jnp.where(na > 0, na, 1)), 1.0)
  cb = jnp.where(nb > 0, 1 - dot / (2 * jnp.where(nb > 0, nb, 1)), 1.0)
  return (spread(ca) * a32 + spread(cb) * b32).astype(a.dtype)


def _group_spec(spec, group):
  """The spec of the leaves ``group`` of a bucket raveled into one operand."""
  if len(group) == 1:
    return None
  pick = lambda xs: tuple(xs[i] for i in group)  # noqa: E731
  return dataclasses.replace(spec, leaf_indices=pick(spec.leaf_indices),
                             paths=pick(spec.paths), shapes=pick(spec.shapes))


def adasum(replicated_output: bool = True) -> CommHook:
  """Horovod's Adasum reduction, per leaf, by recursive doubling over the axis.

  In round ``k`` every replica swaps its running result with the replica whose index
  differs in bit ``k`` (``ppermute``) and both combine them with the Adasum rule, so after
  ``log2 N`` rounds all hold the same result: equal gradients give that gradient (like a
  mean), orthogonal ones their sum. Needs a power-of-two number of replicas. A
  replica that does not participate contributes zeros, which Adasum ignores.

  Args:
    replicated_output: all replicas end with the same values, but ``ppermute`` results
      are typed *varying* under ``shard_map``, which a ``P()`` out-spec rejects. With
      True (default) a final ``psum`` of replica 0's result (one all-reduce of the
      bucket) makes the result typed replicated; False skips it (use ``P(axis)``
      out-specs, ``pmap``, or ``check_vma=False``).

  Examples:
    >>> hook = adasum()
  """

  def update_fn(bucket, state, ctx):
    check_real(bucket, "adasum")
    n = ctx.axis_size
    if n & (n - 1):
      raise ValueError(f"adasum: the axis {ctx.axis_name!r} has {n} replicas; Adasum's "
                       "recursive doubling needs a power of two.")
    # The operands of the sync's pack mode (auto: small leaves raveled together, large ones
    # alone); an idle replica's bucket is already zeros.
    ops = bucket.operands()
    specs = [_group_spec(bucket.spec, g) for g in bucket.groups]
    d = 1
    while d < n:
      others = lax.ppermute(ops, ctx.axis_name, [(i, i ^ d) for i in range(n)])
      # Same operand order on both partners (lower index first): identical results.
      low = (lax.axis_index(ctx.axis_name) & d) == 0
      ops = tuple(jnp.where(low, _pair(a, b, s), _pair(b, a, s))
                  for a, b, s in zip(ops, others, specs))
      d *= 2
    if replicated_output:
      first = lax.axis_index(ctx.axis_name) == 0
      ops = lax.psum(tuple(jnp.where(first, x, jnp.zeros_like(x)) for x in ops), ctx.axis_name)
    return bucket.from_operands(ops), state

  def wire_fn(spec, world):
    rounds = int(math.log2(world)) if world > 1 else 0
    extra = allreduce_bytes(spec.nbytes, world) if replicated_output else 0
    return WireCost(rounds * spec.nbytes + extra, rounds + int(replicated_output))

  return CommHook(lambda spec: (), update_fn, wire_fn)
