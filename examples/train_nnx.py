"""Data-parallel training of a flax NNX model with ``nnx.Optimizer`` on an 8-device CPU mesh.

    python examples/train_nnx.py --steps 300
    python examples/train_nnx.py --hook "powersgd(rank=2, start_iter=50)"

The NNX way to write a DDP step: the model and its ``nnx.Optimizer`` (whose optax chain
starts with ``ddp_jax.sync_gradients``) go through ``ddp_jax.data_parallel`` as pytrees;
each replica takes the gradients of its own loss (``ddp_jax.value_and_grad``) and
``optimizer.update`` averages them. Prints the test accuracy on scikit-learn's digits.
"""

from __future__ import annotations

import argparse
import time


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--devices", type=int, default=8)
  p.add_argument("--steps", type=int, default=300)
  p.add_argument("--batch", type=int, default=128, help="global batch size")
  p.add_argument("--lr", type=float, default=0.1)
  p.add_argument("--hook", default="allreduce",
                 help='a ddp_jax.hooks expression, e.g. "fp16_compress()"')
  p.add_argument("--seed", type=int, default=0)
  return p.parse_args(argv)


def make_model(seed=0):
  from flax import nnx

  class MLP(nnx.Module):
    def __init__(self, rngs):
      self.l1 = nnx.Linear(64, 128, rngs=rngs)
      self.l2 = nnx.Linear(128, 64, rngs=rngs)
      self.l3 = nnx.Linear(64, 10, rngs=rngs)

    def __call__(self, x):
      return self.l3(nnx.relu(self.l2(nnx.relu(self.l1(x)))))

  return MLP(nnx.Rngs(seed))


def loss_fn(model, x, y):
  import optax
  return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()


def train(hook_expr="allreduce", steps=300, batch=128, lr=0.1, seed=0):
  """Trains the NNX MLP on all devices; returns the losses and the test accuracy."""
  import jax
  import numpy as np
  import optax
  from flax import nnx
  from train_cpu_mesh import digits, make_hook

  import ddp_jax

  x, y, train_idx, test_idx = digits(seed)
  mesh = jax.make_mesh((jax.device_count(),), ("data",))
  tx = optax.chain(ddp_jax.sync_gradients("data", hook=make_hook(hook_expr)),
                   optax.sgd(lr, momentum=0.9))
  model = make_model(seed)
  # The optimizer made on every replica: hook state (residuals, PowerSGD's Q) per replica.
  optimizer = ddp_jax.init_state(lambda m: nnx.Optimizer(m, tx, wrt=nnx.Param), model, mesh,
                                 "data")

  def train_step(model, optimizer, xb, yb):  # one replica, its slice of the batch
    loss, grads = ddp_jax.value_and_grad(loss_fn, "data")(model, xb, yb)
    optimizer.update(model, grads)  # sync_gradients averages the replicas' gradients
    return model, optimizer, jax.lax.pmean(loss, "data")

  step = ddp_jax.data_parallel(train_step, mesh, "data", batch_argnums=(2, 3))
  rng = np.random.default_rng(seed)
  losses, t0 = [], time.perf_counter()
  for _ in range(steps):
    idx = rng.choice(train_idx, batch, replace=False)
    model, optimizer, loss = step(model, optimizer, x[idx], y[idx])
    losses.append(float(loss))
  logits = jax.device_get(model(x[test_idx]))
  return {"losses": losses, "seconds": time.perf_counter() - t0,
          "accuracy": float((np.argmax(logits, -1) == y[test_idx]).mean())}


def main(argv=None):
  from train_cpu_mesh import set_devices
  args = parse_args(argv)
  set_devices(args.devices)
  result = train(args.hook, args.steps, args.batch, args.lr, args.seed)
  print(f"nnx hook={args.hook} steps={args.steps} final loss "
        f"{sum(result['losses'][-20:]) / 20:.4f} test accuracy {result['accuracy']:.4f} "
        f"in {result['seconds']:.1f} s")


if __name__ == "__main__":
  main()
