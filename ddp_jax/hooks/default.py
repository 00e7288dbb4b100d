"""DDP's default hooks: ``allreduce`` (divide by world size, then sum) and ``noop``."""

from __future__ import annotations

from jax import lax

from ddp_jax.hooks._base import CommHook


def _no_state(spec):
  del spec
  return ()


def allreduce() -> CommHook:
  """The default hook: each replica divides by the world size, then ``psum``.

  Dividing before the sum is DDP's order (it keeps f16 sums from overflowing).

  Examples:
    >>> import jax, jax.numpy as jnp, ddp_jax
    >>> tx = ddp_jax.sync_gradients("i", hook=ddp_jax.hooks.allreduce())
    >>> g = {"w": jnp.arange(8.0).reshape(8, 1)}
    >>> f = jax.vmap(lambda g: tx.update(g, tx.init(g))[0], axis_name="i")
    >>> print(f(g)["w"][:, 0])
    [3.5 3.5 3.5 3.5 3.5 3.5 3.5 3.5]
  """

  def update_fn(bucket, state, ctx):
    operands = tuple(x / ctx.axis_size for x in bucket.operands())
    return bucket.from_operands(lax.psum(operands, ctx.axis_name)), state

  return CommHook(_no_state, update_fn)


def noop() -> CommHook:
  """No communication: returns the local bucket (measures compute-only time)."""

  def update_fn(bucket, state, ctx):
    del ctx
    return bucket.leaves, state

  return CommHook(_no_state, update_fn)
