"""Reading and writing weight files: safetensors first, pickle only through ``weights_only``.

Writes are atomic: a temporary file in the destination folder, fsync, then ``os.replace``, so a
crash never leaves a half-written file under the final name.
"""

from __future__ import annotations

import json
import os
import pickle
import struct
import tempfile
from pathlib import Path

import torch

SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
PT_WEIGHTS = "pytorch_model.bin"
PT_INDEX = "pytorch_model.bin.index.json"


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Writes ``data`` to ``path`` so that readers see either the old file or the whole new one."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        # mkstemp makes the file owner-only (0600); give it the permissions a plain open() would.
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(folder: Path) -> None:
    # The rename itself is only durable once the directory entry is flushed (POSIX only).
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_safetensors(state: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict | None = None) -> None:
    """Saves a state dict as safetensors, atomically."""
    from safetensors.torch import save

    tensors = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    atomic_write_bytes(path, save(tensors, metadata={"format": "pt", **(metadata or {})}))


def _check_safetensors_header(path: Path) -> None:
    # safetensors starts with a u64 header length and a JSON header whose offsets must fit in the file;
    # checking first turns a truncated download into a message that names the file.
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{path} is truncated ({size} bytes): not a safetensors file; download it again")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise ValueError(
                f"{path}: the safetensors header claims {n} bytes but the file has {size}; "
                "the file is truncated or corrupted, download it again"
            )
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"{path}: the safetensors header is not valid JSON; the file is corrupted") from exc
    if not isinstance(header, dict):
        raise ValueError(f"{path}: the safetensors header is not a JSON object; the file is corrupted")
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)
               and "data_offsets" in v), default=0)
    if 8 + n + end > size:
        raise ValueError(
            f"{path}: tensors need {8 + n + end} bytes but the file has {size}; "
            "the file is truncated, download it again"
        )


def load_safetensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    _check_safetensors_header(path)
    try:
        return load_file(str(path), device="cpu")
    except SafetensorError as exc:
        raise ValueError(f"{path} could not be read as safetensors ({exc}); the file is corrupted") from exc


def load_torch_bin(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Loads a ``pytorch_model.bin`` with ``weights_only=True``: pickle that would run code is refused."""
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise ValueError(
            f"{path} was refused: its pickle asks for code that is not plain tensors ({str(exc).splitlines()[0]}). "
            "Loading it could run arbitrary code; convert it to safetensors in a sandbox you trust"
        ) from exc
    except (RuntimeError, EOFError, OSError) as exc:
        raise ValueError(f"{path} could not be read ({exc}); the file is truncated or corrupted") from exc
    if not isinstance(state, dict):
        raise ValueError(f"{path} holds a {type(state).__name__}, not a state dict of tensors")
    for wrapper in ("state_dict", "model"):  # Lightning-style and Salesforce BLIP-style wrappers
        if wrapper in state and isinstance(state[wrapper], dict):
            state = state[wrapper]
            break
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


def find_weight_files(folder: str | os.PathLike) -> list[Path]:
    """Lists the weight files of an HF folder, safetensors first, shards in index order."""
    folder = Path(folder)
    for single, index in ((SAFE_WEIGHTS, SAFE_INDEX), (PT_WEIGHTS, PT_INDEX)):
        if (folder / single).exists():
            return [folder / single]
        if (folder / index).exists():
            try:
                weight_map = json.loads((folder / index).read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise ValueError(f"{folder / index} is not a valid shard index (needs a 'weight_map')") from exc
            shards = list(dict.fromkeys(weight_map.values()))
            # A shard is a file beside the index: an absolute path or ".." would let a downloaded
            # index make us read any file on the machine.
            outside = [s for s in shards if not isinstance(s, str) or Path(s).is_absolute() or ".." in Path(s).parts]
            if outside:
                raise ValueError(f"{folder / index} names shard files outside its folder: "
                                 f"{', '.join(map(repr, outside))}; the index is corrupted or hostile")
            missing = [s for s in shards if not (folder / s).exists()]
            if missing:
                raise FileNotFoundError(f"{folder / index} lists shards that are missing: {', '.join(missing)}")
            return [folder / s for s in shards]
    raise FileNotFoundError(
        f"no weights in {folder}: expected {SAFE_WEIGHTS}, {SAFE_INDEX}, {PT_WEIGHTS} or {PT_INDEX}"
    )


def load_weight_file(file: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Reads one weight file: safetensors by extension, anything else as a weights-only pickle."""
    file = Path(file)
    return load_safetensors(file) if file.suffix == ".safetensors" else load_torch_bin(file)


def load_state_dict(folder: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Reads every weight file of an HF model folder into one CPU state dict."""
    state: dict[str, torch.Tensor] = {}
    for file in find_weight_files(folder):
        state.update(load_weight_file(file))
    return state
