"""Convergence per hook: the digits MLP of examples/train_cpu_mesh.py trained with each
hook for the same steps on 8 CPU devices; test accuracy, bytes per step, compression.

    python benchmarks/bench_convergence.py            # every hook below, 400 steps
    python benchmarks/bench_convergence.py --steps 200 --hooks allreduce "topk(0.1)"
    python benchmarks/bench_convergence.py --seeds 0 1 2   # mean and range over seeds

The training step is the example's: per-replica gradients (``ddp_jax.value_and_grad``),
``ddp_jax.data_parallel``, adam 3e-3. A seed fixes the initial weights and the batches.

Writes benchmarks/out/convergence.{json,md,png}.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
HOOKS = [
    "allreduce()",
    "fp16_compress()",
    "bf16_compress()",
    "allgather_then_aggregate()",
    "quantize_per_tensor()",
    "quantize_per_channel()",
    "int8_allreduce()",
    "powersgd(rank=2, start_iter=50)",
    "powersgd(rank=1, start_iter=50)",
    "batched_powersgd(rank=2, start_iter=50)",
    "batched_powersgd(rank=2, start_iter=50, use_error_feedback=False)",
    "fp16_compress_wrapper(powersgd(rank=2, start_iter=50))",
    "by_path({'*bias*': allreduce()}, default=powersgd(rank=2, start_iter=50))",
    "schedule({0: allreduce(), 100: int8_allreduce(), 200: powersgd(rank=2, start_iter=0)})",
    "topk(0.1)",
    "sign_compress()",
    "error_feedback(fp16_compress())",
    "adasum()",
]


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--steps", type=int, default=400)
  p.add_argument("--hooks", nargs="+", default=HOOKS)
  p.add_argument("--devices", type=int, default=8)
  p.add_argument("--seeds", type=int, nargs="+", default=[0])
  p.add_argument("--out", default=str(HERE / "out"))
  args = p.parse_args(argv)
  sys.path.insert(0, str(HERE.parent / "examples"))
  import train_cpu_mesh as example
  example.set_devices(args.devices)
  rows = []
  for expr in args.hooks:
    for seed in args.seeds:
      r = example.train(expr, steps=args.steps, seed=seed, progress=False)
      r.pop("plan")
      r["seed"] = seed
      rows.append(r)
      print(f"{expr:70} seed {seed} acc {r['accuracy']:.4f}  "
            f"{r['bytes_sent'] / 1024:8.1f} KiB/step  {r['seconds']:.1f} s", flush=True)
  by_hook = {}
  for r in rows:
    by_hook.setdefault(r["hook"], []).append(r)
  mean = {h: sum(r["accuracy"] for r in rs) / len(rs) for h, rs in by_hook.items()}
  base = next((h for h in by_hook if h in ("allreduce()", "allreduce")), rows[0]["hook"])
  out = Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  (out / "convergence.json").write_text(json.dumps(rows, indent=1))
  seeds = len(args.seeds)
  lines = [f"Digits MLP, {rows[0]['devices']} CPU devices, {args.steps} steps, adam 3e-3, "
           f"global batch 128, per-replica gradients; test accuracy "
           + (f"mean over seeds {args.seeds} (min-max)" if seeds > 1 else f"seed {args.seeds[0]}")
           + "; bytes one replica sends per step (ring algorithms).", "",
           "| hook | test accuracy | vs allreduce (pp) | KiB sent / step | fewer bytes than all-reduce |",
           "|---|---:|---:|---:|---:|"]
  for h, rs in by_hook.items():
    accs = [r["accuracy"] for r in rs]
    acc = f"{mean[h]:.4f}" + (f" ({min(accs):.4f}-{max(accs):.4f})" if seeds > 1 else "")
    r = rs[0]
    lines.append(f"| `{h}` | {acc} | {100 * (mean[h] - mean[base]):+.2f} | "
                 f"{r['bytes_sent'] / 1024:.1f} | "
                 f"{r['bytes_uncompressed'] / max(r['bytes_sent'], 1):.1f}x |")
  md = "\n".join(lines) + "\n"
  (out / "convergence.md").write_text(md)
  print(md)
  try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
  except ImportError:
    return
  fig, ax = plt.subplots(figsize=(8, 4.5))
  for h, rs in by_hook.items():
    smooth = np.convolve(rs[0]["losses"], np.ones(10) / 10, mode="valid")
    ax.plot(smooth, lw=1, label=f"{h[:40]} ({mean[h]:.3f})")
  ax.set(xlabel="step", ylabel="training loss (10-step mean)", yscale="log",
         title="digits MLP: loss per hook")
  ax.legend(fontsize=6, ncol=2)
  fig.tight_layout()
  fig.savefig(out / "convergence.png", dpi=110)


if __name__ == "__main__":
  main()
