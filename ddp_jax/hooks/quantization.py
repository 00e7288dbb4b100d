"""Integer quantization hooks: DDP's per-tensor / per-channel uint8 (all-gather protocol)
and ``int8_allreduce`` (shared scale, all-reduce that scales with world size)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from jax import lax

from ddp_jax._validate import check_int
from ddp_jax.hooks._collectives import all_gather, divide, float64
from ddp_jax.hooks._protocol import CommHook, check_real, configured, init_empty
from ddp_jax.hooks._wire import WireCost, allgather_bytes, allreduce_bytes

QUANT_MIN, QUANT_MAX = 0, 255
EPS = float(np.finfo(np.float32).eps)  # MinMaxObserver's eps


def exact_div(a, b):
  """``a / b`` correctly rounded in float32, as torch computes it.

  XLA:CPU's vectorized f32 division is not correctly rounded (it differs from IEEE
  division in the last bit for ~20% of inputs), which would change qparams and
  quantized values; dividing in float64 and rounding once gives the IEEE result.
  """
  with float64():
    q = jnp.asarray(a).astype(jnp.float64) / jnp.asarray(b).astype(jnp.float64)
    return q.astype(jnp.float32)


def minmax_qparams(x: jnp.ndarray, axis=None):
  """uint8 affine (scale, zero_point) from min/max, as ``torch.ao.quantization``'s
  ``MinMaxObserver`` (``axis=None``) or ``PerChannelMinMaxObserver`` (``axis=1`` over rows)
  compute them with their defaults (quint8, affine, range 0..255)."""
  x = x.astype(jnp.float32)
  lo = jnp.min(x, axis=axis)
  hi = jnp.max(x, axis=axis)
  lo_neg = jnp.minimum(lo, 0.0)
  hi_pos = jnp.maximum(hi, 0.0)
  scale = exact_div(hi_pos - lo_neg, jnp.float32(QUANT_MAX - QUANT_MIN))
  scale = jnp.maximum(scale, jnp.float32(EPS))
  zero_point = QUANT_MIN - jnp.round(exact_div(lo_neg, scale))
  return scale, jnp.clip(zero_point, QUANT_MIN, QUANT_MAX)


def quantize(x, scale, zero_point):
  """``clamp(round(x / scale) + zero_point, 0, 255)`` as uint8 (torch's backend)."""
  y = jnp.round(exact_div(x.astype(jnp.float32), scale)) + zero_point
  return jnp.clip(y, QUANT_MIN, QUANT_MAX).astype(jnp.uint8)


def dequantize(y, scale, zero_point):
  return scale * (y.astype(jnp.float32) - zero_point)


def _gather_and_average(q, qparams, ctx, shape_fn):
  """All-gather quantized buckets and their qparams, dequantize each, average."""
  all_q = all_gather(q, ctx.axis_name)
  all_p = all_gather(qparams, ctx.axis_name)
  total = jnp.zeros(q.shape, jnp.float32)
  for r in range(all_q.shape[0]):  # in rank order, like DDP's loop
    total = total + dequantize(all_q[r], shape_fn(all_p[r, 0]), shape_fn(all_p[r, 1]))
  return total


@configured
def quantize_per_tensor() -> CommHook:
  """DDP's ``quantization_pertensor_hook``: per-worker uint8 min/max qparams, all-gather of
  qparams and quantized buckets, dequantize each worker's part, average.

  Examples:
    >>> import jax, jax.numpy as jnp, ddp_jax
    >>> tx = ddp_jax.sync_gradients("i", hook=quantize_per_tensor())
    >>> g = {"w": jnp.linspace(-1, 1, 8).reshape(4, 2)}
    >>> out = jax.vmap(lambda g: tx.update(g, tx.init(g))[0], axis_name="i")(g)
    >>> out["w"].shape
    (4, 2)
  """

  def update_fn(bucket, state, ctx):
    check_real(bucket, "quantize_per_tensor")
    x = bucket.buffer()
    scale, zp = minmax_qparams(x)
    q = quantize(x, scale, zp)
    total = _gather_and_average(q, jnp.stack([scale, zp]), ctx, lambda v: v)
    return divide(total, ctx.divisor).astype(bucket.dtype), state

  def wire_fn(spec, world):
    return WireCost(allgather_bytes(spec.size + 8, world), 2)

  return CommHook(init_empty, update_fn, wire_fn)


@configured
def quantize_per_channel(channel_size: int = 512) -> CommHook:
  """DDP's ``quantization_perchannel_hook``: the raveled bucket zero-padded into rows of
  ``channel_size`` (as DDP: a full extra row when the length divides evenly), per-row
  qparams as ``PerChannelMinMaxObserver``, all-gather protocol.

  A ``channel_size`` larger than a bucket is capped at the bucket's size: DDP would pad
  the bucket to the full row (``channel_size=10**9`` allocated 1e9 elements per replica
  for a 2,080-element bucket); the capped row has the same qparams, since the padding
  is zeros and the observer's range always includes zero."""
  check_int(channel_size, 1, "quantize_per_channel: channel_size")

  def row_of(size):
    return min(channel_size, size)

  def rows_of(size):
    row = row_of(size)
    return (size + row - size % row) // row

  def update_fn(bucket, state, ctx):
    check_real(bucket, "quantize_per_channel")
    x = bucket.buffer().astype(jnp.float32)
    rows, row = rows_of(bucket.size), row_of(bucket.size)
    padded = jnp.pad(x, (0, rows * row - bucket.size)).reshape(rows, row)
    scale, zp = minmax_qparams(padded, axis=1)
    q = quantize(padded, scale[:, None], zp[:, None])
    total = _gather_and_average(q, jnp.stack([scale, zp]), ctx, lambda v: v[:, None])
    flat = total.reshape(-1)[: bucket.size]
    return divide(flat, ctx.divisor).astype(bucket.dtype), state

  def wire_fn(spec, world):
    rows = rows_of(spec.size)
    return WireCost(allgather_bytes(rows * row_of(spec.size) + 8 * rows, world), 2)

  return CommHook(init_empty, update_fn, wire_fn)


@configured
def int8_allreduce() -> CommHook:
  """Quantized all-reduce whose traffic does not grow with world size: int8 both ways.

  Two phases, both in int8 (an s8 all-reduce would sum in int8 and overflow):

  1. every replica quantizes its bucket to int8 levels with one scale shared by all
     (a ``pmax`` of the absolute maxima) and sends each owner its 1/N chunk
     (``all_to_all``, a reduce-scatter by hand); the owner sums the N chunks exactly
     in int32;
  2. each owner requantizes its summed chunk to int8 with its own scale and all replicas
     ``all_gather`` the chunks (and the N scales).

  A replica sends ``2 (N-1)/N x size`` bytes (plus 4 + 4N), a quarter of an f32 ring
  all-reduce, where DDP's all-gather protocol sends ``(N-1) x size``. Error per element:
  at most ``scale / 2`` from each phase. A NaN or Inf on any replica makes the whole
  bucket NaN on every replica (an int8 level cannot carry it; scaling by an infinite
  maximum would silently give zeros).

  Examples:
    >>> hook = int8_allreduce()
  """

  def update_fn(bucket, state, ctx):
    check_real(bucket, "int8_allreduce")
    n = ctx.axis_size
    x = bucket.buffer().astype(jnp.float32)
    chunk = -(-bucket.size // n)
    x = jnp.pad(x, (0, n * chunk - bucket.size)).reshape(n, chunk)
    # NaN counts as Inf, so one replica's non-finite value reaches every replica's amax.
    amax = jnp.max(jnp.abs(x))
    amax = lax.pmax(jnp.where(jnp.isnan(amax), jnp.inf, amax), ctx.axis_name)
    finite = jnp.isfinite(amax)
    scale = jnp.where(jnp.logical_and(finite, amax > 0), amax / 127.0, 1.0)
    q = jnp.clip(jnp.round(x / scale), -127, 127).astype(jnp.int8)
    mine = lax.all_to_all(q, ctx.axis_name, 0, 0, tiled=True)  # (n, chunk): my chunk from all
    summed = jnp.sum(mine.astype(jnp.int32), axis=0).astype(jnp.float32) * scale
    smax = jnp.max(jnp.abs(summed))
    scale2 = jnp.where(smax > 0, smax / 127.0, 1.0)
    q2 = jnp.clip(jnp.round(summed / scale2), -127, 127).astype(jnp.int8)
    chunks = all_gather(q2, ctx.axis_name)  # (n, chunk)
    scales = all_gather(scale2, ctx.axis_name)  # (n,)
    total = (chunks.astype(jnp.float32) * scales[:, None]).reshape(-1)[: bucket.size]
    total = jnp.where(finite, total, jnp.nan)  # never a finite answer to a NaN or Inf
    return divide(total, ctx.divisor).astype(bucket.dtype), state

  def wire_fn(spec, world):
    chunk = -(-spec.size // world)
    moved = 2 * (world - 1) * chunk  # all_to_all + all_gather of int8 chunks
    return WireCost(moved + allgather_bytes(4, world) + allreduce_bytes(4, world), 4)

  return CommHook(init_empty, update_fn, wire_fn)
