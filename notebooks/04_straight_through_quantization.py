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
# # 4. Straight-through estimators and quantized layers
#
# Rounding is flat almost everywhere, so its gradient is zero and nothing upstream of it learns.
# The straight-through estimator (Bengio et al. 2013) keeps the rounded value in the forward pass
# and pretends the function was the identity in the backward pass. JAX's tutorial writes it with
# `stop_gradient`, and `mg.straight_through(f)` is exactly that:
#
# $$g(x) = \big(x - \operatorname{sg}(x)\big) + \operatorname{sg}\big(f(x)\big).$$
#
# Forward, $x - x$ is exactly zero, so $g(x) = f(x)$ bit for bit; backward, $g'(x) = 1$ and every
# higher derivative is zero. Because it is an ordinary JAX expression (not a `custom_vjp`), its
# derivatives of every order are consistent, which second-order MAML relies on.

# %%
import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax
from flax import nnx

import metagrad as mg
from metagrad import nn
from metagrad.tasks import sinusoid

# %% tags=["parameters"]
meta_steps = 5000  # meta-training steps per bit width
meta_batch = 25  # tasks per meta-step
bits_sweep = (8, 4, 2, 1)  # weight bits of the inner layer(s); float32 is always included
shots = 10
inner_lr = 0.01
outer_lr = 1e-3
eval_tasks = 600
seed = 0

# %% [markdown]
# ## Rounding with and without the straight-through estimator

# %%
st_round = mg.straight_through(jnp.round)
x = jnp.array([0.4, 1.6, -2.5, 3.2])
value_plain, grad_plain = jnp.round(x), jax.grad(lambda x: jnp.sum(jnp.round(x)))(x)
value_st, grad_st = st_round(x), jax.grad(lambda x: jnp.sum(st_round(x)))(x)
print("round(x):              ", value_plain, " gradient", grad_plain)
print("straight_through(round)", value_st, " gradient", grad_st)

# %% [markdown]
# `metagrad.quant` builds fake quantizers on the same idea: `mg.quant.uniform(w, bits)` rounds
# onto a symmetric grid of $2^b - 1$ levels scaled by $\max|w|$ (binary $\pm$ mean $|w|$ for one
# bit) and has gradient one.

# %%
w = jax.random.normal(jax.random.key(seed), (6,))
for b in (8, 2, 1):
    print(f"{b} bits:", np.round(np.asarray(mg.quant.uniform(w, b)), 3))
print("gradient:", jax.grad(lambda w: jnp.sum(mg.quant.uniform(w, 2)))(w))

# %% [markdown]
# ## Low-bit MAML on sinusoid regression
#
# `nn.QuantMLP` keeps full-precision latent weights (the parameters that MAML adapts and
# meta-learns) and quantizes them in every forward pass. As is common practice, its first layer
# and head stay at 8 bits (`edge_bits`) and `weight_bits` applies to the layers in between.
# Each bit width is meta-trained with second-order MAML exactly as in notebook 2.


# %%
def make_model(bits):
    if bits is None:  # the float32 reference: same class, quantization off
        return nn.QuantMLP(1, (40, 40), 1, weight_bits=None, edge_bits=None, rngs=nnx.Rngs(seed))
    return nn.QuantMLP(1, (40, 40), 1, weight_bits=bits, rngs=nnx.Rngs(seed))


test_tasks = sinusoid.sample_batch(sinusoid.heldout_key("test"), eval_tasks, shots=shots, query=100)


def meta_train_and_test(bits):
    model = make_model(bits)
    params, apply = nn.functional(model)
    loss_fn = nn.mse_loss(apply)
    learner = mg.meta_learner(
        loss_fn, mg.maml(steps=1, lr=inner_lr), optax.adam(outer_lr), jit=False
    )

    @jax.jit
    def run(meta_params, keys, tasks):
        def step(state, k):
            batch = sinusoid.sample_batch(k, meta_batch, shots=shots, query=shots)
            return learner.update(state, batch)[0], None

        state, _ = jax.lax.scan(step, learner.init(meta_params), keys)
        theta = state.meta_params.params

        def test(task):
            adapted = mg.adapt(loss_fn, theta, task.support, steps=1, lr=inner_lr)
            return loss_fn(theta, task.query), loss_fn(adapted, task.query)

        pre, post = jax.vmap(test)(tasks)
        return theta, jnp.mean(pre), jnp.mean(post)

    keys = jax.random.split(jax.random.key(seed + 1), meta_steps)
    theta, pre, post = run(mg.MetaParams(params), keys, test_tasks)
    return {"model": model, "init": params, "theta": theta, "pre": float(pre), "post": float(post)}


results = {bits: meta_train_and_test(bits) for bits in (None, *bits_sweep)}
label = lambda bits: "float32" if bits is None else f"{bits}-bit"
for bits, r in results.items():
    print(f"{label(bits):>8}: test MSE before {r['pre']:.3f}, after 1 step {r['post']:.3f}")

# %% [markdown]
# The latent weights are full precision; what the forward pass sees is their quantized value.
# The inner layer's kernel, quantized, takes at most $2^b - 1$ distinct values ($2$ for one bit):

# %%
levels = {}
for bits, r in results.items():
    quantized = r["model"].hidden_1.quantize_weight(r["theta"]["hidden_1"]["kernel"])
    levels[bits] = len(np.unique(np.asarray(quantized)))
    print(f"{label(bits):>8}: {levels[bits]:5d} distinct weights in hidden_1")

# %% [markdown]
# ## Bits versus test error

# %%
sweep = sorted(bits_sweep)
plt.figure(figsize=(5, 3))
plt.plot(sweep, [results[b]["post"] for b in sweep], "o-", label="quantized inner layer")
plt.axhline(results[None]["post"], color="k", ls="--", label="float32")
plt.xticks(sweep)
plt.xlabel("weight bits")
plt.ylabel("test MSE after 1 step")
plt.yscale("log")
plt.legend()
plt.show()

# %% [markdown]
# ## Checks

# %%
np.testing.assert_array_equal(value_st, value_plain)  # the same forward values, bit for bit
np.testing.assert_array_equal(grad_plain, np.zeros(4))
np.testing.assert_array_equal(grad_st, np.ones(4))
for bits, r in results.items():
    assert np.isfinite([r["pre"], r["post"]]).all(), (bits, r["pre"], r["post"])
    moved = np.abs(r["theta"]["hidden_1"]["kernel"] - r["init"]["hidden_1"]["kernel"]).max()
    assert moved > 0, f"{label(bits)}: the latent weights did not learn"  # gradients got through
    if bits is not None:
        assert levels[bits] <= (2 if bits == 1 else 2**bits - 1), (bits, levels[bits])
for bits in (None, 8):
    if bits in results:  # float and 8-bit adapt like the float model of notebook 2
        assert results[bits]["post"] < results[bits]["pre"], label(bits)
print("all checks passed")
