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
# # 2. MAML on sinusoid regression
#
# MAML (Finn et al. 2017) learns an initialisation $\theta$ from which one SGD step on a few
# examples of a new task already fits it well. The inner step is an ordinary differentiable
# function, so the meta-gradient is `jax.grad` of the query loss taken after a `jax.grad` step:
#
# $$\mathcal{L}(\theta) = L\big(\theta - \alpha \nabla L(\theta; S);\ Q\big)$$
#
# for a task's support set $S$ and query set $Q$. Its gradient contains the support-loss Hessian,
# $(I - \alpha H)^\top \nabla L(\phi; Q)$; first-order MAML drops the $\alpha H$ term.
#
# This notebook meta-trains the Finn et al. model (an MLP with two hidden layers of 40 ReLU units)
# on sinusoids $y = A \sin(x - \varphi)$ with the library API: `metagrad.tasks.sinusoid` samples
# tasks, `metagrad.nn` turns a Flax model into `(params, apply)`, `mg.maml` / `mg.fomaml` estimate
# the meta-gradient and `mg.meta_learner` applies it with an optax optimizer.

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
meta_steps = 5000  # meta-training steps (the paper used 70,000)
meta_batch = 25  # tasks per meta-step
shots = 10  # support examples per task (K)
inner_lr = 0.01  # alpha
outer_lr = 1e-3  # Adam's learning rate on theta
eval_tasks = 600  # held-out test tasks
eval_steps = 10  # inner steps at test time (the curve is shown up to here)
fd_directions = 20  # random directions for the finite-difference check of the meta-gradient
seed = 0

# %% [markdown]
# ## Model, loss and tasks
#
# `nn.functional` splits the Flax module once into a params dict and a pure `apply`, so the loss
# is a plain function `loss_fn(params, (x, y))` that JAX can differentiate to any order.

# %%
params, apply = nn.functional(nn.MLP(1, (40, 40), 1, rngs=nnx.Rngs(seed)))
loss_fn = nn.mse_loss(apply)
print({name: {k: v.shape for k, v in layer.items()} for name, layer in params.items()})

task = sinusoid.sample_task(jax.random.key(seed), shots=shots, query=shots)
print("support x, y:", task.support[0].shape, task.support[1].shape)

# %% [markdown]
# ## Meta-training
#
# `mg.meta_learner(loss_fn, estimator, optimizer)` is an `(init, update)` pair: `update(state,
# tasks)` averages the estimator's meta-gradient over a batch of tasks (a leading task axis) and
# applies the optimizer. What it learns is a `mg.MetaParams(params, lr=None)`: the initial
# parameters and, for estimators that meta-learn them (Meta-SGD, MAML++), the inner rates; its
# meta-gradients come back in the same form. We scan it over the meta-steps inside one compiled
# function, sampling the tasks on the device from the step's key.


# %%
def meta_train(estimator, key):
    learner = mg.meta_learner(loss_fn, estimator, optax.adam(outer_lr), jit=False)

    @jax.jit
    def run(meta_params, keys):
        def step(state, k):
            tasks = sinusoid.sample_batch(k, meta_batch, shots=shots, query=shots)
            state, metrics = learner.update(state, tasks)
            return state, metrics["meta_loss"]

        return jax.lax.scan(step, learner.init(meta_params), keys)

    state, losses = run(mg.MetaParams(params), jax.random.split(key, meta_steps))
    return state.meta_params.params, np.asarray(losses)


train_key = jax.random.key(seed + 1)
theta_maml, losses_maml = meta_train(mg.maml(steps=1, lr=inner_lr), train_key)
theta_fomaml, losses_fomaml = meta_train(mg.fomaml(steps=1, lr=inner_lr), train_key)


def smooth(x):
    n = max(len(x) // 50, 1)
    return np.convolve(x, np.ones(n) / n, mode="valid")


plt.figure(figsize=(6, 3))
plt.plot(smooth(losses_maml), label="MAML")
plt.plot(smooth(losses_fomaml), label="first-order MAML")
plt.xlabel("meta-step")
plt.ylabel("query MSE after 1 step")
plt.yscale("log")
plt.legend()
plt.show()

# %% [markdown]
# ## Evaluation on held-out tasks
#
# Test tasks come from a fixed key of their own. For each, `mg.adapt` runs the inner loop on
# the support set and we measure the query loss after 0, 1, ..., `eval_steps` steps.

# %%
test_tasks = sinusoid.sample_batch(sinusoid.heldout_key("test"), eval_tasks, shots=shots, query=100)


@jax.jit
def loss_curve(theta, tasks):
    def one(task):
        adapted = [theta]
        for _ in range(eval_steps):
            adapted.append(mg.adapt(loss_fn, adapted[-1], task.support, steps=1, lr=inner_lr))
        return jnp.stack([loss_fn(p, task.query) for p in adapted])

    return jnp.mean(jax.vmap(one)(tasks), axis=0)


curves = {
    "untrained": np.asarray(loss_curve(params, test_tasks)),
    "MAML": np.asarray(loss_curve(theta_maml, test_tasks)),
    "first-order MAML": np.asarray(loss_curve(theta_fomaml, test_tasks)),
}
for name, c in curves.items():
    print(f"{name:>17}: test MSE before {c[0]:.3f}, after 1 step {c[1]:.3f}, ", end="")
    print(f"after {eval_steps} steps {c[-1]:.3f}")

# %% [markdown]
# ## Adaptation before and after meta-training
#
# One test task: the meta-learned initialisation is not a fit of any one sinusoid, but a single
# gradient step on the support points moves it towards the task's curve. From the untrained
# initialisation the same step does not (on average it even overshoots: see the test MSE above).

# %%
plot_key = jax.random.key(seed + 3)
plot_task, (amplitude, phase) = sinusoid.sample_task(
    plot_key, shots=shots, query=1, return_params=True
)
adapt = jax.jit(
    lambda theta, steps: mg.adapt(loss_fn, theta, plot_task.support, steps=steps, lr=inner_lr),
    static_argnums=1,
)
predict = jax.jit(apply)
grid = jnp.linspace(-5, 5, 200)[:, None]

fig, axes = plt.subplots(1, 2, figsize=(10, 3.5), sharey=True)
for ax, (title, theta) in zip(axes, [("untrained", params), ("MAML", theta_maml)], strict=True):
    ax.plot(grid, amplitude * jnp.sin(grid - phase), "k", label="true function")
    ax.plot(*plot_task.support, "k^", label=f"{shots} support points")
    ax.plot(grid, predict(theta, grid), ":", label="before adaptation")
    ax.plot(grid, predict(adapt(theta, 1), grid), "--", label="after 1 step")
    ax.plot(grid, predict(adapt(theta, eval_steps), grid), label=f"after {eval_steps} steps")
    ax.set_title(title)
axes[0].legend(fontsize=8)
plt.show()

# %% [markdown]
# ## Is the meta-gradient right?
#
# `mg.check_meta_grad` compares an estimator's meta-gradient with float64 central finite
# differences of its meta-objective along random directions and returns the relative error.
# Second-order MAML matches to rounding error. First-order MAML's error is the relative size of
# the Hessian term it drops: a meta-gradient that is silently first-order shows up here.

# %%
one_task = sinusoid.sample_task(jax.random.key(seed + 2), shots=shots, query=shots)
check = lambda est: mg.check_meta_grad(
    est, loss_fn, mg.MetaParams(theta_maml), one_task, num_directions=fd_directions
)
err_maml = check(mg.maml(steps=1, lr=inner_lr))
err_fomaml = check(mg.fomaml(steps=1, lr=inner_lr))
print(f"relative error vs finite differences: MAML {err_maml:.1e}, first-order {err_fomaml:.1e}")

# %% [markdown]
# ## Checks

# %%
for name in ("MAML", "first-order MAML"):
    assert curves[name][1] < curves[name][0], f"{name}: one step did not lower the test loss"
    assert curves[name][1] < curves["untrained"][1], f"{name}: meta-training did not help"
assert err_maml < 1e-5, err_maml
assert err_fomaml > 100 * err_maml, (err_fomaml, err_maml)
print("all checks passed")
