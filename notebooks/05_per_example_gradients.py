# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 5. Per-example gradients
#
# `jax.grad` of a mean loss gives the batch gradient; some methods need each example's gradient
# separately: DP-SGD clips every example's gradient before averaging, gradient-noise and
# influence estimates use their spread. JAX's tutorial composes three transformations for it,
# `jit(vmap(grad(loss), in_axes=(None, 0, 0)))`: `grad` differentiates one example's loss,
# `vmap` maps it over the batch axis of the data (not of the parameters, hence `None`) and `jit`
# compiles the whole thing into one program. `mg.per_example_grads(loss, in_axes)` is that
# composition; `mg.clip_per_example(grads, c)` scales each example's gradient to norm at most
# $c$.

# %%
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import metagrad as mg
from metagrad import nn

# %% tags=["parameters"]
batch = 256  # examples
features = 128  # input width of the MLP
hidden = 256  # its hidden width
clip_norm = 1.0  # DP-SGD's per-example clipping norm c
repeats = 10  # timing repetitions (the best is reported)
seed = 0

# %% [markdown]
# ## A model and a per-example loss
#
# The loss takes one example (no batch axis); `vmap` adds the batch axis.

# %%
params, apply = nn.functional(nn.MLP(features, (hidden,), 1, rngs=nnx.Rngs(seed)))
k_x, k_y = jax.random.split(jax.random.key(seed))
xs = jax.random.normal(k_x, (batch, features))
ys = jax.random.normal(k_y, (batch,))


def example_loss(params, x, y):
    return (apply(params, x[None])[0, 0] - y) ** 2


grads = mg.per_example_grads(example_loss, in_axes=(None, 0, 0))(params, xs, ys)
print({name: {k: g.shape for k, g in layer.items()} for name, layer in grads.items()})

# %% [markdown]
# ## The oracle: a Python loop of `grad`
#
# The same gradients one example at a time. Their mean must also be the gradient of the mean loss.

# %%
grad_one = jax.jit(jax.grad(example_loss))
loop = [grad_one(params, xs[i], ys[i]) for i in range(batch)]
loop = jax.tree.map(lambda *g: jnp.stack(g), *loop)


def max_rel_diff(a, b):
    """Largest entry of |a - b| over the largest entry of |b|, over all leaves."""
    pairs = zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    return max(float(jnp.max(jnp.abs(x - y)) / jnp.max(jnp.abs(y))) for x, y in pairs)


batch_loss = lambda p: jnp.mean(jax.vmap(example_loss, (None, 0, 0))(p, xs, ys))
batch_grad = jax.jit(jax.grad(batch_loss))(params)
max_diff = max_rel_diff(grads, loop)
mean_diff = max_rel_diff(jax.tree.map(lambda g: jnp.mean(g, axis=0), grads), batch_grad)
print(f"relative differences: vmap vs loop {max_diff:.1e}, mean vs batch gradient {mean_diff:.1e}")

# %% [markdown]
# ## Clipping each example's gradient (DP-SGD)
#
# $g_b \leftarrow g_b \min(1, c / \|g_b\|_2)$, with the norm over all parameters of example $b$.

# %%
norms = mg.per_example_grad_norms(grads)
clipped = mg.clip_per_example(grads, clip_norm)
clipped_norms = mg.per_example_grad_norms(clipped)
print(f"per-example norms: median {float(jnp.median(norms)):.3f}, max {float(norms.max()):.3f}")
print(f"after clipping at {clip_norm}: max {float(clipped_norms.max()):.3f}")

# %% [markdown]
# ## What `jit` buys
#
# Without `jit`, `vmap(grad(...))` runs operation by operation, each a separate dispatch from
# Python; with it, XLA compiles and fuses the whole computation once. The gain is largest when
# the operations are small (dispatch dominates) and shrinks when large matrix products dominate.
# Timed here, on this machine, after a warm-up call (best of `repeats`).


# %%
def best_time(fn, *args):
    jax.block_until_ready(fn(*args))  # compile / warm up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t)
    return min(times)


unjitted = jax.vmap(jax.grad(example_loss), in_axes=(None, 0, 0))
jitted = mg.per_example_grads(example_loss, in_axes=(None, 0, 0))
t_unjitted = best_time(unjitted, params, xs, ys)
t_jitted = best_time(jitted, params, xs, ys)
print(f"vmap(grad):      {t_unjitted * 1e3:8.3f} ms")
print(f"jit(vmap(grad)): {t_jitted * 1e3:8.3f} ms   ({t_unjitted / t_jitted:.1f}x faster)")

# %% [markdown]
# ## Checks

# %%
assert max_diff < 1e-5, max_diff
assert mean_diff < 1e-5, mean_diff
loop_norms = mg.per_example_grad_norms(loop)
np.testing.assert_allclose(norms, loop_norms, rtol=1e-5, atol=1e-5 * float(loop_norms.max()))
for c in (clip_norm, float(jnp.median(norms))):  # the median puts examples on both sides
    after = np.asarray(mg.per_example_grad_norms(mg.clip_per_example(grads, c)))
    inside = np.asarray(norms) <= c  # these are left as they are, the others scaled to norm c
    np.testing.assert_allclose(after[inside], np.asarray(norms)[inside], rtol=1e-6)
    np.testing.assert_allclose(after[~inside], c, rtol=1e-5)
print("all checks passed")
