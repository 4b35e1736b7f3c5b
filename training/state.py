"""What one training process holds: the models, optimizer, EMAs and the counters a checkpoint restores.

Its own module so that the loop, the step, checkpointing and FSDP sharding all name the type without
importing one another (training/loop.py builds it).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from selfflow.configs.factory import TextConditioner
from selfflow.configs.schema import Config
from selfflow.data.pipeline import DataPipeline, WorkerPipeline
from selfflow.tokenizers.media import MediaTokenizer
from selfflow.training.distributed import SINGLE, Dist
from selfflow.training.ema import EMA
from selfflow.training.objectives import Models


@dataclass
class Trainer:
    """Everything one process trains with, plus the counters a checkpoint restores."""

    cfg: Config
    device: torch.device
    models: Models
    ema: EMA  # the evaluation model
    teacher_ema: EMA  # the Self-Flow / SRA teacher: `ema` itself unless train.teacher_decay >= 0
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    generator: torch.Generator  # every draw of the objective, on the training device
    media: MediaTokenizer
    encode_text: TextConditioner
    step: int = 0
    samples_seen: int = 0
    task_samples: dict[str, int] = field(default_factory=dict)  # samples seen per task
    skipped: int = 0  # bad samples the data pipeline has skipped so far
    nonfinite: int = 0  # steps not applied because the loss or a gradient was NaN / Inf
    nonfinite_streak: int = 0  # of them, consecutive up to the last step (> 0: the last was one)
    data: DataPipeline | WorkerPipeline | None = None  # set by train(); its position is checkpointed
    dist: Dist = SINGLE  # this process's rank among `world` (training/distributed.py)
    engine: Any = None  # the DeepSpeed engine over student + head (dist.engine=deepspeed)
    ddp: Any = None  # DistributedDataParallel over student + head (dist.engine=ddp, several processes)
