"""Horovod's Adasum: a scale-invariant pairwise combination by recursive doubling."""

from __future__ import annotations

import math

import jax.numpy as jnp
from jax import lax

from ddp_jax.hooks._base import CommHook, WireCost, allreduce_bytes, check_real


def _pair(a, b):
  """Adasum of two gradients, per leaf: ``(1 - a.b/2|a|^2) a + (1 - a.b/2|b|^2) b``."""
  dot = jnp.sum(a.astype(jnp.float32) * b.astype(jnp.float32))
  na = jnp.sum(jnp.square(a.astype(jnp.float32)))
  nb = jnp.sum(jnp.square(b.astype(jnp.float32)))
  ca = jnp.where(na > 0, 1 - dot / (2 * jnp.where(na > 0, na, 1)), 1.0)
  cb = jnp.where(nb > 0, 1 - dot / (2 * jnp.where(nb > 0, nb, 1)), 1.0)
  return (ca * a.astype(jnp.float32) + cb * b.astype(jnp.float32)).astype(a.dtype)


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
    leaves = bucket.leaves  # an idle replica's bucket is already zeros
    d = 1
    while d < n:
      perm = [(i, i ^ d) for i in range(n)]
      other = lax.ppermute(leaves, ctx.axis_name, perm)
      # Same operand order on both partners (lower index first): identical results.
      low = (lax.axis_index(ctx.axis_name) & d) == 0
      leaves = tuple(jnp.where(low, _pair(a, b), _pair(b, a)) for a, b in zip(leaves, other))
      d *= 2
    if replicated_output:
      first = lax.axis_index(ctx.axis_name) == 0
      leaves = lax.psum(tuple(jnp.where(first, x, jnp.zeros_like(x)) for x in leaves),
                        ctx.axis_name)
    return leaves, state

  def wire_fn(spec, world):
    rounds = int(math.log2(world)) if world > 1 else 0
    extra = allreduce_bytes(spec.nbytes, world) if replicated_output else 0
    return WireCost(rounds * spec.nbytes + extra, rounds + int(replicated_output))

  return CommHook(lambda spec: (), update_fn, wire_fn)
