"""Error feedback (EF-SGD): remember what a lossy hook lost, add it back next step."""

from __future__ import annotations

import jax.numpy as jnp

from ddp_jax import _pack
from ddp_jax.hooks._base import CommHook, configured, no_quality, quality, to_leaves, wire_cost


@configured
def error_feedback(hook: CommHook) -> CommHook:
  """Wraps a lossy hook with a per-replica residual, as PyTorch's PowerSGD does it.

  Each step the hook reduces ``corrected = grad + residual``; the new residual is
  ``corrected - reduced``, so over any number of steps
  ``sum(applied updates) + residual == sum(true gradients)`` on every replica. A
  replica that does not participate (``participating=False``) keeps its residual.

  Examples:
    >>> import ddp_jax
    >>> hook = error_feedback(ddp_jax.hooks.fp16_compress())
  """

  def init_fn(spec):
    return {"residual": jnp.zeros((spec.size,), spec.dtype), "inner": hook.init(spec),
            **no_quality()}

  def update_fn(bucket, state, ctx):
    corrected = bucket.buffer() + state["residual"]
    if ctx.participating is not None:  # an idle replica adds nothing, keeps its residual
      corrected = jnp.where(ctx.participating, corrected, jnp.zeros_like(corrected))
    inner_bucket = bucket.replace(bucket.from_flat(corrected))
    reduced, inner = hook.update(inner_bucket, state["inner"], ctx)
    flat = _pack.ravel([x.astype(bucket.dtype) for x in to_leaves(reduced, inner_bucket)])
    residual = corrected - flat
    if ctx.participating is not None:
      residual = jnp.where(ctx.participating, residual, state["residual"])
    return flat, {"residual": residual, "inner": inner,
                  **quality(corrected, corrected - flat)}

  def wire_fn(spec, world):
    return wire_cost(hook, spec, world)

  return CommHook(init_fn, update_fn, wire_fn)
