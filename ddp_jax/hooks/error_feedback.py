"""Error feedback (EF-SGD): remember what a lossy hook lost, add it back next step."""

from __future__ import annotations

from typing import Any, NamedTuple

from ddp_jax import _pack
from ddp_jax.hooks._feedback import correct, next_residual, residual_state
from ddp_jax.hooks._protocol import CommHook, check_hook, configured, to_leaves
from ddp_jax.hooks._wire import wire_cost


class ErrorFeedbackState(NamedTuple):
  """:func:`error_feedback`'s state: the residual and quality (see
  :class:`~ddp_jax.hooks.FeedbackState`) and the wrapped hook's state."""

  residual: Any
  rel_error: Any
  residual_norm: Any
  inner: Any


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

  check_hook(hook, "error_feedback: hook")

  def init_fn(spec):
    return ErrorFeedbackState(*residual_state(spec), inner=hook.init(spec))

  def update_fn(bucket, state, ctx):
    fixed = correct(bucket, state, ctx)  # an idle replica adds zeros, keeps its residual
    inner_bucket = bucket.replace(bucket.from_flat(fixed))
    reduced, inner = hook.update(inner_bucket, state.inner, ctx)
    flat = _pack.ravel([x.astype(bucket.dtype) for x in to_leaves(reduced, inner_bucket)])
    return flat, state._replace(inner=inner, **next_residual(fixed, fixed - flat, state, ctx))

  def wire_fn(spec, world):
    return wire_cost(hook, spec, world)

  return CommHook(init_fn, update_fn, wire_fn)
