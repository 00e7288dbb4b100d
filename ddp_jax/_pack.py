"""Ravel and split: the only place that copies gradients.

A bucket is sent as a list of *operands*. How leaves become operands is the
``pack`` mode:

- ``"ravel"``: the whole bucket is one contiguous 1-D buffer (one collective
  operand per bucket; the right choice where the runtime pays per operand,
  e.g. XLA's CPU runtime over gloo across processes);
- ``"variadic"``: every leaf is its own operand (no copies; XLA's combiner
  merges the all-reduces into one variadic op);
- ``"auto"``: leaves smaller than ``small_leaf_bytes`` are raveled together
  into one operand, larger leaves travel as their own operands, so the number
  of operands stays small and the copies stay cheap.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from ddp_jax._plan import BucketSpec

PACK_MODES = ("auto", "ravel", "variadic")
# A leaf below this size is copied into the bucket's shared buffer under "auto".
# 1 MiB: copying it costs ~0.1 ms on one CPU core, about one gloo collective call.
AUTO_SMALL_LEAF_BYTES = 1 << 20


def ravel(leaves: Sequence[jax.Array]) -> jax.Array:
  """Concatenates leaves (of one dtype) into one 1-D buffer."""
  flat = [jnp.ravel(x) for x in leaves]
  return flat[0] if len(flat) == 1 else jnp.concatenate(flat)


def split(buffer: jax.Array, spec: BucketSpec) -> list[jax.Array]:
  """Splits a raveled bucket buffer back into leaves of the spec's shapes."""
  return split_shapes(buffer, spec.shapes)


def split_shapes(buffer: jax.Array, shapes) -> list[jax.Array]:
  out, start = [], 0
  for shape in shapes:
    n = 1
    for d in shape:
      n *= d
    out.append(jax.lax.slice_in_dim(buffer, start, start + n).reshape(shape))
    start += n
  return out


def operand_groups(spec: BucketSpec, mode: str,
                   small_leaf_bytes: int = AUTO_SMALL_LEAF_BYTES) -> tuple[tuple[int, ...], ...]:
  """Positions (within the bucket) of the leaves that make up each operand.

  A group of one leaf is sent in its own shape; a larger group is raveled.
  """
  n = spec.num_leaves
  if mode == "ravel":
    return (tuple(range(n)),)
  if mode == "variadic":
    return tuple((i,) for i in range(n))
  if mode == "auto":
    item = spec.dtype.itemsize
    small = tuple(i for i in range(n) if spec.lengths[i] * item < small_leaf_bytes)
    large = tuple((i,) for i in range(n) if spec.lengths[i] * item >= small_leaf_bytes)
    return ((small,) if small else ()) + large
  raise ValueError(f"pack must be one of {PACK_MODES}, got {mode!r}.")


def to_operands(leaves: Sequence[jax.Array], groups) -> tuple[jax.Array, ...]:
  return tuple(leaves[g[0]] if len(g) == 1 else ravel([leaves[i] for i in g])
               for g in groups)


def from_operands(operands: Sequence[jax.Array], groups, shapes) -> tuple[jax.Array, ...]:
  out: list = [None] * len(shapes)
  for op, group in zip(operands, groups):
    if len(group) == 1:
      out[group[0]] = op.reshape(shapes[group[0]])
    else:
      for i, leaf in zip(group, split_shapes(op, [shapes[i] for i in group])):
        out[i] = leaf
  return tuple(out)
