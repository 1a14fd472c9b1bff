"""What every pipeline shares: finding the model folder, loading the head a task needs, tokenizing with
bounded truncation, and running token-id rows through the model in length-sorted, padding-free batches.

A *row* (:class:`Row`) is one model input as token-id lists: ``input_ids`` and ``token_type_ids``. Rows are
what the serving layer queues and batches across requests; :func:`run_rows` scores any list of them.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Callable, Iterator, NamedTuple, Sequence

import numpy as np
import torch

from ..config import BertConfig
from ..nn.padding import right_pad
from ..tokenizer import Tokenizer
from . import PipelineError

logger = logging.getLogger("bertkit")

# Characters kept per allowed token before a long text is cut (see clip_text): generous, so the cut almost
# never decides anything, and bounded, so a megabyte document is never tokenized just to keep 512 tokens.
CHARS_PER_TOKEN = 16


class Row(NamedTuple):
    """One tokenized model input: ``input_ids`` and ``token_type_ids`` (lists of ints, same length)."""

    input_ids: list[int]
    token_type_ids: list[int]


def resolve_model_dir(path: str | Path) -> tuple[Path, str | None]:
    """Returns the model folder for ``path`` and a note when it was resolved from a finetune run folder.

    ``bertkit finetune --out OUT`` writes ``OUT/best`` (and ``OUT/final``); ``OUT`` itself is accepted and
    means ``OUT/best``.
    """
    folder = Path(path)
    if not folder.exists():
        raise FileNotFoundError(f"model folder {str(folder)!r} does not exist")
    if not folder.is_dir():
        raise FileNotFoundError(f"model path {str(folder)!r} is a file; pass the folder that holds config.json")
    if not (folder / "config.json").is_file() and not (folder / "modules.json").is_file():
        for sub in ("best", "final"):
            if (folder / sub / "config.json").is_file():
                return folder / sub, f"{folder} is a finetune run folder; using its model {folder / sub}"
        raise FileNotFoundError(f"{folder} is not a model folder (no config.json); pass a HuggingFace/bertkit "
                                "model folder or the output folder of `bertkit finetune`")
    return folder, None


def pick_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(device)


def check_top_k(top_k, name: str = "top_k", allow_none: bool = True) -> None:
    if top_k is None and allow_none:
        return
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k <= 0:
        raise PipelineError(f"{name} must be a positive integer{' or None' if allow_none else ''}, got {top_k!r}")


def string_inputs(inputs, task: str) -> tuple[bool, list[str]]:
    """``(single, texts)`` for a string or a sequence of strings; anything else names its position."""
    single = isinstance(inputs, str)
    texts = [inputs] if single else list(inputs)
    bad = next((i for i, t in enumerate(texts) if not isinstance(t, str)), None)
    if bad is not None:
        raise PipelineError(f"input {bad} is {type(texts[bad]).__name__}; {task} takes strings")
    return single, texts


def check_batch_size(batch_size) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise PipelineError(f"batch_size must be a positive integer, got {batch_size!r}")


# ------------------------------------------------------------------------------------------ tokenizing
def clip_text(text: str, max_tokens: int) -> str:
    """Cuts a text far longer than ``max_tokens`` could ever need at a whitespace before the cut point.

    BERT's pre-tokenizer splits at whitespace, so the tokens before the cut are those of the full text; callers
    check that the clipped text still overflows the limit (else they re-tokenize the full text).
    """
    limit = CHARS_PER_TOKEN * max_tokens + 64
    if len(text) <= limit:
        return text
    cut = limit
    while cut > limit // 2 and not text[cut].isspace():
        cut -= 1
    return text[:cut] if text[cut].isspace() else text


def encode(tokenizer: Tokenizer, texts: Sequence[str], pairs: Sequence[str] | None = None, *,
           max_length: int, truncation: str = "longest_first", stride: int = 0, offsets: bool = False):
    """Tokenizes a batch in one Rust call and returns the ``tokenizers.Encoding`` objects (no padding).

    Long texts are clipped first (:func:`clip_text`) unless ``stride`` asks for overflowing windows; a clipped
    text that no longer overflows is tokenized again in full, so the result is always that of the full text.
    """
    texts = list(texts)
    pairs = list(pairs) if pairs is not None else None
    if stride:
        return _encode(tokenizer, texts, pairs, max_length, truncation, stride, offsets)
    clipped = [clip_text(t, max_length) for t in texts]
    clipped_pairs = [clip_text(t, max_length) for t in pairs] if pairs is not None else None
    if pairs is not None:
        # longest_first truncation only depends on the shorter segment when the longer one overflows alone;
        # two long segments are kept whole (which one is longer decides where the odd token goes).
        for i, (a, b) in enumerate(zip(texts, pairs)):
            if clipped[i] is not a and clipped_pairs[i] is not b:
                clipped[i], clipped_pairs[i] = a, b
    out = _encode(tokenizer, clipped, clipped_pairs, max_length, truncation, 0, offsets)
    redo = []
    for i, enc in enumerate(out):
        if clipped[i] is not texts[i] or (pairs is not None and clipped_pairs[i] is not pairs[i]):
            if pairs is None:
                long_enough = bool(enc.overflowing)
            else:  # the clipped segment alone must still fill the window
                seg = _encode(tokenizer, [clipped[i] if clipped[i] is not texts[i] else clipped_pairs[i]], None,
                              max_length, None, 0, False, special=False)[0]
                long_enough = len(seg.ids) >= max_length
            if not long_enough:
                redo.append(i)
    if redo:
        again = _encode(tokenizer, [texts[i] for i in redo], [pairs[i] for i in redo] if pairs else None,
                        max_length, truncation, 0, offsets)
        for i, enc in zip(redo, again):
            out[i] = enc
    return out


def _encode(tokenizer: Tokenizer, texts, pairs, max_length, truncation, stride, offsets, special=True):
    backend = tokenizer.backend_tokenizer
    inputs = texts if pairs is None else list(zip(texts, pairs))
    bad = next((i for i, t in enumerate(texts) if not isinstance(t, str)), None)
    if bad is None and pairs is not None:
        bad = next((i for i, t in enumerate(pairs) if not isinstance(t, str)), None)
    if bad is not None:
        raise PipelineError(f"input {bad} is not a string: {inputs[bad]!r}")
    # The Tokenizer owns the Rust object's truncation/padding state: change it under its lock, and mark it
    # unknown afterwards so its next call sets its own settings again.
    with tokenizer._lock:
        tokenizer._settings = None
        backend.no_padding()
        if truncation is None:
            backend.no_truncation()
        else:
            backend.enable_truncation(max_length=max_length, stride=stride, strategy=truncation)
        encode_batch = backend.encode_batch if offsets else getattr(backend, "encode_batch_fast",
                                                                      backend.encode_batch)
        try:
            return encode_batch(inputs, add_special_tokens=special)
        except Exception as err:  # the Rust side raises a bare Exception (e.g. a question longer than the window)
            raise PipelineError(f"tokenization failed ({err}) with max_length={max_length}, stride={stride}; "
                                "use a longer max_length or a shorter stride/question") from None


# ------------------------------------------------------------------------------------------ running
@torch.inference_mode()
def run_rows(model: torch.nn.Module, rows: Sequence[Row], pad_id: int, head: Callable | None = None,
             per_token: bool = False) -> list[torch.Tensor]:
    """Runs rows as ONE padding-free batch and returns each row's output (float32, on the CPU).

    Args:
        model: A bertkit task model whose ``config.unpad_inputs`` is True (as :func:`load_head` sets it):
            embeddings, Linears and the MLP then see only real tokens; attention runs per sequence.
        rows: The inputs; sort them by length first when there are many (:func:`batched` does).
        pad_id: The tokenizer's pad id (fills the padded layout the model unpads again).
        head: ``outputs -> tensor (B, ...)``; default ``outputs.logits``.
        per_token: The head gives one vector per token; each row's output is cut to its length.

    Returns:
        One tensor per row: ``(num_labels,)`` for sequence heads, ``(len(row), ...)`` for token heads.
    """
    if not rows:
        return []
    device = next(model.parameters()).device
    lengths = [len(r.input_ids) for r in rows]
    ids, mask = right_pad([r.input_ids for r in rows], pad_id)
    types, _ = right_pad([r.token_type_ids for r in rows], 0)
    outputs = model(input_ids=ids.to(device), attention_mask=mask.to(device), token_type_ids=types.to(device))
    result = (head(outputs) if head is not None else outputs.logits).float().cpu()
    if per_token:
        return [result[i, :lengths[i]] for i in range(len(rows))]
    return list(result)


def batched(rows: Sequence[Row], batch_size: int, max_batch_tokens: int | None = None) -> Iterator[np.ndarray]:
    """Yields index arrays over ``rows``, longest first, ``batch_size`` rows (and a token budget) per batch."""
    lengths = np.fromiter((len(r.input_ids) for r in rows), dtype=np.int64, count=len(rows))
    order = np.argsort(-lengths, kind="stable")
    start = 0
    while start < len(order):
        end = min(start + batch_size, len(order))
        if max_batch_tokens:
            end = min(end, start + max(1, max_batch_tokens // max(1, int(lengths[order[start]]))))
        yield order[start:end]
        start = end


def run_sorted(model, rows: Sequence[Row], pad_id: int, batch_size: int, head: Callable | None = None,
               per_token: bool = False, bar=None) -> list[torch.Tensor]:
    """:func:`run_rows` over length-sorted batches; results come back in input order."""
    out: list = [None] * len(rows)
    for idx in batched(rows, batch_size):
        for i, value in zip(idx, run_rows(model, [rows[i] for i in idx], pad_id, head, per_token)):
            out[i] = value
        if bar is not None:
            bar.update(len(idx))
    return out


def progress(total: int | None, show: bool | None, desc: str):
    """A tqdm bar on stderr; ``show=None`` shows it only on a terminal."""
    if show is None:
        show = sys.stderr.isatty()
    if not show:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="text", desc=desc, file=sys.stderr)


# ------------------------------------------------------------------------------------------ loading
# Which tasks each head supports (the architecture's suffix in config.json).
HEAD_TASKS = {
    "ForSequenceClassification": ("text-classification", "rerank", "feature-extraction"),
    "ForTokenClassification": ("token-classification", "feature-extraction"),
    "ForQuestionAnswering": ("question-answering", "feature-extraction"),
    "ForMaskedLM": ("fill-mask", "feature-extraction"),
    "ForPreTraining": ("fill-mask", "feature-extraction"),
    "Model": ("feature-extraction",),
}


def architecture(config: BertConfig) -> str:
    return (config.architectures or ["(none in config.json)"])[0]


def supported_tasks(config: BertConfig) -> tuple[str, ...]:
    arch = architecture(config)
    for suffix, tasks in HEAD_TASKS.items():
        if arch.endswith(suffix):
            return tasks
    return ("feature-extraction",)


def load_head(folder: Path, cls, task: str, device, dtype):
    """Loads ``cls`` from ``folder``, refusing a folder whose head does not do ``task``.

    The architecture in config.json decides (a sequence classifier's ``classifier.*`` weights would load into
    a token classifier by name); without one, the head's weights must all be in the checkpoint. A wrong or
    random head gives confident nonsense, so the error names the folder, its architecture and its tasks.
    """
    config = BertConfig.from_pretrained(folder)
    if config.architectures and task not in supported_tasks(config):
        raise PipelineError(f"{folder} holds a {architecture(config)}, which cannot do {task}; "
                            f"it supports: {', '.join(supported_tasks(config))}")
    model, info = cls.from_pretrained(folder, dtype=dtype, device=device, output_loading_info=True)
    prefix = cls.base_model_prefix + "."
    missing_head = [k for k in info["missing_keys"] if not k.startswith(prefix)]
    if missing_head:
        raise PipelineError(f"{folder} ({architecture(config)}) has no weights for the {task} head "
                            f"({', '.join(missing_head[:3])} missing); it supports: {', '.join(supported_tasks(config))}")
    model.config.unpad_inputs = True  # padding-free execution (a run-time config field)
    return model.eval()
