"""Horovod's Adasum: a scale-invariant pairwise combination by recursive doubling."""

from __future__ import annotations

import functools
import math

import jax.numpy as jnp
from jax import lax

from ddp_jax.hooks._protocol import CommHook, check_real, configured, init_empty
from ddp_jax.hooks._segments import segment_max_abs, segment_spread, segment_sum
from ddp_jax.hooks._wire import WireCost, allreduce_bytes

_SAFE = 2.0**100  # squared norms within (1/_SAFE, _SAFE): no underflow, no overflow
_COEF = 2.0**40  # coefficients below this: the combination cannot overflow


def _pair(a, b, spec):
  """Adasum of two operands, per leaf: ``(1 - a.b/2|a|^2) a + (1 - a.b/2|b|^2) b``, in
  the operands' dtype (at least float32 inside). ``spec`` None: the operand is one leaf;
  else the leaves raveled in it (per-leaf dot products and norms by ``segment_sum``, no
  slice per leaf).

  Written as ``a + b - ka (ra a) - kb (rb b)`` with per-leaf factors: ``ra = rb = 1``
  and ``ka = a.b / 2|a|^2`` normally. In float32, squares of small gradients underflow
  (a leaf with ``|g|^2 < 1.2e-38`` was summed, not Adasum'd) and coefficients of
  operands whose scales differ by more than ~1e19 overflow; when any squared norm leaves
  ``(2**-100, 2**100)`` (zero included: it may be an underflow) or a coefficient
  ``2**40``, the factors are recomputed (``lax.cond`` over per-leaf scalars: the common
  case pays nothing) on each leaf divided by its own largest magnitude (``ra = 1/sa``:
  entries <= 1, squared norm >= 1), with ``ka = sb (ra a).(rb b) / 2|ra a|^2``, so no
  square and no ratio of scales is ever formed."""
  dtype = a.dtype
  work = dtype if jnp.finfo(dtype).bits >= 32 else jnp.float32
  a, b = a.astype(work), b.astype(work)
  if spec is None:
    total, spread = jnp.sum, lambda v: v  # noqa: E731
    peak = lambda x: jnp.max(jnp.abs(x))  # noqa: E731
  else:
    total = functools.partial(segment_sum, spec=spec)
    spread = functools.partial(segment_spread, spec=spec)
    peak = functools.partial(segment_max_abs, spec=spec)

  def ratio(d, n):
    return jnp.where(n > 0, d / (2 * jnp.where(n > 0, n, 1)), 0)

  d, na, nb = total(a * b), total(a * a), total(b * b)
  ka, kb = ratio(d, na), ratio(d, nb)
  in_range = lambda n: (n > 1 / _SAFE) & (n < _SAFE)  # noqa: E731
  safe = jnp.all(in_range(na) & in_range(nb) & (ka < _COEF) & (kb < _COEF)
                 & (-ka < _COEF) & (-kb < _COEF))
  one = jnp.ones_like(ka)

  def scaled(_):
    sa, sb = peak(a), peak(b)
    ra = jnp.where(sa > 0, 1 / jnp.where(sa > 0, sa, 1), 0)
    rb = jnp.where(sb > 0, 1 / jnp.where(sb > 0, sb, 1), 0)
    ha, hb = a * spread(ra), b * spread(rb)
    dh, nha, nhb = total(ha * hb), total(ha * ha), total(hb * hb)
    return ratio(dh, nha) * sb, ratio(dh, nhb) * sa, ra, rb

  ka, kb, ra, rb = lax.cond(safe, lambda _: (ka, kb, one, one), scaled, None)
  return (a + b - spread(ka) * (a * spread(ra)) - spread(kb) * (b * spread(rb))).astype(dtype)


def _group_spec(spec, group):
  """The spec of the leaves ``group`` of a bucket raveled into one operand."""
  if len(group) == 1:
    return None
  return spec.subset(group)


@configured
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
      # Both partners pick the same operand order (lower index first) and run one
      # program on the same values: bit-identical results (two orders selected after
      # the fact rounded differently, up to 342 ulp apart on 8 replicas).
      low = (lax.axis_index(ctx.axis_name) & d) == 0
      ops = tuple(_pair(jnp.where(low, a, b), jnp.where(low, b, a), s)
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

  return CommHook(init_empty, update_fn, wire_fn)
