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
# # 6. Few-shot Omniglot
#
# Omniglot (Lake et al. 2015) has 1,623 handwritten characters from 50 alphabets, 20 drawings of
# each. An N-way K-shot task shows K drawings of each of N new characters (the support set) and
# asks for the class of other drawings of them (the query set). Following Finn et al. (2017), a
# class is a character turned by a multiple of 90 degrees, the splits are over characters, and
# the model is the Conv4 network (four 3x3 convolutions with batch norm).
#
# The data are the two official zips, `images_background.zip` and `images_evaluation.zip`; the
# loader never downloads. It looks in `data_dir`, or `$METAGRAD_DATA/omniglot`, or
# `../shared/data/omniglot` next to the repository, and caches the 28x28 arrays (in
# `$METAGRAD_CACHE`, default `~/.cache/metagrad`).

# %%
import os
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax
from flax import nnx

import metagrad as mg
from metagrad import nn
from metagrad.tasks import omniglot

# %% tags=["parameters"]
data_dir = None  # None: $METAGRAD_DATA/omniglot, else ../shared/data/omniglot beside the repo
ways, shots = 5, 1  # 5-way 1-shot
query = 5  # query drawings per class while meta-training
hidden = 64  # Conv4 filters (64 in the paper)
meta_steps = 1000  # about 90% test accuracy after 1,000 steps; the paper trains for 60,000
meta_batch = 8  # tasks per meta-step (32 in the paper)
inner_lr = 0.4  # Finn et al.'s Omniglot inner rate, one step in training
outer_lr = 1e-3
eval_inner_steps = 3  # inner steps at test time
eval_query = 15  # query drawings per class at test time
eval_tasks = 200  # meta-test tasks
log_every = 100
seed = 0

# %% [markdown]
# ## Loading the data and sampling a task


# %%
def find_data_dir():
    if data_dir is not None:
        return Path(data_dir).expanduser()
    if os.environ.get("METAGRAD_DATA"):
        return Path(os.environ["METAGRAD_DATA"]) / "omniglot"
    for repo in (Path.cwd(), Path.cwd().parent):  # opened from the repo root or notebooks/
        candidate = repo.parent / "shared" / "data" / "omniglot"
        if (candidate / "images_background.zip").is_file():
            return candidate
    raise FileNotFoundError(
        "Omniglot not found: set data_dir, or METAGRAD_DATA so that $METAGRAD_DATA/omniglot holds "
        "images_background.zip and images_evaluation.zip"
    )


splits = omniglot.omniglot_splits(find_data_dir())
for name, images in splits.items():
    print(f"{name:>5}: {images.shape[0]:4d} characters, {images.dtype} array {images.shape}")

# %%
sampler = omniglot.make_sampler(splits["train"], ways=ways, shots=shots, query=query)
task = sampler.sample(jax.random.key(seed))
(xs, ys), (xq, yq) = task
print("support", xs.shape, ys.tolist(), " query", xq.shape)

columns = shots + min(query, 5)
fig, axes = plt.subplots(ways, columns, figsize=(1.2 * columns, 1.2 * ways))
for c in range(ways):
    row = [*xs[ys == c][:shots], *xq[yq == c][: columns - shots]]
    for j, image in enumerate(row):
        axes[c, j].imshow(image[..., 0], cmap="gray_r")
        axes[c, j].set_xticks([])
        axes[c, j].set_yticks([])
    axes[c, 0].set_ylabel(f"class {c}")
axes[0, 0].set_title("support")
axes[0, shots].set_title("query")
plt.show()

# %% [markdown]
# ## Meta-training
#
# Second-order MAML with one inner step, an Adam outer step, and the query accuracy before and
# after adaptation as metrics (`nn.accuracy`). Batch norm uses the statistics of the batch it
# normalises (the original MAML's transductive setting; see `nn.MetaBatchNorm` for the others).
# The split's images are an argument of the compiled step, and every meta-batch is sampled on the
# device from the step's key.
#
# The loop is the one `metagrad.experiment.train` (the CLI) runs: `log_every` meta-steps per
# compiled call, a `lax.scan` over their keys, so Python only sees one call per chunk. The tasks
# of a meta-batch go through `lax.map` on CPU (`mg.default_task_batching`): under `vmap` a
# convolution with per-task weights becomes a grouped convolution, which CPU XLA runs slowly
# (about 4x slower here); GPUs run it well and get `vmap`.

# %%
params, apply = nn.functional(nn.Conv4(1, ways, hidden=hidden, rngs=nnx.Rngs(seed)))
loss_fn = nn.cross_entropy_loss(apply)
estimator = mg.maml(steps=1, lr=inner_lr, metrics_fn=nn.accuracy(apply))
task_batching = mg.default_task_batching(convolutional=True)  # "map" on CPU, "vmap" on GPU
learner = mg.meta_learner(
    loss_fn, estimator, optax.adam(outer_lr), jit=False, task_batching=task_batching
)
print(f"Conv4 with {sum(p.size for p in jax.tree.leaves(params)):,} parameters")


def meta_step(state, images, key):
    keys = jax.random.split(key, meta_batch)
    sample = lambda k: omniglot.sample_task(images, k, ways=ways, shots=shots, query=query)
    return learner.update(state, jax.vmap(sample)(keys))


@jax.jit
def meta_chunk(state, images, keys):
    """``len(keys)`` meta-steps in one compiled call; the metrics of each step come back."""
    return jax.lax.scan(lambda s, k: meta_step(s, images, k), state, keys)


train_images = jnp.asarray(splits["train"])
state = learner.init(mg.MetaParams(params))
step_keys = jax.random.split(jax.random.key(seed + 1), meta_steps)
done, start = 0, time.perf_counter()
while done < meta_steps:
    n = min(log_every, meta_steps - done)
    state, metrics = meta_chunk(state, train_images, step_keys[done : done + n])
    done += n
    recent = {k: float(np.mean(v)) for k, v in jax.device_get(metrics).items()}
    print(
        f"step {done:5d}  loss {recent['meta_loss']:.3f}  query accuracy before "
        f"{recent['acc_pre']:.3f} after {recent['acc_post']:.3f}  "
        f"({done / (time.perf_counter() - start):.1f} steps/s, compilation included)"
    )
theta = state.meta_params.params

# %% [markdown]
# ## Meta-test: accuracy before and after adaptation
#
# New characters (the test split), `eval_query` query drawings per class, and `eval_inner_steps`
# inner steps from the meta-learned initialisation. `estimator.adapt` runs the estimator's own
# inner loop (its rate, mask and optimizer) for another number of steps, so training and testing
# cannot adapt differently. Before adaptation the head has not seen the task's labels, so its
# accuracy is chance, $1/N$.

# %%
test_images = jnp.asarray(splits["test"])


@jax.jit
def evaluate(theta, images, key):
    def one(k):
        task = omniglot.sample_task(images, k, ways=ways, shots=shots, query=eval_query)
        acc = nn.accuracy(apply)
        meta_params = mg.MetaParams(theta)
        adapted = estimator.adapt(loss_fn, meta_params, task.support, steps=eval_inner_steps)
        return acc(theta, task.query)["acc"], acc(adapted, task.query)["acc"]

    return jax.lax.map(one, jax.random.split(key, eval_tasks))  # one task at a time: less memory


acc = {}
for name, p in (("untrained", params), ("meta-trained", theta)):
    pre, post = (np.asarray(a) for a in evaluate(p, test_images, jax.random.key(seed + 2)))
    ci = lambda a: 1.96 * a.std(ddof=1) / np.sqrt(len(a))
    acc[name] = (pre.mean(), post.mean())
    print(
        f"{name:>12}: accuracy before adaptation {pre.mean():.3f} +- {ci(pre):.3f}, "
        f"after {eval_inner_steps} steps {post.mean():.3f} +- {ci(post):.3f}"
    )

# %% [markdown]
# ## Checks

# %%
chance = 1 / ways
pre, post = acc["meta-trained"]
assert abs(pre - chance) < 0.1, pre  # the initialisation cannot know the task's labels
assert post > chance + 0.15, post  # adaptation works
assert post > acc["untrained"][1], (post, acc["untrained"])  # and meta-training helped it
print("all checks passed")
