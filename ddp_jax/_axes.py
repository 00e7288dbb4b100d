"""Mapped axes: names, sizes, and ``shard_map``'s varying-axes types.

Under ``jax.shard_map`` with ``check_vma=True`` (the default) every value
carries the set of mesh axes it varies over. A replicated (``P()``) parameter
is *invariant*; combining it with per-replica data inserts an implicit cast to
varying, whose transpose in ``jax.grad`` is a ``psum``: the gradient of a
replicated parameter arrives already summed over the axis. A data-parallel
library must therefore differentiate per-replica (varying) copies and refuse
invariant gradients. This module is the one place that reads and writes those
types; under ``jax.pmap``, ``jax.vmap`` or ``check_vma=False`` values carry no
such type and everything here is a no-op.
"""

from __future__ import annotations

from typing import Any

import jax
from jax import lax


def axis_names(axis_name) -> tuple[str, ...]:
  """``axis_name`` (a name or a tuple of names) as a tuple of names."""
  return axis_name if isinstance(axis_name, tuple) else (axis_name,)


def check_axis_name(axis_name) -> None:
  names = axis_names(axis_name)
  if not names or any(not isinstance(n, str) or not n for n in names):
    raise TypeError(
        f"axis_name must be a mesh axis name or a tuple of them, got {axis_name!r}.")


def axis_size(axis_name, who: str) -> int:
  """The number of replicas over ``axis_name``; a clear error where it is not bound."""
  size = 1
  for name in axis_names(axis_name):
    try:
      size *= lax.axis_size(name)
    except NameError:
      raise ValueError(
          f"{who}: axis {name!r} is not bound here. It must run inside a mapped "
          f"function that names it, e.g. jax.shard_map(step, mesh=mesh, in_specs=..., "
          f"out_specs=...) over a Mesh with axis {name!r} (or ddp_jax.data_parallel(step, "
          f"mesh, {name!r})), or jax.pmap(step, axis_name={name!r}). If the step already "
          f"runs mapped, check the axis name for a typo."
      ) from None
  return size


def varying_axes(x) -> frozenset:
  """The mesh axes ``x`` is typed as varying over (empty outside ``shard_map``)."""
  aval = jax.typeof(x)
  mat = getattr(aval, "mat", None)  # jax >= 0.10: ManualAxisType(varying, unreduced, reduced)
  if mat is not None:
    return frozenset(mat.varying)
  vma = getattr(aval, "vma", None)  # jax 0.7-0.9
  if vma is None:  # a jax that names it otherwise: fail loudly rather than check nothing
    raise NotImplementedError(
        f"ddp_jax cannot read shard_map's varying axes from {type(aval).__name__} in jax "
        f"{jax.__version__} (no .mat or .vma); please report this with your jax version.")
  return frozenset(vma)


def checks_vma(axis_name) -> bool:
  """True under ``shard_map`` with ``check_vma`` over every axis of ``axis_name``:
  values there are typed varying or invariant. False under ``pmap``, ``vmap`` and
  ``check_vma=False``. The axes must be bound."""
  return all(n in varying_axes(lax.axis_index(n)) for n in axis_names(axis_name))


def invariant_over(x, axis_name) -> tuple[str, ...]:
  """The axes of ``axis_name`` that ``x`` is *not* varying over (call under
  :func:`checks_vma` only: elsewhere every value looks invariant)."""
  vma = varying_axes(x)
  return tuple(n for n in axis_names(axis_name) if n not in vma)


def to_varying(tree: Any, axis_name) -> Any:
  """Casts every array of ``tree`` to varying over ``axis_name`` under ``shard_map``
  (``lax.pcast(x, axis, to="varying")``: no data moves); unchanged under ``pmap``,
  ``vmap`` and ``check_vma=False``, where values carry no such type."""
  names = tuple(n for n in axis_names(axis_name) if checks_vma(n))
  if not names:
    return tree

  def one(x):
    missing = tuple(n for n in names if n not in varying_axes(x))
    return lax.pcast(x, missing, to="varying") if missing else x

  return jax.tree.map(one, tree)


def axis_size_of(mesh, axis_name) -> int:
  """The number of replicas over ``axis_name`` of ``mesh`` (outside any mapping)."""
  size = 1
  for name in axis_names(axis_name):
    size *= mesh.shape[name]
  return size
