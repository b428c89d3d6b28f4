"""Training: one loop (`loop`) for the diffusion trainer (`diffusion`) and the autoencoder trainer (`vae`)."""

from lddpm.seeding import step_seed
from lddpm.train.diffusion import DiffusionTrainer, train
from lddpm.train.ema import EMA
from lddpm.train.loop import TrainingLoop
from lddpm.train.utils import (StopSignal, check_names, check_run_dir, lr_at, network_overrides,
                               use_deterministic_kernels)
from lddpm.train.vae import VAETrainer, train_vae

__all__ = ["DiffusionTrainer", "EMA", "StopSignal", "TrainingLoop", "VAETrainer", "check_names", "check_run_dir", "lr_at",
           "network_overrides", "step_seed", "train", "train_vae", "use_deterministic_kernels"]
