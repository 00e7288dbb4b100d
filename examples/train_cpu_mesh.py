"""Data-parallel training on an 8-device CPU mesh with ddp_jax.

    python examples/train_cpu_mesh.py --steps 300 --hook allreduce
    python examples/train_cpu_mesh.py --hook "powersgd(rank=2, start_iter=50)"

Trains a small flax MLP on scikit-learn's bundled digits (8x8 images, 10
classes): each device takes its slice of every batch (``ddp_jax.data_parallel``),
computes its own gradients (``ddp_jax.value_and_grad``), and they are averaged by
``ddp_jax.sync_gradients``. Prints progress, the test
accuracy and the bytes a replica sent per step, and saves a loss plot to ``--out``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--devices", type=int, default=8)
  p.add_argument("--steps", type=int, default=300)
  p.add_argument("--batch", type=int, default=128, help="global batch size")
  p.add_argument("--lr", type=float, default=3e-3)
  p.add_argument("--hook", default="allreduce",
                 help='a ddp_jax.hooks expression, e.g. "fp16_compress()" or "topk(0.1)"')
  p.add_argument("--out", default="examples/out")
  p.add_argument("--seed", type=int, default=0)
  return p.parse_args(argv)


def set_devices(n: int) -> None:
  """Fake CPU devices; must run before jax creates its backend."""
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                             + f" --xla_force_host_platform_device_count={n}")
  os.environ.setdefault("JAX_PLATFORMS", "cpu")


def make_hook(expr: str):
  """``"powersgd(rank=2)"`` -> ``ddp_jax.hooks.powersgd(rank=2)``; a bare name is called."""
  from ddp_jax import hooks
  return hooks.parse(expr)


def mlp():
  """The digits classifier: a small flax MLP."""
  import flax.linen as nn

  class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = nn.relu(nn.Dense(128)(x))
      x = nn.relu(nn.Dense(64)(x))
      return nn.Dense(10)(x)

  return MLP()


def digits(seed=0):
  """scikit-learn's bundled digits, scaled to [0, 1], split 80/20 by a seeded permutation."""
  import numpy as np
  from sklearn.datasets import load_digits
  data = load_digits()
  x = (data.data / 16.0).astype(np.float32)
  y = data.target.astype(np.int32)
  order = np.random.default_rng(seed).permutation(len(x))
  split = int(0.8 * len(x))
  return x, y, order[:split], order[split:]


def data_parallel_step(model, tx, params, mesh):
  """The jitted data-parallel step and its initial (replicated) params and state."""
  import jax
  import optax

  import ddp_jax

  def loss_fn(p, xb, yb):
    return optax.softmax_cross_entropy_with_integer_labels(model.apply(p, xb), yb).mean()

  def train_step(p, s, xb, yb):  # one replica, its slice of the batch
    loss, grads = ddp_jax.value_and_grad(loss_fn, "data")(p, xb, yb)  # this replica's
    updates, s = tx.update(grads, s, p)  # averaged over the replicas here
    return optax.apply_updates(p, updates), s, jax.lax.pmean(loss, "data")

  step = ddp_jax.data_parallel(train_step, mesh, "data", batch_argnums=(2, 3))
  return step, ddp_jax.replicate(params, mesh), ddp_jax.init_state(tx, params, mesh, "data")


def train(hook_expr="allreduce", steps=300, batch=128, lr=3e-3, seed=0, progress=True):
  """Trains the digits MLP on all devices; returns losses, test accuracy, stats."""
  import jax
  import numpy as np
  import optax

  import ddp_jax

  x, y, train_idx, test_idx = digits(seed)
  rng = np.random.default_rng(seed)
  mesh = jax.make_mesh((jax.device_count(),), ("data",))
  model = mlp()
  params = model.init(jax.random.key(seed), x[:1])
  sync = ddp_jax.sync_gradients("data", hook=make_hook(hook_expr))
  tx = optax.chain(sync, optax.adam(lr))
  step, params, opt_state = data_parallel_step(model, tx, params, mesh)
  bar = range(steps)
  if progress:
    try:
      from tqdm import trange
      bar = trange(steps, desc=hook_expr, leave=False)
    except ImportError:
      pass
  losses, t0 = [], time.perf_counter()
  for i in bar:
    idx = rng.choice(train_idx, batch, replace=False)
    params, opt_state, loss = step(params, opt_state, x[idx], y[idx])
    losses.append(float(loss))
    if hasattr(bar, "set_postfix") and i % 20 == 0:
      bar.set_postfix(loss=f"{losses[-1]:.3f}")
  elapsed = time.perf_counter() - t0
  logits = model.apply(jax.device_get(params), x[test_idx])
  stats = jax.device_get(opt_state[0].stats)
  return {
      "hook": hook_expr, "steps": steps, "devices": jax.device_count(), "losses": losses,
      "accuracy": float((np.argmax(logits, -1) == y[test_idx]).mean()),
      "bytes_sent": float(stats.bytes_sent), "bytes_uncompressed": float(stats.bytes_uncompressed),
      "seconds": elapsed,
      "plan": ddp_jax.describe(sync, jax.device_get(params)) if progress else "",
  }


def main(argv=None):
  args = parse_args(argv)
  set_devices(args.devices)
  result = train(args.hook, args.steps, args.batch, args.lr, args.seed)
  if result["plan"]:
    print(result["plan"])
  print(f"hook={args.hook} steps={args.steps} devices={result['devices']} "
        f"final loss {sum(result['losses'][-20:]) / 20:.4f} "
        f"test accuracy {result['accuracy']:.4f} "
        f"sent {result['bytes_sent'] / 1024:.1f} KiB/step/replica "
        f"(compression ratio {result['bytes_uncompressed'] / max(result['bytes_sent'], 1):.1f}"
        f" against all-reduce) in {result['seconds']:.1f} s")
  os.makedirs(args.out, exist_ok=True)
  try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except ImportError:
    print("matplotlib not installed: no plot", file=sys.stderr)
    return
  fig, ax = plt.subplots(figsize=(6, 3.5))
  ax.plot(result["losses"], lw=1)
  ax.set(xlabel="step", ylabel="training loss", yscale="log",
         title=f"digits MLP, {result['devices']} devices, {args.hook}, "
               f"acc={result['accuracy']:.3f}")
  fig.tight_layout()
  safe = "".join(c if c.isalnum() else "_" for c in args.hook).strip("_")
  path = os.path.join(args.out, f"loss_{safe}.png")
  fig.savefig(path, dpi=100)
  print(f"loss plot: {path}")


if __name__ == "__main__":
  main()
