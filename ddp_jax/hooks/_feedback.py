"""Error feedback, written once: ``powersgd``, ``batched_powersgd``, ``topk``,
``sign_compress`` and ``error_feedback`` keep a per-replica residual of what compression
lost, add it to the next step's bucket, and log the compression quality."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax.numpy as jnp


def quality(corrected, residual) -> dict:
  """Compression quality of one step, per replica: ``rel_error = |residual| / |corrected|``
  and ``residual_norm``, as float32 scalars (logged from the state, no host round-trip)."""
  res = jnp.linalg.norm(residual.astype(jnp.float32))
  base = jnp.linalg.norm(corrected.astype(jnp.float32))
  return {"rel_error": jnp.where(base > 0, res / jnp.where(base > 0, base, 1), 0.0),
          "residual_norm": res}


def no_quality() -> dict:
  return {"rel_error": jnp.zeros((), jnp.float32), "residual_norm": jnp.zeros((), jnp.float32)}


class FeedbackState(NamedTuple):
  """Error-feedback state of one bucket, per replica: the residual (what compression has
  not delivered yet, laid out like ``bucket.buffer()``) and the last step's quality."""

  residual: Any
  rel_error: Any
  residual_norm: Any


def residual_state(spec) -> FeedbackState:
  """A zero residual for one bucket plus the quality metrics.

  Examples:
    >>> import jax.numpy as jnp, ddp_jax
    >>> plan = ddp_jax.plan_buckets({"w": jnp.zeros(3)})
    >>> ddp_jax.hooks.residual_state(plan.buckets[0]).residual.shape
    (3,)
  """
  return FeedbackState(jnp.zeros((spec.size,), spec.dtype), **no_quality())


def correct(bucket, state, ctx, enabled: bool = True):
  """The bucket plus the residual (``enabled``), and zeros on a replica that does not
  participate (it adds nothing)."""
  out = bucket.buffer()
  if enabled:
    out = out + state.residual
  if ctx.participating is not None:
    out = jnp.where(ctx.participating, out, jnp.zeros_like(out))
  return out


def next_residual(corrected_buffer, error, state, ctx, enabled: bool = True) -> dict:
  """The new ``residual``, ``rel_error`` and ``residual_norm`` (a dict for
  ``state._replace(**...)``): the residual after a step is ``error`` (what this replica's contribution lost: PyTorch's
  ``corrected - result``, or EF-SGD's ``corrected - sent``), kept as it was when not
  ``enabled`` or on an idle replica; with the step's quality metrics."""
  residual = error if enabled else state.residual
  if ctx.participating is not None:
    residual = jnp.where(ctx.participating, residual, state.residual)
  return {"residual": residual, **quality(corrected_buffer, error)}
