"""The application: typed configs, building a run from one, the training loop, evaluation,
checkpoints, multi-host set-up, run records and figures. Hydra-free: ``experiments/`` is the
Hydra front end, and a library user calls :func:`train` with a :class:`Config` directly."""

from metagrad.experiment.config import Config, ConfigError, validate
from metagrad.experiment.loop import Experiment, NonFiniteLoss, train

__all__ = ["Config", "ConfigError", "Experiment", "NonFiniteLoss", "train", "validate"]
