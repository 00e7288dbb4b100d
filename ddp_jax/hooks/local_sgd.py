"""Post-local SGD (DDP's ``post_localSGD_hook``)."""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from ddp_jax.hooks._base import CommHook, as_varying, configured, divide


@configured
def post_local_sgd(start_iter: int, local_axis) -> CommHook:
  """Global all-reduce until ``start_iter``, then all-reduce only within ``local_axis``
  (e.g. the devices of one node on a ``("node", "local")`` mesh). Replicas of different
  groups then drift apart: average their parameters now and then with
  :func:`ddp_jax.periodic_model_average` (DDP's ``PeriodicModelAverager``).

  Examples:
    >>> hook = post_local_sgd(start_iter=100, local_axis="local")
  """
  if isinstance(start_iter, bool) or not isinstance(start_iter, int) or start_iter < 0:
    raise ValueError(f"post_local_sgd: start_iter must be an int >= 0, got {start_iter!r}.")

  def mean_over(x, axis, ctx):
    if ctx.participating is None:
      return lax.psum(x, axis) / lax.psum(1, axis)
    count = lax.psum(ctx.weight, axis)  # the weights of this group's replicas
    return divide(lax.psum(x, axis), jnp.maximum(count, 1))

  def update_fn(bucket, state, ctx):
    x = bucket.buffer()  # an idle replica's bucket is already zeros
    reduced = lax.cond(state["iter"] < start_iter,
                       lambda v: as_varying(mean_over(v, ctx.axis_name, ctx), ctx.axis_name),
                       lambda v: as_varying(mean_over(v, local_axis, ctx), ctx.axis_name), x)
    return reduced.astype(bucket.dtype), {"iter": state["iter"] + 1}

  return CommHook(lambda spec: {"iter": jnp.zeros((), jnp.int32)}, update_fn)
