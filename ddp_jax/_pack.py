"""Ravel and split: the only place that copies gradients.

A bucket is sent as a list of *operands*. How leaves become operands is the
``pack`` mode:

- ``"ravel"``: the whole bucket is one contiguous 1-D buffer (one collective
  operand per bucket; the right choice where the runtime pays per operand,
  e.g. XLA's CPU runtime over gloo across processes);
- ``"variadic"``: every leaf is its own operand (no copies; XLA's combiner
  merges the all-reduces into one variadic op);
- ``"auto"``: leaves smaller than a threshold are raveled together into one
  operand, larger leaves travel as their own operands, so the number of
  operands stays small and the copies stay cheap.

The threshold weighs one collective call per operand against copying the leaf
in and out of the shared buffer. Measured on CPU (``benchmarks/bench_sync.py``):
a call costs ~0.2 ms in one process with 8 devices (whose copies share the
host's cores) and ~0.35 ms over gloo between processes (one device each),
so small leaves are raveled below 64 KiB in one process and below 1 MiB
across processes. Across processes started with huge pages or reused host memory
(:mod:`ddp_jax._host_memory`; ``ddp-jax-run`` starts them so) copies are cheaper and
the threshold is 4 MiB. Sync cost over 4 gloo processes with huge pages, torch DDP's in
the same run in brackets (``benchmarks/bench_peer.py``): ResNet-50 1 MiB 300 ms (220),
4 MiB 221 (208), whole buckets 249 (212); BERT-base 1119 (849), 1046 (896), 1256 (873);
GPT-2 small 1672 (1054), 1168 (964), 1462 (1011). With glibc as configured whole
buckets were worse still (ResNet-50 431-450 ms against 333 with 1 MiB: every copy
page-faults its fresh buffer).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, get_args

import jax
import jax.numpy as jnp

from ddp_jax._host_memory import host_memory_mode
from ddp_jax._plan import BucketSpec

Pack = Literal["auto", "ravel", "variadic"]
PACK_MODES = get_args(Pack)
RAVEL_BELOW_ONE_PROCESS = 64 << 10
RAVEL_BELOW_MULTI_PROCESS = 1 << 20
RAVEL_BELOW_MULTI_PROCESS_FAST_HOST = 4 << 20
# XLA's CPU compiler fuses a concatenate of at most this many operands (its
# cpu_instruction_fusion kMaxConcatenateArguments); more are copied operand by operand.
FUSED_CONCAT_MAX = 8


def auto_ravel_below() -> int:
  """The "auto" threshold for this run: see the module docstring."""
  if jax.process_count() == 1:
    return RAVEL_BELOW_ONE_PROCESS
  if host_memory_mode() == "system":
    return RAVEL_BELOW_MULTI_PROCESS
  return RAVEL_BELOW_MULTI_PROCESS_FAST_HOST


def auto_rule() -> str:
  """The "auto" threshold for this run, in words (compared across processes)."""
  return f"leaves below {auto_ravel_below()} bytes raveled (host memory: {host_memory_mode()})"


def ravel(leaves: Sequence[jax.Array]) -> jax.Array:
  """Concatenates leaves (of one dtype) into one 1-D buffer.

  A concatenate of at most :data:`FUSED_CONCAT_MAX` operands is fused by XLA, and its
  fused loop runs over the largest operand once per operand; with operands of unequal
  sizes (a 94 MB embedding and three 3 KB biases) it took 1.03 s on the CPU against
  28 ms for a copy. Such lists are built as the largest leaf padded with zeros, the
  others written into it in place (``dynamic_update_slice``): the same values.

  Examples:
    >>> import jax.numpy as jnp
    >>> from ddp_jax import _pack
    >>> _pack.ravel([jnp.ones((2, 3)), jnp.zeros(2)]).tolist()
    [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0]
  """
  flat = [jnp.ravel(x) for x in leaves]
  if len(flat) == 1:
    return flat[0]
  sizes = [x.size for x in flat]
  total = sum(sizes)
  if len(flat) > FUSED_CONCAT_MAX or 2 * len(flat) * max(sizes) <= 3 * total:
    return jnp.concatenate(flat)  # not fused, or no operand much smaller than the largest
  offsets = [sum(sizes[:i]) for i in range(len(flat))]
  order = sorted(range(len(flat)), key=lambda i: -sizes[i])
  big = order[0]
  out = jnp.pad(flat[big], (offsets[big], total - offsets[big] - sizes[big]))
  for i in order[1:]:
    out = jax.lax.dynamic_update_slice(out, flat[i], (offsets[i],))
  return out


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


def operand_groups(spec: BucketSpec, mode: Pack,
                   ravel_below: int | None = None) -> tuple[tuple[int, ...], ...]:
  """Positions (within the bucket) of the leaves that make up each operand.

  A group of one leaf is sent in its own shape; a larger group is raveled.
  ``ravel_below`` is the "auto" threshold in bytes (default: ``auto_ravel_below()``).
  """
  n = spec.num_leaves
  if mode == "ravel":
    return (tuple(range(n)),)
  if mode == "variadic":
    return tuple((i,) for i in range(n))
  if mode == "auto":
    limit = auto_ravel_below() if ravel_below is None else ravel_below
    item = spec.dtype.itemsize
    small = tuple(i for i in range(n) if spec.lengths[i] * item < limit)
    large = tuple((i,) for i in range(n) if spec.lengths[i] * item >= limit)
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
