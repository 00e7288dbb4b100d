"""Synthetic gradient trees with the leaf shapes of real models (flax layouts).

No weights are downloaded: only shapes and dtypes, as ``jax.ShapeDtypeStruct``.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def _sds(shape, dtype=jnp.float32):
  return jax.ShapeDtypeStruct(tuple(shape), dtype)


def resnet50(dtype=jnp.float32):
  """161 leaves, 25.6M parameters (convs without bias, BatchNorm scale/bias)."""
  tree = {"conv1": {"kernel": _sds((7, 7, 3, 64), dtype)},
          "bn1": {"scale": _sds((64,), dtype), "bias": _sds((64,), dtype)}}
  cin = 64
  for s, (blocks, width) in enumerate(zip([3, 4, 6, 3], [64, 128, 256, 512])):
    for b in range(blocks):
      block = {}
      for k, (kh, ci, co) in enumerate([(1, cin, width), (3, width, width), (1, width, 4 * width)]):
        block[f"conv{k}"] = {"kernel": _sds((kh, kh, ci, co), dtype)}
        block[f"bn{k}"] = {"scale": _sds((co,), dtype), "bias": _sds((co,), dtype)}
      if b == 0:
        block["down_conv"] = {"kernel": _sds((1, 1, cin, 4 * width), dtype)}
        block["down_bn"] = {"scale": _sds((4 * width,), dtype), "bias": _sds((4 * width,), dtype)}
      tree[f"stage{s}_block{b}"] = block
      cin = 4 * width
  tree["fc"] = {"kernel": _sds((2048, 1000), dtype), "bias": _sds((1000,), dtype)}
  return tree


def _layer_norm(d, dtype):
  return {"scale": _sds((d,), dtype), "bias": _sds((d,), dtype)}


def bert_base(dtype=jnp.float32, norm_dtype=None):
  """199 leaves, 109M parameters (BERT-base with pooler)."""
  nd = norm_dtype or dtype
  d, f = 768, 3072
  tree = {"embeddings": {"word": _sds((30522, d), dtype), "position": _sds((512, d), dtype),
                         "token_type": _sds((2, d), dtype), "ln": _layer_norm(d, nd)}}
  for i in range(12):
    layer = {}
    for name in ("query", "key", "value", "attn_out"):
      layer[name] = {"kernel": _sds((d, d), dtype), "bias": _sds((d,), nd)}
    layer["attn_ln"] = _layer_norm(d, nd)
    layer["ffn_in"] = {"kernel": _sds((d, f), dtype), "bias": _sds((f,), nd)}
    layer["ffn_out"] = {"kernel": _sds((f, d), dtype), "bias": _sds((d,), nd)}
    layer["ffn_ln"] = _layer_norm(d, nd)
    tree[f"layer{i:02d}"] = layer
  tree["pooler"] = {"kernel": _sds((d, d), dtype), "bias": _sds((d,), nd)}
  return tree


def gpt2_small(dtype=jnp.float32, norm_dtype=None):
  """148 leaves, 124M parameters (tied embeddings)."""
  nd = norm_dtype or dtype
  d = 768
  tree = {"wte": _sds((50257, d), dtype), "wpe": _sds((1024, d), dtype)}
  for i in range(12):
    tree[f"h{i:02d}"] = {
        "ln_1": _layer_norm(d, nd),
        "attn_c_attn": {"kernel": _sds((d, 3 * d), dtype), "bias": _sds((3 * d,), nd)},
        "attn_c_proj": {"kernel": _sds((d, d), dtype), "bias": _sds((d,), nd)},
        "ln_2": _layer_norm(d, nd),
        "mlp_c_fc": {"kernel": _sds((d, 4 * d), dtype), "bias": _sds((4 * d,), nd)},
        "mlp_c_proj": {"kernel": _sds((4 * d, d), dtype), "bias": _sds((d,), nd)},
    }
  tree["ln_f"] = _layer_norm(d, nd)
  return tree


def tiny_leaves(n=1000, nbytes=1024, dtype=jnp.float32):
  """``n`` leaves of ``nbytes`` each (the per-operand cost stress test)."""
  size = nbytes // jnp.dtype(dtype).itemsize
  return {f"p{i:04d}": _sds((size,), dtype) for i in range(n)}


def mlp_2x2m(dtype=jnp.float32):
  """Two 2 MiB matrices and their biases: DDP puts them in two buckets (the smoke test)."""
  return {"w1": _sds((512, 1024), dtype), "b1": _sds((1024,), dtype),
          "w2": _sds((1024, 512), dtype), "b2": _sds((512,), dtype)}


TREES = {
    "resnet50": resnet50,
    "resnet50_bf16": lambda: resnet50(jnp.bfloat16),
    "bert_base": bert_base,
    "bert_base_mixed": lambda: bert_base(jnp.bfloat16, jnp.float32),
    "gpt2_small": gpt2_small,
    "gpt2_small_mixed": lambda: gpt2_small(jnp.bfloat16, jnp.float32),
    "tiny_161x4k": lambda: tiny_leaves(161, 4096),
    "tiny_1000x1k": lambda: tiny_leaves(1000, 1024),
    "mlp_2x2m": mlp_2x2m,
}


def describe(tree) -> str:
  leaves = jax.tree.leaves(tree)
  n = sum(math.prod(x.shape) for x in leaves)
  return f"{len(leaves)} leaves, {n / 1e6:.1f}M params"
