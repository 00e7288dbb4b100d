"""Hooks against PyTorch's ddp_comm_hooks math (torch==2.13.0 CPU as the oracle).

A single process cannot run torch's process-group collectives here, so the oracle runs
the same steps with torch ops on the stacked per-replica buckets: exactly what each
hook computes around its collectives.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import ddp_jax
from ddp_jax import hooks
from ddp_jax.hooks.quantization import minmax_qparams

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.conformance
N = 8


def synced(hook, stacked, mesh):
  tx = ddp_jax.sync_gradients("data", hook=hook)

  def step(g):
    g = jax.tree.map(lambda x: x[0], g)
    return jax.tree.map(lambda x: x[None], tx.update(g, tx.init(g))[0])

  fn = jax.jit(jax.shard_map(step, mesh=mesh, in_specs=P("data"), out_specs=P("data")))
  return jax.tree.map(np.asarray, fn(ddp_jax.shard(stacked, mesh, "data")))


def buckets(seed, size=1000, scale=1.0):
  rng = np.random.default_rng(seed)
  return (rng.standard_normal((N, size)) * scale).astype(np.float32)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("name, tdtype", [("fp16_compress", "float16"),
                                          ("bf16_compress", "bfloat16")])
def test_half_compress_within_one_ulp(mesh8, seed, name, tdtype):
  x = buckets(seed, scale=10.0 ** seed)
  ours = synced(getattr(hooks, name)(), {"b": x}, mesh8)["b"][0]
  # DDP: buffer.to(half).div_(world_size); all_reduce (sum); copy back to f32.
  t = torch.from_numpy(x).to(getattr(torch, tdtype)).div_(N)
  # ddp_jax sums DDP's 16-bit inputs in f32 and rounds once (hooks._collectives.sum_16bit; XLA:CPU
  # promotes bf16 likewise): the exact sum of DDP's inputs, rounded to the 16-bit type.
  exact = t.double().sum(0)
  theirs = exact.to(getattr(torch, tdtype)).to(torch.float32).numpy()
  half = jnp.float16 if tdtype == "float16" else jnp.bfloat16
  ulp = np.asarray(jnp.abs(jnp.nextafter(jnp.asarray(theirs, half), jnp.asarray(np.inf, half))
                           .astype(jnp.float32) - jnp.asarray(theirs, half).astype(jnp.float32)))
  assert np.all(np.abs(ours - theirs) <= ulp)
  # ... so at least as close to that exact sum as DDP's own ring of 16-bit additions.
  ring = t[0].clone()
  for r in range(1, N):
    ring += t[r]
  exact = exact.numpy()
  assert np.mean(np.abs(ours - exact)) <= np.mean(np.abs(ring.double().numpy() - exact))


@pytest.mark.parametrize("seed", range(20))
def test_per_tensor_qparams_identical(seed):
  x = buckets(seed)[0] * (seed + 1) + (seed - 10) * 0.1
  obs = torch.ao.quantization.MinMaxObserver()
  obs(torch.from_numpy(x))
  s, z = obs.calculate_qparams()
  ours_s, ours_z = minmax_qparams(jnp.asarray(x))
  assert float(ours_s) == float(s[0]) and int(ours_z) == int(z[0])


@pytest.mark.parametrize("seed", range(5))
def test_per_channel_qparams_identical(seed):
  rows = buckets(seed, size=512)  # 8 rows of 512
  rows[3] = 0.0  # an all-zero row: scale eps
  rows[5] = np.abs(rows[5])  # all positive
  obs = torch.ao.quantization.PerChannelMinMaxObserver()
  obs(torch.from_numpy(rows))
  s, z = obs.calculate_qparams()
  ours_s, ours_z = minmax_qparams(jnp.asarray(rows), axis=1)
  np.testing.assert_array_equal(np.asarray(ours_s), s.numpy())
  np.testing.assert_array_equal(np.asarray(ours_z).astype(np.int64), z.numpy())


def torch_dequantized_mean(x, per_channel=False, channel=512):
  from torch.distributed.algorithms.ddp_comm_hooks import quantization_hooks as qh
  tensors, qparams, size = [], [], x.shape[1]
  for r in range(N):
    t = torch.from_numpy(x[r])
    if per_channel:
      t = torch.nn.functional.pad(t, (0, channel - size % channel)).view(-1, channel)
      obs = torch.ao.quantization.PerChannelMinMaxObserver()
      obs(t)
      s, z = obs.calculate_qparams()
      s, z = torch.stack((s, z.to(torch.float32)))
      tensors.append(qh._quantize_per_channel_backend(t, s, z))
    else:
      obs = torch.ao.quantization.MinMaxObserver()
      obs(t)
      s, z = obs.calculate_qparams()
      s, z = torch.FloatTensor([s, z])
      tensors.append(qh._quantize_per_tensor_backend(t, s, z))
    qparams.append((s, z))
  total = torch.zeros_like(tensors[0], dtype=torch.float32)
  for q, (s, z) in zip(tensors, qparams):
    total += (qh._dequantize_per_channel_backend(q, s, z) if per_channel
              else qh._dequantize_per_tensor_backend(q, s, z))
  return (torch.flatten(total)[:size] / N).numpy()


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("per_channel", [False, True])
def test_quantized_means_match(mesh8, seed, per_channel):
  x = buckets(seed, size=1100)
  hook = hooks.quantize_per_channel() if per_channel else hooks.quantize_per_tensor()
  ours = synced(hook, {"b": x}, mesh8)["b"][0]
  theirs = torch_dequantized_mean(x, per_channel)
  # Same quantized values; the dequantize-and-sum may fuse into FMAs in XLA: last-bit noise.
  np.testing.assert_allclose(ours, theirs, rtol=1e-6, atol=1e-7)


def flax_to_torch_shape(shape):
  """A flax kernel (..., in, out) / conv (kh, kw, in, out) as torch lays the weight out."""
  if len(shape) == 2:
    return (shape[1], shape[0])
  if len(shape) == 4:
    return (shape[3], shape[2], shape[0], shape[1])
  return shape


@pytest.mark.parametrize("seed", range(10))
def test_powersgd_compress_decision_identical(seed):
  from torch.distributed.algorithms.ddp_comm_hooks.powerSGD_hook import _should_compress

  from ddp_jax.hooks.powersgd import matrix_shape, should_compress
  rng = np.random.default_rng(seed)
  for _ in range(200):
    ndim = int(rng.choice([1, 2, 4]))
    shape = tuple(int(d) for d in rng.integers(1, 300 if ndim < 4 else 12, size=ndim))
    rank = int(rng.integers(1, 9))
    rate = float(rng.choice([0.5, 1, 2, 4]))
    n, m = matrix_shape(shape)
    t = torch.empty(flax_to_torch_shape(shape)).view(flax_to_torch_shape(shape)[0], -1)
    tn, tm = t.shape
    ours = should_compress(n, m, min(n, m, rank), rate)
    theirs = _should_compress(tn, tm, min(tn, tm, rank), rate)
    assert ours == theirs, (shape, rank, rate)
