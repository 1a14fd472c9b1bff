"""Training: fine-tuning for every task head, MLM/NSP pre-training, torchrun (DDP/FSDP2), exact resume.

Python API::

    from bertkit.train import finetune, pretrain
    finetune("classify", "train.csv", "dev.csv", out="runs/cls", epochs=3)
    pretrain("corpus.txt", out="runs/mlm", preset="bert-tiny", steps=10_000, nsp=True)

Command line: ``bertkit finetune ...`` / ``bertkit pretrain ...``, or ``python -m bertkit.train
finetune ...`` (what ``torchrun -m bertkit.train`` runs). See ``docs/training.md``.
"""

from .finetuning import finetune
from .metrics import entity_scores, get_entities, normalize_answer, squad_scores
from .pretraining import pretrain

__all__ = ["finetune", "pretrain", "entity_scores", "get_entities", "normalize_answer", "squad_scores"]
