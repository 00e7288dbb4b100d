"""Data-parallel training on an 8-device CPU mesh with ddp_jax.

    python examples/train_cpu_mesh.py --steps 300 --hook allreduce

Trains a small flax MLP on scikit-learn's bundled digits (8x8 images, 10
classes): each device takes its slice of every batch, gradients are averaged by
``ddp_jax.sync_gradients`` inside ``jax.shard_map``. Prints progress, the test
accuracy, and saves a loss plot to ``--out``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time


def parse_args():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--devices", type=int, default=8)
  p.add_argument("--steps", type=int, default=300)
  p.add_argument("--batch", type=int, default=128, help="global batch size")
  p.add_argument("--lr", type=float, default=3e-3)
  p.add_argument("--hook", default="allreduce", help="a hook from ddp_jax.hooks (no arguments)")
  p.add_argument("--out", default="examples/out")
  p.add_argument("--seed", type=int, default=0)
  return p.parse_args()


def main():
  args = parse_args()
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                             + f" --xla_force_host_platform_device_count={args.devices}")
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  import flax.linen as nn
  import jax
  import numpy as np
  import optax
  from jax.sharding import PartitionSpec as P
  from sklearn.datasets import load_digits

  import ddp_jax

  class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = nn.relu(nn.Dense(128)(x))
      x = nn.relu(nn.Dense(64)(x))
      return nn.Dense(10)(x)

  digits = load_digits()
  x = (digits.data / 16.0).astype(np.float32)
  y = digits.target.astype(np.int32)
  rng = np.random.default_rng(args.seed)
  order = rng.permutation(len(x))
  split = int(0.8 * len(x))
  train, test = order[:split], order[split:]

  mesh = jax.make_mesh((args.devices,), ("data",))
  model = MLP()
  params = model.init(jax.random.key(args.seed), x[:1])
  hook = getattr(ddp_jax.hooks, args.hook)()
  tx = optax.chain(ddp_jax.sync_gradients("data", hook=hook), optax.adam(args.lr))
  print(ddp_jax.plan_buckets(params).summary())

  def loss_fn(p, xb, yb):
    logits = model.apply(p, xb)
    return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()

  def train_step(p, s, xb, yb):
    loss, grads = jax.value_and_grad(loss_fn)(p, xb, yb)
    updates, s = tx.update(grads, s, p)
    return optax.apply_updates(p, updates), s, jax.lax.pmean(loss, "data")

  opt_state = ddp_jax.init_state(tx, params, mesh, "data")
  specs = ddp_jax.state_specs(opt_state, "data")
  step = jax.jit(jax.shard_map(train_step, mesh=mesh,
                               in_specs=(P(), specs, P("data"), P("data")),
                               out_specs=(P(), specs, P())))
  params = ddp_jax.replicate(params, mesh)

  try:
    from tqdm import trange
  except ImportError:  # progress without tqdm
    trange = range
  losses, t0 = [], time.perf_counter()
  bar = trange(args.steps)
  for i in bar:
    idx = rng.choice(train, args.batch, replace=False)
    xb, yb = ddp_jax.shard((x[idx], y[idx]), mesh, "data")
    params, opt_state, loss = step(params, opt_state, xb, yb)
    losses.append(float(loss))
    if hasattr(bar, "set_postfix") and i % 20 == 0:
      bar.set_postfix(loss=f"{losses[-1]:.3f}")
  elapsed = time.perf_counter() - t0
  logits = model.apply(jax.device_get(params), x[test])
  acc = float((np.argmax(logits, -1) == y[test]).mean())
  print(f"hook={args.hook} steps={args.steps} devices={args.devices} "
        f"final loss {np.mean(losses[-20:]):.4f} test accuracy {acc:.4f} ({elapsed:.1f} s)")

  os.makedirs(args.out, exist_ok=True)
  try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except ImportError:
    print("matplotlib not installed: no plot", file=sys.stderr)
    return
  fig, ax = plt.subplots(figsize=(6, 3.5))
  ax.plot(losses, lw=1)
  ax.set(xlabel="step", ylabel="training loss", yscale="log",
         title=f"digits MLP, {args.devices} devices, hook={args.hook}, acc={acc:.3f}")
  fig.tight_layout()
  path = os.path.join(args.out, f"loss_{args.hook}.png")
  fig.savefig(path, dpi=100)
  print(f"loss plot: {path}")


if __name__ == "__main__":
  main()
