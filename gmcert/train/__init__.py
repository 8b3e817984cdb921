"""Training noise-robust bases for randomized smoothing: ``gmcert train``.

Methods ``gaussian``, ``consistency`` and ``crt`` (:mod:`gmcert.train.losses`), latent shaping as an
option of any of them, seeded epochs with exact resume (:mod:`gmcert.train.loop`), safetensors
checkpoints (:mod:`gmcert.train.checkpoint`), teachers (:mod:`gmcert.train.teacher`), and the
workflow that writes an ordinary gmcert model directory (:mod:`gmcert.train.workflow`).
"""
from gmcert.train.loop import TrainConfig, train_network
from gmcert.train.workflow import build_student, train_model

__all__ = ["TrainConfig", "build_student", "train_model", "train_network"]
