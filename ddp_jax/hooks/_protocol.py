"""The comm hook protocol: ``CommHook(init, update)``, ``GradBucket``, ``HookContext``.

A hook is a pair of pure functions, like an optax transformation::

    init(spec: BucketSpec) -> state
    update(bucket: GradBucket, state, ctx: HookContext) -> (reduced, new_state)

``reduced`` is the bucket averaged over the replicas, either as one 1-D array
of ``bucket.size`` elements (the raveled layout of ``bucket.buffer()``) or as a
sequence of arrays shaped like ``bucket.leaves``; in the bucket's dtype. The
sync transformation keeps one state per bucket in its optax state.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, NamedTuple, Protocol

import jax
import jax.numpy as jnp

from ddp_jax import _pack
from ddp_jax._plan import BucketSpec
from ddp_jax.hooks._wire import WireCost


class HookContext(NamedTuple):
  """What a hook knows about the mapped axis it reduces over.

  Attributes:
    axis_name: a name or a tuple of names, as given to ``lax.psum``.
    axis_size: number of replicas (static).
    participating: this replica's flag (bool scalar) when the step was given
      ``participating=`` (uneven inputs, DDP ``Join``), else None. A replica
      that does not participate hands in zeros; stateful hooks should leave
      their per-replica memory (residuals) unchanged on it.
    num_participating: the number of participating replicas (int32 scalar,
      the same on every replica), else None; with integer weights (see
      :func:`~ddp_jax.sync_gradients`), their sum: what a mean divides by.
    predivide_factor: Horovod's ``gradient_predivide_factor`` f: averaging
      hooks divide by f before the sum and by ``divisor / f`` after it.
    weight: this replica's weight (int32 scalar: 1 or 0 for a bool flag) when
      the step was given ``participating=``, else None; for hooks that average
      over part of the axis themselves.
    warm_up: static; True in a warm-up program of :func:`~ddp_jax.data_parallel`,
      run only while every hook's iteration is below its ``start_iter``: a hook
      that switches there (``ddp_jax._phase.until``) takes its first branch alone.
  """

  axis_name: Any
  axis_size: int
  participating: Any = None
  num_participating: Any = None
  predivide_factor: float | None = None
  weight: Any = None
  warm_up: bool = False

  @property
  def divisor(self):
    """What a mean divides by: the participating replicas, or all of them."""
    return self.axis_size if self.num_participating is None else self.num_participating


class InitFn(Protocol):
  """``init(spec) -> state``: a hook's state for one bucket, from its shapes alone."""

  def __call__(self, spec: BucketSpec) -> Any: ...


class UpdateFn(Protocol):
  """``update(bucket, state, ctx) -> (reduced, new_state)``: one bucket, one step."""

  def __call__(self, bucket: GradBucket, state: Any, ctx: HookContext) -> tuple[Any, Any]: ...


class EmptyState(NamedTuple):
  """The state of a hook that keeps none (as optax's ``EmptyState``)."""


def init_empty(spec: BucketSpec) -> EmptyState:
  """``init`` for a stateless hook: ``CommHook(init_empty, update_fn)``.

  Examples:
    >>> from ddp_jax.hooks import init_empty
    >>> init_empty(None)
    EmptyState()
  """
  del spec
  return EmptyState()


class CommHook(NamedTuple):
  """A communication hook: ``init(spec) -> state``, ``update(bucket, state, ctx)``.

  ``wire(spec, world_size) -> WireCost`` (optional) states the hook's traffic
  statically; without it a hook is taken to all-reduce the bucket once.

  Examples:
    >>> import jax.numpy as jnp
    >>> from jax import lax
    >>> from ddp_jax.hooks import CommHook, init_empty
    >>> def mean_hook():
    ...   def update_fn(bucket, state, ctx):
    ...     return lax.psum(bucket.buffer(), ctx.axis_name) / ctx.axis_size, state
    ...   return CommHook(init_empty, update_fn)
  """

  init: InitFn
  update: UpdateFn
  wire: Callable[[BucketSpec, int], WireCost] | None = None
  config: str | None = None  # e.g. "powersgd(rank=2, ...)": set by @configured factories


def check_hook(hook, where: str) -> None:
  """Nothing if ``hook`` is a :class:`CommHook` of callables, else a ``TypeError`` naming
  ``where`` and what to pass (a plain ``(init, update)`` tuple is refused here rather
  than failing later without a name). For factories that wrap another hook.

  Examples:
    >>> from ddp_jax.hooks import allreduce, check_hook
    >>> check_hook(allreduce(), "my_wrapper: hook")
    >>> check_hook("allreduce", "my_wrapper: hook")
    Traceback (most recent call last):
    ...
    TypeError: my_wrapper: hook must be a CommHook(init, update), e.g. ddp_jax.hooks.allreduce(); got str 'allreduce'.
  """
  if isinstance(hook, CommHook) and callable(hook.init) and callable(hook.update):
    return
  if isinstance(hook, tuple) and len(hook) in (2, 3) and all(map(callable, hook)):
    raise TypeError(f"{where} must be a CommHook, got a plain tuple of functions; wrap it: "
                    "ddp_jax.hooks.CommHook(init, update).")
  raise TypeError(f"{where} must be a CommHook(init, update), e.g. ddp_jax.hooks.allreduce(); "
                  f"got {type(hook).__name__} {hook!r:.80}.")


def hook_config(hook) -> str:
  """What a hook is, as text equal on every process for equal hooks: the factory call
  that made it (``powersgd(rank=2, start_iter=1000, ...)``), else its update function's
  name."""
  config = getattr(hook, "config", None)
  if config:
    return config
  update = hook.update
  name = getattr(update, "__qualname__", None) or type(update).__name__
  return f"{getattr(update, '__module__', '?')}.{name.split('.<locals>')[0]}"


def _config_arg(value) -> str:
  if isinstance(value, CommHook):
    return hook_config(value)
  if isinstance(value, dict):
    return "{" + ", ".join(f"{k!r}: {_config_arg(v)}" for k, v in value.items()) + "}"
  if isinstance(value, (list, tuple)):
    return "[" + ", ".join(map(_config_arg, value)) + "]"
  if callable(value):
    return getattr(value, "__qualname__", type(value).__name__)
  return repr(value)


def configured(factory):
  """Decorates a hook factory so that its hooks carry their configuration (``config``):
  the factory's name and every argument, defaults included. Checkpoints and the
  cross-process check compare it."""
  import inspect

  signature = inspect.signature(factory)

  @functools.wraps(factory)
  def make(*args, **kwargs):
    hook = factory(*args, **kwargs)
    bound = signature.bind(*args, **kwargs)
    bound.apply_defaults()
    text = ", ".join(f"{k}={_config_arg(v)}" for k, v in bound.arguments.items())
    return CommHook(*tuple(hook)[:3], config=f"{factory.__name__}({text})")

  return make


class GradBucket:
  """One bucket of gradients as a hook sees it.

  ``leaves`` are the gradients in their own shapes; ``buffer()`` ravels them
  (lazily, once) into one 1-D array; ``operands()`` returns them packed the way
  the sync's ``pack`` mode asks (``pack``: the mode and its ``ravel_below_bytes``),
  and ``from_operands`` undoes that.
  """

  def __init__(self, spec: BucketSpec, leaves, groups, pack: tuple = ("auto", None)):
    self.spec = spec
    self.leaves = tuple(leaves)
    self.groups = groups
    self.pack = pack

  index = property(lambda self: self.spec.index)
  dtype = property(lambda self: self.spec.dtype)
  paths = property(lambda self: self.spec.paths)
  shapes = property(lambda self: self.spec.shapes)
  offsets = property(lambda self: self.spec.offsets)
  lengths = property(lambda self: self.spec.lengths)
  size = property(lambda self: self.spec.size)

  @functools.cached_property
  def _buffer(self) -> jax.Array:
    return _pack.ravel(self.leaves)

  def buffer(self) -> jax.Array:
    """The bucket raveled into one 1-D array (computed once)."""
    return self._buffer

  def operands(self) -> tuple[jax.Array, ...]:
    """The arrays to hand to an elementwise collective, per the pack mode."""
    if len(self.groups) == 1 and len(self.groups[0]) > 1:
      return (self.buffer(),)
    return _pack.to_operands(self.leaves, self.groups)

  def replace(self, leaves, dtype=None) -> GradBucket:
    """The same bucket holding other leaves (e.g. a half-precision copy)."""
    spec = self.spec if dtype is None else dataclasses.replace(self.spec, dtype=jnp.dtype(dtype))
    return GradBucket(spec, leaves, self.groups, self.pack)

  def subset(self, positions, spec: BucketSpec | None = None) -> GradBucket:
    """The bucket of the leaves at ``positions``, packed as the sync packs (``spec``:
    ``self.spec.subset(positions)`` if already built)."""
    spec = self.spec.subset(positions) if spec is None else spec
    return GradBucket(spec, [self.leaves[p] for p in positions],
                      _pack.operand_groups(spec, *self.pack), self.pack)

  def from_flat(self, flat) -> tuple[jax.Array, ...]:
    """Leaves from a 1-D array laid out like :meth:`buffer`."""
    return tuple(_pack.split(flat, self.spec))

  def from_operands(self, operands) -> tuple[jax.Array, ...]:
    """Leaves from operands shaped like :meth:`operands`."""
    return _pack.from_operands(operands, self.groups, self.shapes)

  def __repr__(self) -> str:
    return (f"GradBucket(index={self.index}, dtype={self.dtype.name}, "
            f"leaves={len(self.leaves)}, size={self.size})")


def to_leaves(reduced, bucket: GradBucket) -> tuple:
  """A hook's result (flat array or leaves) as leaves (no validation: sync validates)."""
  if hasattr(reduced, "shape"):
    return bucket.from_flat(reduced)
  return tuple(reduced)


def check_real(bucket: GradBucket, hook_name: str) -> None:
  """Lossy hooks handle real floating buckets only (trace-time check)."""
  if not jnp.issubdtype(bucket.dtype, jnp.floating):
    raise ValueError(
        f"{hook_name}: bucket {bucket.index} ({bucket.paths[0]} ...) holds "
        f"{bucket.dtype.name} gradients; this hook handles real floating gradients only. "
        "Send such leaves through allreduce(), e.g. with hooks.by_path.")
