"""The training loop shared by fine-tuning and pre-training.

One optimizer step = ``grad_accum`` micro-batches on each of ``world_size`` ranks. The loss of a
step is the sum of each task term over all of them divided by that term's count over all of them
(counted before the forward pass and summed across ranks), so one process, several processes and
gradient accumulation give the same gradients up to float rounding. Checkpoints hold everything
needed to continue the same trajectory (see ``checkpoint.py``); data order depends only on
(seed, epoch), so resuming needs just the position.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from . import checkpoint as ckpt
from . import distributed as D
from .base import batches


@dataclass
class TrainConfig:
    """Hyper-parameters and run settings; every field is a ``bertkit finetune``/``pretrain`` option."""

    out: str
    epochs: int = 3
    batch_size: int = 16            # per process and micro-batch; global = batch_size * grad_accum * world
    lr: float = 5e-5
    grad_accum: int = 1
    warmup_ratio: float = 0.0
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0      # <= 0 turns clipping off
    seed: int = 42
    max_steps: int | None = None    # stop after this many optimizer steps (and size the schedule for it)
    save_every: int = 0             # also checkpoint every N steps (0 = only at epoch ends and the end)
    save_at_epoch_end: bool = True
    keep_checkpoints: int = 2
    resume: bool = False
    gradient_checkpointing: bool = False
    fsdp: bool = False
    precision: str = "auto"         # auto: bf16 (fp16 without bf16) autocast on GPU, fp32 on CPU
    device: str = "auto"
    eval_batch_size: int | None = None
    log_every: int = 10
    progress: bool = True

    def __post_init__(self):
        for name in ("epochs", "batch_size", "grad_accum", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.precision not in ("auto", "fp32", "bf16", "fp16"):
            raise ValueError(f"precision={self.precision!r}: use auto, fp32, bf16 or fp16")


class Objective(nn.Module):
    """The model and its task's loss as one module, so DDP/FSDP see every parameter the loss uses."""

    def __init__(self, model: nn.Module, task):
        super().__init__()
        self.model = model
        self.task = task

    def forward(self, batch: dict[str, torch.Tensor], predict: bool = False):
        outputs = self.task.forward(self.model, batch)
        return outputs if predict else self.task.loss_terms(outputs, batch)


class FeatureDataset:
    """Pre-tokenized features; a batch is the task's padded collation of the chosen indices."""

    def __init__(self, features: list[dict], task):
        self.features, self.task = features, task

    def __len__(self) -> int:
        return len(self.features)

    def batch(self, indices: list[int], epoch: int) -> dict[str, torch.Tensor]:
        return self.task.collate([self.features[i] for i in indices])


def linear_schedule(total: int, warmup: int):
    """LR factor: linear warm-up from 0 over ``warmup`` steps, then linear decay to 0 at ``total``."""
    def factor(step: int) -> float:
        if step < warmup:
            return step / warmup
        return max(0.0, (total - step) / max(1, total - warmup))
    return factor


def _amp(precision: str, device: torch.device) -> tuple[torch.dtype | None, bool]:
    if precision == "auto":
        if device.type != "cuda":
            return None, False
        return (torch.bfloat16, False) if torch.cuda.is_bf16_supported() else (torch.float16, True)
    if precision == "fp16" and device.type != "cuda":
        raise ValueError("precision fp16 needs a GPU; use bf16 or fp32 on CPU")
    return {"fp32": (None, False), "bf16": (torch.bfloat16, False), "fp16": (torch.float16, True)}[precision]


class Trainer:
    """Runs training; rank 0 logs to ``out/metrics.jsonl`` and writes checkpoints and models.

    Args:
        model: A bertkit task model (its parameters on the CPU; moved to the run's device here).
        task: Supplies ``forward``, ``loss_terms``, ``counts`` and optionally ``evaluate``.
        dataset: ``len()`` and ``batch(indices, epoch)``.
        config: Run settings.
        info: From :func:`distributed.setup`.
        eval_features: Evaluated at each epoch end (and at the end) when given.
        tokenizer: Saved next to exported models.
    """

    def __init__(self, model, task, dataset, config: TrainConfig, info: D.DistInfo,
                 eval_features: list[dict] | None = None, tokenizer=None):
        self.model, self.task, self.dataset, self.cfg, self.info = model, task, dataset, config, info
        self.eval_features, self.tokenizer = eval_features or [], tokenizer
        self.out = Path(config.out)
        self.amp_dtype, fp16 = _amp(config.precision, info.device)
        self.scaler = torch.amp.GradScaler("cuda", enabled=fp16)
        self.global_batch = config.batch_size * config.grad_accum * info.world_size
        self.steps_per_epoch = D.steps_per_epoch(len(dataset), self.global_batch)
        self.total_steps = config.max_steps or config.epochs * self.steps_per_epoch
        self.epoch = self.step_in_epoch = self.global_step = 0
        self.best: dict[str, Any] | None = None
        self.last_eval: dict[str, Any] | None = None

    # ------------------------------------------------------------------ setup
    def _build(self) -> None:
        cfg = self.cfg
        if cfg.gradient_checkpointing:
            self.model.gradient_checkpointing_enable()
        resume_from = ckpt.find_latest(self.out / "checkpoints") if cfg.resume else None
        if resume_from is not None:
            self._load_weights(resume_from)  # before wrapping: DDP/FSDP then spread these weights
        self.model.to(self.info.device).train()
        self.objective = Objective(self.model, self.task)
        layers = list(self.model.bert.encoder.layer) if hasattr(self.model, "bert") else []
        self.wrapped = D.wrap(self.objective, self.info, cfg.fsdp, layers)
        # No weight decay on biases and LayerNorm weights (the 1-d parameters), as in BERT.
        params = [p for p in self.wrapped.parameters() if p.requires_grad]
        groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay},
                  {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
        self.optimizer = torch.optim.AdamW(groups, lr=cfg.lr)
        warmup = math.ceil(cfg.warmup_ratio * self.total_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, linear_schedule(self.total_steps, warmup))
        if resume_from is not None:
            self._resume(resume_from)
        elif cfg.resume and self.info.is_main:
            print(f"bertkit train: no checkpoint in {self.out / 'checkpoints'}; starting from scratch", file=sys.stderr,
                  flush=True)

    def _load_weights(self, folder: Path) -> None:
        from ..checkpoints.io import load_state_dict

        result = self.model.load_state_dict(load_state_dict(folder), strict=False)
        loaded = {id(self.model.get_parameter(k)) for k in dict(self.model.named_parameters(remove_duplicate=False))
                  if k not in result.missing_keys}
        missing = [k for k in result.missing_keys if id(self.model.get_parameter(k)) not in loaded]
        if missing or result.unexpected_keys:
            raise ValueError(f"checkpoint {folder} does not fit the model: missing {missing}, unexpected "
                             f"{result.unexpected_keys}; resume with the same --model/--preset and task")

    def _resume(self, folder: Path) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        state, optimizer_state = ckpt.load_state(folder)
        if state["global_batch"] != self.global_batch or state["seed"] != self.cfg.seed:
            raise ValueError(f"{folder} was written with global batch {state['global_batch']} and seed {state['seed']}; "
                             f"this run has {self.global_batch} and {self.cfg.seed}. Resume with the same "
                             "--batch-size x --grad-accum x processes and --seed, or start a new --out")
        set_optimizer_state_dict(self.wrapped, self.optimizer, optimizer_state,
                                 options=StateDictOptions(full_state_dict=True))
        self.scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.epoch, self.step_in_epoch, self.global_step = state["epoch"], state["step_in_epoch"], state["global_step"]
        self.best = json.loads(state["best"]) if state.get("best") else None
        rngs = state["rng"]
        if len(rngs) != self.info.world_size and self.info.is_main:
            print(f"bertkit train: {folder} has RNG states of {len(rngs)} processes, this run has "
                  f"{self.info.world_size}; dropout masks will differ from the original run", file=sys.stderr,
                  flush=True)
        ckpt.set_rng_state(rngs[self.info.rank % len(rngs)])
        if self.info.is_main:
            self._truncate_metrics()
            print(f"bertkit train: resumed from {folder} (step {self.global_step})", file=sys.stderr, flush=True)

    # ------------------------------------------------------------------ the loop
    def train(self) -> dict[str, Any]:
        """Trains to ``total_steps``; returns a summary (steps, last and best evaluation, seconds)."""
        self._build()
        cfg, info = self.cfg, self.info
        if info.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "train_args.json").write_text(json.dumps(asdict(cfg), indent=2) + "\n", encoding="utf-8")
        bar = self._progress()
        started, seen, tokens, losses = time.perf_counter(), 0, 0, []
        while self.global_step < self.total_steps:
            micro = D.step_micro_batches(len(self.dataset), cfg.seed, self.epoch, self.step_in_epoch,
                                         cfg.batch_size, cfg.grad_accum, info)
            loss, n, t = self._step(micro)
            self.global_step += 1
            self.step_in_epoch += 1
            seen, tokens = seen + n, tokens + t
            losses.append(loss)
            epoch_end = self.step_in_epoch == self.steps_per_epoch
            if epoch_end:
                self.epoch, self.step_in_epoch = self.epoch + 1, 0
            done = self.global_step == self.total_steps
            rate = seen / max(1e-9, time.perf_counter() - started)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}", samples_s=f"{rate:.1f}")
            if len(losses) == cfg.log_every or done:
                self._log({"type": "train", "step": self.global_step, "epoch": self.epoch + self.step_in_epoch /
                           self.steps_per_epoch, "loss": float(np.mean(losses)), "lr": self.scheduler.get_last_lr()[0],
                           "samples_per_s": rate, "tokens_per_s": tokens / max(1e-9, time.perf_counter() - started)})
                losses = []
            if self.eval_features and (epoch_end or done):
                self._evaluate()
            if done or (cfg.save_every and self.global_step % cfg.save_every == 0) or (epoch_end and cfg.save_at_epoch_end):
                self._checkpoint()
            ckpt.maybe_crash("after-step", self.global_step)
        if bar is not None:
            bar.close()
        self._export(self.out / "final")
        return {"global_step": self.global_step, "eval": self.last_eval, "best": self.best,
                "seconds": time.perf_counter() - started}

    def _step(self, micro: list[list[int]]) -> tuple[float, int, int]:
        info = self.info
        # An empty micro-batch (end of epoch) runs on example 0 with weight 0: every rank must still
        # take part in the same forward/backward collectives.
        work = [(self.dataset.batch(idx or [0], self.epoch), 1.0 if idx else 0.0) for idx in micro]
        keys = sorted(self.task.counts(work[0][0]))
        local = torch.tensor([sum(self.task.counts(b)[k] * w for b, w in work) for k in keys], dtype=torch.float64)
        denominators = D.all_reduce_sum(local, info).clamp(min=1.0).tolist()
        sums = torch.zeros(len(keys), dtype=torch.float64)
        n = t = 0
        for i, (batch, weight) in enumerate(work):
            batch = {k: v.to(info.device, non_blocking=True) for k, v in batch.items()}
            with D.no_sync(self.wrapped, i == len(work) - 1):
                with self._autocast():
                    terms = self.wrapped(batch)
                # DDP and FSDP average gradients over ranks; multiplying by world_size undoes that, so
                # the result is the gradient of the global loss.
                loss = sum(terms[k].float() / d for k, d in zip(keys, denominators)) * (info.world_size * weight)
                self.scaler.scale(loss).backward()
            sums += torch.tensor([float(terms[k].detach()) * weight for k in keys], dtype=torch.float64)
            if weight:
                n += batch["input_ids"].shape[0]
                t += int(batch["attention_mask"].sum())
        totals = D.all_reduce_sum(sums, info)
        if self.cfg.max_grad_norm > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.wrapped.parameters(), self.cfg.max_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(sum(s / d for s, d in zip(totals.tolist(), denominators))), n, t

    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.info.device.type, dtype=self.amp_dtype)

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def predict(self, features: list[dict]) -> list[tuple[np.ndarray, ...]]:
        """Runs the model over features (sorted by length for less padding); outputs in input order.

        Every rank predicts everything (FSDP needs all ranks in each forward); fine for dev sets.
        """
        self.wrapped.eval()
        size = self.cfg.eval_batch_size or 2 * self.cfg.batch_size
        order = sorted(range(len(features)), key=lambda i: self.task.length(features[i]))
        outputs: list = [None] * len(features)
        for chunk in batches(order, size):
            batch = {k: v.to(self.info.device) for k, v in self.task.collate([features[i] for i in chunk]).items()}
            with self._autocast():
                arrays = [o.float().cpu().numpy() for o in self.wrapped(batch, predict=True)]
            for j, i in enumerate(chunk):
                outputs[i] = tuple(a[j] for a in arrays)
        self.wrapped.train()
        return outputs

    def _evaluate(self) -> None:
        metrics = self.task.evaluate(self.eval_features, self.predict(self.eval_features))
        self.last_eval = {"step": self.global_step, "epoch": self.epoch, **metrics}
        self._log({"type": "eval", **self.last_eval})
        value = metrics[self.task.main_metric]
        better = self.best is None or (value > self.best["value"] if self.task.greater_is_better
                                       else value < self.best["value"])
        if better:
            self.best = {"metric": self.task.main_metric, "value": value, "step": self.global_step}
            self._export(self.out / "best", metrics)

    # ------------------------------------------------------------------ output
    def _progress(self):
        if not (self.cfg.progress and self.info.is_main and sys.stderr.isatty()):  # no bar in logs
            return None
        from tqdm.auto import tqdm

        return tqdm(total=self.total_steps, initial=self.global_step, desc="train", unit="step", dynamic_ncols=True)

    def _log(self, record: dict[str, Any]) -> None:
        if not self.info.is_main:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        with open(self.out / "metrics.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if record["type"] == "eval":
            shown = ", ".join(f"{k}={v:.4f}" for k, v in record.items() if isinstance(v, float))
            print(f"bertkit train: step {record['step']} eval {shown}", file=sys.stderr, flush=True)

    def _truncate_metrics(self) -> None:
        # Lines logged after the checkpoint we resume from belong to the lost part of the run.
        path = self.out / "metrics.jsonl"
        if path.is_file():
            kept = [line for line in path.read_text(encoding="utf-8").splitlines(keepends=True)
                    if line.strip() and json.loads(line).get("step", 0) <= self.global_step]
            ckpt.atomic_write_bytes(path, "".join(kept).encode())

    def _full_state(self) -> dict[str, torch.Tensor] | None:
        """The unsharded model state dict (collective under FSDP; None means "use self.model")."""
        if not (self.info.enabled and self.cfg.fsdp):
            return None
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(self.wrapped, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return {k.removeprefix("model."): v for k, v in state.items()}

    def _save_model(self, folder: Path, state: dict[str, torch.Tensor] | None) -> None:
        if state is None:
            self.model.save_pretrained(folder)
            return
        # FSDP parameters are shards; save a CPU copy of the model built from the gathered tensors.
        with torch.device("meta"):
            clone = type(self.model)(copy.deepcopy(self.model.config))
        clone.load_state_dict(state, strict=False, assign=True)
        clone.tie_weights()
        clone.save_pretrained(folder)

    def _export(self, folder: Path, metrics: dict | None = None) -> None:
        state = self._full_state()
        if self.info.is_main:
            self._save_model(folder, state)
            if self.tokenizer is not None:
                self.tokenizer.save_pretrained(folder)
            if metrics is not None:
                ckpt.atomic_write_bytes(folder / "eval_metrics.json", (json.dumps(
                    {"step": self.global_step, **metrics}, indent=2) + "\n").encode())
        D.barrier(self.info)

    def _checkpoint(self) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        model_state = self._full_state()
        optimizer_state = get_optimizer_state_dict(self.wrapped, self.optimizer,
                                                   options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        rngs = D.gather_to_main(ckpt.rng_state(), self.info)
        if self.info.is_main:
            state = {"format": 1, "global_step": self.global_step, "epoch": self.epoch,
                     "step_in_epoch": self.step_in_epoch, "seed": self.cfg.seed, "global_batch": self.global_batch,
                     "world_size": self.info.world_size, "total_steps": self.total_steps,
                     "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(), "rng": rngs,
                     # JSON text: keeps the metric dict a primitive for weights_only loading.
                     "best": json.dumps(self.best) if self.best else ""}

            def write(tmp: Path) -> None:
                self._save_model(tmp, model_state)
                ckpt.write_state(tmp, self.global_step, state, optimizer_state)

            ckpt.save_checkpoint(self.out / "checkpoints", self.global_step, write, self.cfg.keep_checkpoints)
        D.barrier(self.info)

