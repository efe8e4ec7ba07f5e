"""The one map from a YAML's `env_type` to its Backend (kept apart so distributed.py and the BMTrain backend,
which builds on it, do not import each other)."""

from aquila.train.bmtrain_backend import BMTrainBackend
from aquila.train.config import TrainConfig
from aquila.train.distributed import Backend, DDPBackend, DistEnv, FSDPBackend

BACKENDS: dict[str, type[Backend]] = {
    "pytorch": Backend,
    "pytorchDDP": DDPBackend,
    "fsdp": FSDPBackend,
    "bmtrain": BMTrainBackend,
}


def make_backend(env: DistEnv, cfg: TrainConfig) -> Backend:
    return BACKENDS[env.env_type](env, cfg)
