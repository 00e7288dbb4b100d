"""The sync's configuration: one frozen, validated object (what ``sync_gradients`` was
called with), read by the transformation, ``describe``, ``verify_sync`` and the
cross-process check."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, Literal, get_args

import jax
import jax.numpy as jnp
import numpy as np

from ddp_jax import _axes, _pack
from ddp_jax._pack import Pack
from ddp_jax._plan import BucketPlan, Order, bucket_limits, is_communicated, plan_buckets
from ddp_jax.hooks._protocol import CommHook, check_hook

InvariantGrads = Literal["error", "summed"]


def _one_of(name: str, value, kind) -> None:
  if value not in get_args(kind):
    raise ValueError(f"{name} must be one of {get_args(kind)}, got {value!r}.")


def _tuples(x):
  return None if x is None else tuple(tuple(b) if isinstance(b, Sequence) else b for b in x)


@dataclasses.dataclass(frozen=True)
class SyncConfig:
  """What a :func:`sync_gradients` transformation does, validated when it is made.

  Every argument of :func:`sync_gradients` (see there), normalized: ``hook`` is the
  hook (``allreduce()`` by default), ``reduce_dtype`` a ``numpy.dtype`` or None, lists
  are tuples. Read it from the transformation: ``sync_gradients(...).config``.

  Examples:
    >>> import ddp_jax
    >>> ddp_jax.sync_gradients("data", pack="ravel").config.pack
    'ravel'
  """

  axis_name: Any
  hook: CommHook
  bucket_cap_mb: float = 25
  first_bucket_cap_mb: float = 1
  order: Order = "reverse"
  bucket_indices: tuple[tuple[int, ...], ...] | None = None
  bucket_caps_mb: tuple[float, ...] | None = None
  pack: Pack = "auto"
  ravel_below_bytes: int | None = None
  reduce_dtype: Any = None
  gradient_predivide_factor: float | None = None
  invariant_grads: InvariantGrads = "error"

  def __post_init__(self):
    _axes.check_axis_name(self.axis_name)
    _one_of("invariant_grads", self.invariant_grads, InvariantGrads)
    check_hook(self.hook, "sync_gradients: hook")
    _one_of("order", self.order, Order)
    _one_of("pack", self.pack, Pack)
    below = self.ravel_below_bytes
    if below is not None and (isinstance(below, bool) or not isinstance(below, int) or below < 0):
      raise ValueError(f"ravel_below_bytes must be a non-negative int, got {below!r}.")
    if self.reduce_dtype is not None:
      dtype = jnp.dtype(self.reduce_dtype)
      if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"reduce_dtype must be a floating dtype, got {dtype}.")
      object.__setattr__(self, "reduce_dtype", dtype)
    f = self.gradient_predivide_factor
    if f is not None and not (isinstance(f, (int, float)) and not isinstance(f, bool)
                              and np.isfinite(f) and f > 0):
      raise ValueError(
          f"gradient_predivide_factor must be a positive finite number, got {f!r}.")
    bucket_limits(self.bucket_cap_mb, self.first_bucket_cap_mb, self.bucket_caps_mb)
    object.__setattr__(self, "bucket_indices", _tuples(self.bucket_indices))
    if self.bucket_caps_mb is not None:
      object.__setattr__(self, "bucket_caps_mb", tuple(self.bucket_caps_mb))

  @property
  def plan_kwargs(self) -> dict:
    """The :func:`plan_buckets` arguments."""
    return dict(bucket_cap_mb=self.bucket_cap_mb, first_bucket_cap_mb=self.first_bucket_cap_mb,
                order=self.order, bucket_indices=self.bucket_indices,
                bucket_caps_mb=self.bucket_caps_mb)

  @property
  def settings(self) -> dict:
    """Everything but the axis and the hook, as plain values (the cross-process check
    compares them)."""
    return dict(self.plan_kwargs, pack=self.pack, ravel_below_bytes=self.ravel_below_bytes,
                reduce_dtype=None if self.reduce_dtype is None else self.reduce_dtype.name,
                gradient_predivide_factor=self.gradient_predivide_factor,
                invariant_grads=self.invariant_grads)

  def cast(self, tree):
    """The gradients in ``reduce_dtype`` (communicated leaves only), or as they are."""
    if self.reduce_dtype is None:
      return tree
    dtype = self.reduce_dtype
    return jax.tree.map(lambda x: x.astype(dtype) if is_communicated(x) else x, tree)

  def plan(self, grads) -> BucketPlan:
    """The bucket plan of a gradient tree (arrays or ``jax.ShapeDtypeStruct``)."""
    return plan_buckets(jax.eval_shape(self.cast, grads), **self.plan_kwargs)

  def operand_groups(self, spec):
    """How bucket ``spec`` becomes collective operands under this ``pack``."""
    return _pack.operand_groups(spec, self.pack, self.ravel_below_bytes)
