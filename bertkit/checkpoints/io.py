"""Reading and writing weight files: safetensors first, pickle only through ``weights_only``.

Writes are atomic: a temporary file in the destination folder, fsync, then ``os.replace``, so a
crash never leaves a half-written file under the final name.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import re
import struct
import tempfile
from pathlib import Path
from typing import IO, TYPE_CHECKING, Iterator

if TYPE_CHECKING:  # torch is imported where used: bertkit.tokenizer writes files through here without it
    import torch

SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
PT_WEIGHTS = "pytorch_model.bin"
PT_INDEX = "pytorch_model.bin.index.json"


@contextlib.contextmanager
def atomic_writer(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """Opens a temporary file beside ``path`` and moves it to ``path`` when the block ends cleanly.

    The one atomic writer of bertkit: readers see either the old file or the whole new one; the new
    file gets the permissions a plain ``open()`` would give under the current umask (mkstemp's are
    owner-only, 0600); it is fsynced before the rename and the folder after it. On any exception
    (Ctrl-C and SIGTERM included, see ``bertkit.cli``) the temporary file is removed.

    Args:
        path: The final file.
        mode: ``"wb"`` or ``"w"`` (text, UTF-8, ``\\n`` line endings).

    Yields:
        The open temporary file.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        kwargs = {} if "b" in mode else {"encoding": "utf-8", "newline": "\n"}
        with os.fdopen(fd, mode, **kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Writes ``data`` to ``path`` so that readers see either the old file or the whole new one."""
    with atomic_writer(path, "wb") as f:
        f.write(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """:func:`atomic_write_bytes` for text (UTF-8, ``\\n`` line endings)."""
    with atomic_writer(path, "w") as f:
        f.write(text)


def writable_folder(path: str | os.PathLike, what: str) -> Path:
    """Checks that a file can be created in ``path``'s folder; raises an OSError naming ``what`` if not.

    Called before any model time is spent, so a read-only or missing folder is reported with the
    user's own path instead of a hidden temporary name after minutes of work.
    """
    folder = Path(path).parent
    if not folder.is_dir():
        raise FileNotFoundError(f"{what} {path}: folder {str(folder)!r} does not exist; create it first")
    try:  # a real probe: os.access says yes to root on a read-only file system
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as err:
        raise PermissionError(f"{what} {path}: cannot write in folder {str(folder)!r} ({err.strerror}); "
                              "choose another place or fix its permissions") from None
    return Path(path)


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


def torch_load_reason(exc: BaseException) -> str:
    """torch.load's error without its advice to retry with ``weights_only=False``, which would run the file."""
    text = str(exc)
    if "weights_only" not in text:
        return text.split(". This is an internal")[0].splitlines()[0] if text else type(exc).__name__
    detail = re.search(r"WeightsUnpickler error:\s*(.+?)\s*(?:\n\n|$)", text, re.S)
    return f"not a plain-tensor pickle: {detail.group(1).strip()}" if detail else "not a plain-tensor pickle"


def load_torch_bin(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Loads a ``pytorch_model.bin`` with ``weights_only=True``: pickle that would run code is refused."""
    import torch

    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise ValueError(
            f"{path} was refused: its pickle asks for code that is not plain tensors ({torch_load_reason(exc)}). "
            "Loading it could run arbitrary code; convert it to safetensors in a sandbox you trust"
        ) from exc
    except (RuntimeError, EOFError, OSError) as exc:
        raise ValueError(f"{path} could not be read ({torch_load_reason(exc)}); the file is truncated or "
                         "corrupted") from exc
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
