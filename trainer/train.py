"""The trainer's entry point: ``train(cfg)`` (the CLI, the demo and the tests call it).

The loop of one rank is ``trainer/loop.py``, checkpoints and the run's result ``trainer/checkpoint.py``,
and the launchers (in-process, torchrun, Ray Train) ``trainer/launch.py``.
"""

from __future__ import annotations

from pairsift.trainer.checkpoint import TrainResult
from pairsift.trainer.launch import TINY_MODEL, train, train_on_shards

__all__ = ["TINY_MODEL", "TrainResult", "train", "train_on_shards"]
