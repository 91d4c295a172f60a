"""The JAX tutorial's per-example-gradient timing claim, as a ratio measured in one run.

`vmap(grad(td_loss))` dispatched op by op against `jit(vmap(grad(td_loss)))` on the tutorial's
TD(0) loss and batch, each timed as the other benchmarks are (`experiments.bench.harness`: the
median of timed blocks after a warm-up call). The tutorial saw 7.74 ms against 86.2 us (about
90x).

    python -m experiments.bench.per_example [--batch 2] [--target-s 0.5] [--json out.json]
"""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp

import metagrad as mg
from experiments.bench import harness


def _value_fn(theta, s):
    return jnp.dot(theta, s)


def td_loss(theta, s_tm1, r_t, s_t):
    return mg.td_loss(_value_fn, theta, s_tm1, r_t, s_t)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=2, help="examples per call (the tutorial: 2)")
    parser.add_argument("--json", help="also write the result here")
    harness.add_timing_args(parser, harness.Timing(target_s=0.5, blocks=5, max_call_s=10.0))
    args = parser.parse_args(argv)
    timing = harness.timing_of(args)

    theta = jnp.array([0.1, -0.1, 0.0])
    batch = (
        jnp.tile(jnp.array([1.0, 2.0, -1.0]), (args.batch, 1)),
        jnp.ones(args.batch),
        jnp.tile(jnp.array([2.0, 1.0, 0.0]), (args.batch, 1)),
    )
    unjitted = jax.vmap(jax.grad(td_loss), in_axes=(None, 0, 0, 0))
    jitted = mg.per_example_grads(td_loss, in_axes=(None, 0, 0, 0))
    t_eager = 1.0 / harness.time_calls(lambda: unjitted(theta, *batch), timing)["calls_per_s"]
    t_jit = 1.0 / harness.time_calls(lambda: jitted(theta, *batch), timing)["calls_per_s"]
    result = {
        "batch": args.batch,
        "vmap_grad_s": t_eager,
        "jit_vmap_grad_s": t_jit,
        "speedup": t_eager / t_jit,
        "backend": jax.default_backend(),
        "jax": jax.__version__,
    }
    print(
        f"vmap(grad) unjitted: {t_eager * 1e3:.3f} ms   jit(vmap(grad)): {t_jit * 1e6:.1f} us   "
        f"ratio: {result['speedup']:.0f}x   ({result['backend']}, batch {args.batch})"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
