"""The prepared device scripts, run from the checkout's root as ``python -m experiments.gpu.<name>``
(the device machine gets the repository, not an installed package).

- `experiments.gpu.omniglot`: the Omniglot 5-way 1-shot preset end to end within a time budget.
- `experiments.gpu.benchmark`: the speed table with the PyTorch peers on the same GPU.
- ``experiments/gpu/peer_on_device.py``: runs one peer script on a torch device (started by its
  path under the peers' interpreter).
- ``experiments/gpu/prepare.sh``: fills ``.gpu_carry/`` here with what those need there.
"""
