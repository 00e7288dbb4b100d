"""Sparsifying hooks with built-in error feedback: ``topk`` and ``sign_compress``."""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
from jax import lax

from ddp_jax.hooks import _feedback
from ddp_jax.hooks._collectives import all_gather, divide
from ddp_jax.hooks._protocol import CommHook, check_real, configured
from ddp_jax.hooks._segments import segment_ids, segment_spread, segment_sum
from ddp_jax.hooks._wire import WireCost, allgather_bytes


@configured
def topk(ratio: float) -> CommHook:
  """Top-k sparsification with error feedback: each replica sends its ``ceil(ratio x size)``
  largest-magnitude corrected entries (values and int32 indices, all-gathered); the rest
  stays in its residual (EF-SGD).

  Examples:
    >>> hook = topk(0.01)
  """
  if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio <= 1:
    raise ValueError(f"topk: ratio must be in (0, 1], got {ratio!r}.")

  def k_of(size):
    return max(1, math.ceil(ratio * size))

  def update_fn(bucket, state, ctx):
    check_real(bucket, "topk")
    corrected = _feedback.correct(bucket, state, ctx)
    _, idx = lax.top_k(jnp.abs(corrected), k_of(bucket.size))
    vals = corrected[idx]
    # What is not sent stays: the corrected bucket with the sent entries zeroed, in place
    # (no dense copy of what was sent: temporaries stay under 2x the bucket).
    unsent = corrected.at[idx].set(0)
    all_vals = all_gather(vals, ctx.axis_name).reshape(-1)
    all_idx = all_gather(idx, ctx.axis_name).reshape(-1)
    total = jnp.zeros(corrected.shape, corrected.dtype).at[all_idx].add(all_vals)
    return divide(total, ctx.divisor), state._replace(
        **_feedback.next_residual(corrected, unsent, state, ctx))

  def wire_fn(spec, world):
    return WireCost(allgather_bytes(k_of(spec.size) * (spec.dtype.itemsize + 4), world), 2)

  return CommHook(_feedback.residual_state, update_fn, wire_fn)


def signed_scale_sum(bits, scales, ids, size):
  """``sum_r scales[r, ids] * (2 bit_r - 1)`` over replicas ``r``: the scaled signs that
  ``bits`` (``(N, ceil(size / 8))`` uint8, packed) and ``scales`` (``(N, leaves)``) carry,
  summed per element. Eight replicas at a time share one lookup: their sign bits form a
  byte that indexes a ``(leaves, 256)`` table of every signed sum of their scales.
  """
  total = jnp.zeros((size,), jnp.float32)
  for first in range(0, bits.shape[0], 8):
    group = range(first, min(first + 8, bits.shape[0]))
    code = jnp.zeros((size,), jnp.int32)
    pattern = np.arange(2 ** len(group))
    table = jnp.zeros((scales.shape[1], len(pattern)), jnp.float32)
    for j, r in enumerate(group):
      code = code | (jnp.unpackbits(bits[r], count=size).astype(jnp.int32) << j)
      sign = jnp.asarray(((pattern >> j) & 1) * 2 - 1, jnp.float32)
      table = table + scales[r][:, None] * sign[None, :]
    total = total + table.reshape(-1)[ids * len(pattern) + code]
  return total


@configured
def sign_compress() -> CommHook:
  """1-bit sign compression with error feedback (EF-signSGD, 1-bit Adam style): each
  replica sends its corrected bucket's signs packed 8 per byte and one scale per leaf (the
  leaf's mean absolute value: a bucket mixes kernels and biases of very different sizes);
  the mean of ``scale_r x sign_r`` comes back.

  Examples:
    >>> hook = sign_compress()
  """

  def update_fn(bucket, state, ctx):
    check_real(bucket, "sign_compress")
    corrected = _feedback.correct(bucket, state, ctx)
    ids = segment_ids(bucket.spec)
    sums = segment_sum(jnp.abs(corrected.astype(jnp.float32)), bucket.spec)
    scales = sums / jnp.asarray(bucket.lengths, jnp.float32)
    positive = corrected >= 0
    local_scale = segment_spread(scales, bucket.spec)
    local = jnp.where(positive, local_scale, -local_scale).astype(corrected.dtype)
    bits = all_gather(jnp.packbits(positive), ctx.axis_name)
    all_scales = all_gather(scales, ctx.axis_name)  # (N, leaves)
    total = signed_scale_sum(bits, all_scales, ids, bucket.size)
    return divide(total, ctx.divisor).astype(bucket.dtype), state._replace(
        **_feedback.next_residual(corrected, corrected - local, state, ctx))

  def wire_fn(spec, world):
    return WireCost(allgather_bytes(math.ceil(spec.size / 8) + 4 * spec.num_leaves, world), 2)

  return CommHook(_feedback.residual_state, update_fn, wire_fn)
