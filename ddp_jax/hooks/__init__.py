"""Communication hooks: how a bucket of gradients is reduced across replicas.

A hook is a ``CommHook(init, update, wire=None)`` of pure functions; its state lives in
the sync transformation's optax state. One file per hook family.
"""

from ddp_jax.hooks._base import (
    CommHook,
    GradBucket,
    HookContext,
    WireCost,
    allgather_bytes,
    allreduce_bytes,
    reduce_scatter_bytes,
    segment_ids,
    segment_spread,
    segment_sum,
    wire_cost,
)
from ddp_jax.hooks.adasum import adasum
from ddp_jax.hooks.composition import by_path, schedule
from ddp_jax.hooks.compression import (
    bf16_compress,
    bf16_compress_wrapper,
    compress_wrapper,
    fp16_compress,
    fp16_compress_wrapper,
)
from ddp_jax.hooks.default import allgather_then_aggregate, allreduce, noop
from ddp_jax.hooks.error_feedback import error_feedback
from ddp_jax.hooks.hierarchical import hierarchical
from ddp_jax.hooks.local_sgd import post_local_sgd
from ddp_jax.hooks.powersgd import batched_powersgd, powersgd
from ddp_jax.hooks.quantization import int8_allreduce, quantize_per_channel, quantize_per_tensor
from ddp_jax.hooks.sparsification import sign_compress, topk

__all__ = [
    "adasum", "by_path", "hierarchical", "post_local_sgd", "schedule", "sign_compress", "topk",
    "CommHook", "GradBucket", "HookContext", "WireCost", "allgather_bytes",
    "allgather_then_aggregate", "allreduce", "allreduce_bytes", "batched_powersgd", "bf16_compress",
    "bf16_compress_wrapper", "compress_wrapper", "error_feedback", "fp16_compress",
    "fp16_compress_wrapper", "int8_allreduce", "noop", "powersgd", "quantize_per_channel",
    "quantize_per_tensor", "reduce_scatter_bytes", "segment_ids", "segment_spread", "segment_sum",
    "wire_bytes", "wire_cost", "parse",
]


def parse(expr: str) -> CommHook:
  """A hook from a string, for command lines: ``parse("powersgd(rank=2)")``; a bare name
  is called with no arguments (``parse("fp16_compress")``). Only names from this module
  are visible.

  Examples:
    >>> parse("topk(0.1)").wire is not None
    True
  """
  names = {n: globals()[n] for n in __all__ if n != "parse"}
  text = expr.strip()
  if text.isidentifier():
    text += "()"
  try:
    hook = eval(text, {"__builtins__": {}}, names)  # noqa: S307
  except Exception as e:
    raise ValueError(f"hooks.parse: cannot make a hook from {expr!r}: {e}") from None
  if not isinstance(hook, CommHook):
    raise ValueError(f"hooks.parse: {expr!r} is not a hook.")
  return hook


def wire_bytes(hook: CommHook, plan, world_size: int) -> list[WireCost]:
  """Per bucket of ``plan``: the bytes one replica sends and the collective calls
  ``hook`` makes per step, from shapes alone (nothing runs)."""
  return [wire_cost(hook, spec, world_size) for spec in plan.buckets]
