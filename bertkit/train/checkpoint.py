"""Training checkpoints that survive a crash at any moment, and exact resume.

Layout under ``OUT/checkpoints``::

    step-00000200/         one complete checkpoint (also a model folder: from_pretrained loads it)
        config.json, model.safetensors
        optimizer.pt       full (unsharded) optimizer state, keyed by parameter name
        trainer_state.pt   scheduler, grad scaler, RNG states of every rank, data position
        trainer_state.json the same position and settings, for people
    latest                 the name of the newest complete checkpoint

A checkpoint is written into ``.tmp-step-...`` and renamed with ``os.replace`` only when every file
is on disk (fsynced); then ``latest`` is replaced atomically. A crash at any point leaves the
previous checkpoint and a ``latest`` that names it; the orphan temp folder is removed by the next
save. Everything in the ``.pt`` files is a tensor or a Python primitive, so they load with
``torch.load(weights_only=True)``: no pickle code runs on resume.

Testing hook: the environment variable ``BERTKIT_TRAIN_CRASH`` set to ``during-save:N`` makes the
process SIGKILL itself halfway through writing the checkpoint of step N, and ``after-step:N`` right
after step N (and its checkpoint, if any) is complete. It exists so tests can prove the claims above
with a real kill; it costs one environment lookup per step.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from ..checkpoints.io import _fsync_dir, atomic_write_bytes

LATEST = "latest"
STATE_FILE, STATE_JSON, OPTIMIZER_FILE = "trainer_state.pt", "trainer_state.json", "optimizer.pt"
CRASH_ENV = "BERTKIT_TRAIN_CRASH"


def maybe_crash(event: str, step: int) -> None:
    """SIGKILLs this process if ``BERTKIT_TRAIN_CRASH`` is ``<event>:<step>`` (tests only)."""
    if os.environ.get(CRASH_ENV) == f"{event}:{step}":
        os.kill(os.getpid(), signal.SIGKILL)


# ------------------------------------------------------------------------------ RNG states
def rng_state() -> dict[str, Any]:
    """torch (CPU and CUDA), numpy and Python RNG states as tensors and primitives."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, py_gauss = random.getstate()
    state = {"torch": torch.get_rng_state(),
             "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "gauss": float(gauss)},
             "python": {"version": version, "state": torch.tensor(internal, dtype=torch.int64), "gauss": py_gauss}}
    if torch.cuda.is_available():
        state["cuda"] = torch.stack(torch.cuda.get_rng_state_all())
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    p = state["python"]
    random.setstate((p["version"], tuple(int(x) for x in p["state"].tolist()), p["gauss"]))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(list(state["cuda"]))


# ------------------------------------------------------------------------------ writing
def _fsync_tree(folder: Path) -> None:
    for path in folder.iterdir():
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    _fsync_dir(folder)


def save_checkpoint(root: str | os.PathLike, step: int, write: Callable[[Path], None], keep: int = 2) -> Path:
    """Writes one checkpoint folder atomically and points ``latest`` at it (call on rank 0 only).

    Args:
        root: The ``checkpoints`` folder.
        step: Global optimizer step; names the folder ``step-%08d``.
        write: Fills the temporary folder it is given (model, optimizer, trainer state).
        keep: How many checkpoints to keep (the oldest are deleted after the new one is in place).

    Returns:
        The checkpoint folder.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".tmp-*"):  # left by a crash during an earlier save
        shutil.rmtree(stale, ignore_errors=True)
    name = f"step-{step:08d}"
    tmp = root / f".tmp-{name}-{os.getpid()}"
    tmp.mkdir()
    write(tmp)
    _fsync_tree(tmp)
    final = root / name
    if final.exists():  # re-saving a step after a resume: os.replace cannot replace a non-empty folder
        old = root / f".tmp-old-{name}-{os.getpid()}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    _fsync_dir(root)
    atomic_write_bytes(root / LATEST, name.encode())
    for old in sorted(root.glob("step-*"))[:-keep] if keep > 0 else []:
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    return final


def write_state(folder: Path, step: int, state: dict[str, Any], optimizer_state: dict[str, Any]) -> None:
    """Writes trainer_state.pt/.json and optimizer.pt into ``folder``, with the crash hook in between."""
    torch.save(state, folder / STATE_FILE)
    summary = {k: v for k, v in state.items() if isinstance(v, (int, float, str, bool, type(None)))}
    (folder / STATE_JSON).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    if os.environ.get(CRASH_ENV) == f"during-save:{step}":
        # Leave a realistic half-written file behind, then die as an OOM kill or a preemption would.
        import io

        buffer = io.BytesIO()
        torch.save(optimizer_state, buffer)
        with open(folder / OPTIMIZER_FILE, "wb") as f:
            f.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
            f.flush()
            os.fsync(f.fileno())
        os.kill(os.getpid(), signal.SIGKILL)
    torch.save(optimizer_state, folder / OPTIMIZER_FILE)


# ------------------------------------------------------------------------------ reading
def find_latest(root: str | os.PathLike) -> Path | None:
    """The checkpoint ``latest`` names, or the newest complete ``step-*`` folder if it is unusable."""
    root = Path(root)
    pointer = root / LATEST
    if pointer.is_file():
        folder = root / pointer.read_text(encoding="utf-8").strip()
        if (folder / STATE_FILE).is_file() and (folder / OPTIMIZER_FILE).is_file():
            return folder
    complete = [f for f in sorted(root.glob("step-*")) if (f / STATE_FILE).is_file() and (f / OPTIMIZER_FILE).is_file()]
    return complete[-1] if complete else None


def load_state(folder: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(trainer state, optimizer state) of a checkpoint, read with ``weights_only=True``."""
    try:
        state = torch.load(folder / STATE_FILE, weights_only=True)
        optimizer = torch.load(folder / OPTIMIZER_FILE, weights_only=True)
    except Exception as err:
        raise ValueError(f"checkpoint {folder} cannot be read ({err}); delete it and resume from an "
                         "earlier one (edit or delete the 'latest' file next to it)") from None
    return state, optimizer
