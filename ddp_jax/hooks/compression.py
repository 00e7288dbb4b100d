"""Half-precision compression: DDP's ``fp16_compress``/``bf16_compress`` and wrappers."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from ddp_jax.hooks._protocol import CommHook, check_hook, check_real, configured, to_leaves
from ddp_jax.hooks._wire import wire_cost
from ddp_jax.hooks.default import allreduce


@configured
def compress_wrapper(hook: CommHook, dtype) -> CommHook:
  """Runs ``hook`` on a ``dtype`` copy of the bucket and casts the result back.

  DDP's ``fp16_compress_wrapper`` generalized: ``compress_wrapper(powersgd(), jnp.float16)``
  runs PowerSGD in half precision. The wrapped hook's state is built for the
  compressed dtype.

  Examples:
    >>> import jax, jax.numpy as jnp, ddp_jax
    >>> hook = compress_wrapper(ddp_jax.hooks.allreduce(), jnp.float16)
    >>> tx = ddp_jax.sync_gradients("i", hook=hook)
    >>> g = {"w": jnp.arange(4.0)[:, None] / 3}
    >>> print(jax.vmap(lambda g: tx.update(g, tx.init(g))[0], axis_name="i")(g)["w"].dtype)
    float32
  """
  check_hook(hook, "compress_wrapper: hook")
  dtype = jnp.dtype(dtype)
  if not jnp.issubdtype(dtype, jnp.floating):
    raise ValueError(f"compress_wrapper: dtype must be a floating dtype, got {dtype}.")

  def init_fn(spec):
    return hook.init(dataclasses.replace(spec, dtype=dtype))

  def update_fn(bucket, state, ctx):
    check_real(bucket, "compress_wrapper")
    small = bucket.replace([x.astype(dtype) for x in bucket.leaves], dtype)
    reduced, state = hook.update(small, state, ctx)
    return tuple(x.astype(bucket.dtype) for x in to_leaves(reduced, small)), state

  def wire_fn(spec, world):
    return wire_cost(hook, dataclasses.replace(spec, dtype=dtype), world)

  return CommHook(init_fn, update_fn, wire_fn)


@configured
def fp16_compress_wrapper(hook: CommHook) -> CommHook:
  """``compress_wrapper(hook, jnp.float16)``."""
  return compress_wrapper(hook, jnp.float16)


@configured
def bf16_compress_wrapper(hook: CommHook) -> CommHook:
  """``compress_wrapper(hook, jnp.bfloat16)``."""
  return compress_wrapper(hook, jnp.bfloat16)


@configured
def fp16_compress() -> CommHook:
  """DDP's ``fp16_compress_hook``: cast to f16, divide by world size, all-reduce in f16,
  cast back. (On XLA:CPU an f16 all-reduce stays f16: half the bytes.)"""
  return compress_wrapper(allreduce(divide="before"), jnp.float16)


@configured
def bf16_compress() -> CommHook:
  """DDP's ``bf16_compress_hook``. On CPU the bf16 sum moves 16-bit words (XLA's CPU
  all-reduce would widen bf16 to f32 on the wire; see ``_collectives.sum_16bit``)."""
  return compress_wrapper(allreduce(divide="before"), jnp.bfloat16)


__all__ = ["bf16_compress", "bf16_compress_wrapper", "compress_wrapper",
           "fp16_compress", "fp16_compress_wrapper"]
