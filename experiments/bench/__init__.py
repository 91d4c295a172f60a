"""Benchmarks: entry points over one shared harness (`experiments.bench.harness`).

- `experiments.bench.speed`: meta-steps/s, compile time, GFLOP/s and memory of sinusoid and
  Conv4 MAML and of the inner-step sweep, with the PyTorch peers in the same run (``--peers``).
- `experiments.bench.devices`: the meta-step with the task axis sharded over 1, 2, 4 devices.
- `experiments.bench.per_example`: the JAX tutorial's per-example-gradient timing ratio.
- `experiments.bench.streaming`: host streaming's device wait per meta-step (Conv4 at 84x84,
  a memory-mapped synthetic split) beside on-device sampling.

Run each as ``python -m experiments.bench.<name> --help`` from the checkout (or anywhere, with
metagrad installed).
"""
