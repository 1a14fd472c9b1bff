"""BertConfig: one configuration for every family member, validated in one place."""

from __future__ import annotations

import copy
import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .checkpoints.io import atomic_write_bytes

# HF's hidden_act names that bertkit implements (bertkit/nn/activations.py maps each to its function and
# checks at import that the two lists agree). Listed here so the config, the bottom layer, imports no model code.
ACTIVATIONS = ("gelu", "gelu_python", "gelu_new", "gelu_pytorch_tanh", "gelu_fast", "quick_gelu", "relu", "silu",
               "swish", "tanh", "mish")
POSITION_EMBEDDING_TYPES = ("absolute", "relative_key", "relative_key_query")
NORM_PLACEMENTS = ("post", "pre")
ATTN_IMPLEMENTATIONS = ("sdpa", "eager")
PROBLEM_TYPES = ("regression", "single_label_classification", "multi_label_classification")

# model_type written in config.json for each norm placement; Megatron-BERT is BERT with pre-LayerNorm.
_MODEL_TYPE_FOR_NORM = {"post": "bert", "pre": "megatron-bert"}
_NORM_FOR_MODEL_TYPE = {"bert": "post", "megatron-bert": "pre"}

# Refuse configs whose embedding/linear weights alone would need more than this many parameters:
# a hostile config.json must fail before we try to allocate terabytes.
MAX_PARAMETERS = 50_000_000_000


@dataclass
class BertConfig:
    """Configuration of a BERT-family model.

    Every field of HuggingFace's ``BertConfig`` keeps its name and default, so an HF ``config.json``
    loads unchanged. The family members are values of the knobs at the end:
    Megatron-BERT is ``norm_placement="pre"``, the BLIP text model sets ``encoder_width`` and
    ``add_cross_attention``.
    """

    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-12
    pad_token_id: int | None = 0
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    position_embedding_type: str = "absolute"
    use_cache: bool = True
    classifier_dropout: float | None = None
    is_decoder: bool = False
    add_cross_attention: bool = False
    tie_word_embeddings: bool = True
    chunk_size_feed_forward: int = 0
    pruned_heads: dict[int, list[int]] = field(default_factory=dict)
    # Task-head fields of HF's PretrainedConfig.
    num_labels: int = 2
    id2label: dict[int, str] | None = None
    label2id: dict[str, int] | None = None
    problem_type: str | None = None
    architectures: list[str] | None = None
    # --- family knobs (DESIGN.md) ---
    norm_placement: str = "post"          # "pre" = Megatron-BERT
    encoder_width: int | None = None      # BLIP: width of the cross-attended features (None = hidden_size)
    label_smoothing: float = 0.0          # BLIP decoder LM loss
    attn_implementation: str = "sdpa"     # "eager" forces the explicit-softmax path
    unpad_inputs: bool = False            # padding-free execution when a padding mask is given (run time only)
    sparse_prediction: bool = False       # MLM heads: vocabulary logits only where labels != -100 (run time only)
    fused_qkv: bool = False               # one (3 x hidden) projection for q, k, v; same weights (run time only)
    model_type: str | None = None         # written to config.json; derived from norm_placement if None
    # Keys of config.json that bertkit does not know, kept and written back on save.
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                     "max_position_embeddings", "type_vocab_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{name} must be an integer, got {value!r}")
            # 0 layers is a valid (embeddings-only) model; 0 token types means none, as in BLIP's text model.
            if value < (0 if name in ("num_hidden_layers", "type_vocab_size") else 1):
                raise ValueError(f"{name} must be positive, got {value}")
        if self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                f"({self.num_attention_heads}); pick a head count that divides it"
            )
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"hidden_act {self.hidden_act!r} is unknown; choose one of {', '.join(ACTIVATIONS)}")
        if self.position_embedding_type not in POSITION_EMBEDDING_TYPES:
            raise ValueError(
                f"position_embedding_type {self.position_embedding_type!r} is unknown; "
                f"choose one of {', '.join(POSITION_EMBEDDING_TYPES)}"
            )
        if self.norm_placement not in NORM_PLACEMENTS:
            raise ValueError(f"norm_placement {self.norm_placement!r} is unknown; choose 'post' (BERT) or 'pre' (Megatron-BERT)")
        if self.attn_implementation not in ATTN_IMPLEMENTATIONS:
            raise ValueError(f"attn_implementation {self.attn_implementation!r} is unknown; choose 'sdpa' or 'eager'")
        for name in ("hidden_dropout_prob", "attention_probs_dropout_prob", "label_smoothing"):
            value = getattr(self, name)
            if not 0.0 <= float(value) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {value}")
        if self.classifier_dropout is not None and not 0.0 <= float(self.classifier_dropout) <= 1.0:
            raise ValueError(f"classifier_dropout must be in [0, 1] or None, got {self.classifier_dropout}")
        if self.layer_norm_eps <= 0:
            raise ValueError(f"layer_norm_eps must be positive, got {self.layer_norm_eps}")
        if self.encoder_width is not None and self.encoder_width < 1:
            raise ValueError(f"encoder_width must be positive or None, got {self.encoder_width}")
        if self.chunk_size_feed_forward < 0:
            raise ValueError(f"chunk_size_feed_forward must be >= 0, got {self.chunk_size_feed_forward}")
        if self.problem_type is not None and self.problem_type not in PROBLEM_TYPES:
            raise ValueError(f"problem_type {self.problem_type!r} is unknown; choose one of {', '.join(PROBLEM_TYPES)}")
        if self.pad_token_id is not None and not 0 <= self.pad_token_id < self.vocab_size:
            raise ValueError(f"pad_token_id {self.pad_token_id} is outside [0, vocab_size={self.vocab_size})")
        # Checked before anything is built from the sizes (id2label below has num_labels entries).
        # Cross-attention keys/values (width encoder_width), relative-distance tables and a classifier
        # head count too: a hostile config can hide its size in any of them.
        hidden, layers = self.hidden_size, self.num_hidden_layers
        num_labels = len(self.id2label) if self.id2label is not None else self.num_labels
        per_layer = 4 * hidden ** 2 + 2 * hidden * self.intermediate_size
        if self.add_cross_attention:
            per_layer += 2 * hidden * (self.encoder_width or hidden) + 2 * hidden ** 2
        if self.position_embedding_type != "absolute":
            per_layer += (2 * self.max_position_embeddings - 1) * self.head_dim
        approx = (self.vocab_size + self.max_position_embeddings + self.type_vocab_size) * hidden + \
            layers * per_layer + max(int(num_labels), 0) * hidden
        if approx > MAX_PARAMETERS:
            raise ValueError(
                f"config describes about {approx:.3g} parameters (hidden_size={self.hidden_size}, "
                f"num_hidden_layers={self.num_hidden_layers}, vocab_size={self.vocab_size}, "
                f"intermediate_size={self.intermediate_size}, encoder_width={self.encoder_width}, "
                f"num_labels={num_labels}), over the "
                f"{MAX_PARAMETERS:.0g} limit; the config file is probably corrupted"
            )
        # Labels: id2label wins over num_labels, as in HF (json keys are strings).
        if self.id2label is not None:
            self.id2label = {int(k): str(v) for k, v in self.id2label.items()}
            self.num_labels = len(self.id2label)
        else:
            if self.num_labels < 1:
                raise ValueError(f"num_labels must be positive, got {self.num_labels}")
            self.id2label = {i: f"LABEL_{i}" for i in range(self.num_labels)}
        self.label2id = {v: k for k, v in self.id2label.items()}
        self.pruned_heads = {int(k): sorted(set(int(h) for h in v)) for k, v in self.pruned_heads.items()}
        if self.model_type is None:
            self.model_type = _MODEL_TYPE_FOR_NORM[self.norm_placement]

    # ------------------------------------------------------------------ derived values
    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def pre_norm(self) -> bool:
        return self.norm_placement == "pre"

    # ------------------------------------------------------------------ (de)serialisation
    @classmethod
    def from_dict(cls, data: dict[str, Any], **overrides) -> "BertConfig":
        """Builds a config from an HF-style dictionary; unknown keys are kept in ``extra``."""
        data = {**data, **overrides}
        if data.get("model_type") == "blip" and isinstance(data.get("text_config"), dict):
            # A whole BLIP folder: the text model's config is nested.
            data = {"model_type": "blip_text_model", **data["text_config"], **overrides}
        if data.get("model_type") == "blip_text_model":
            data = _from_blip_text(data)
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        kwargs = {k: v for k, v in data.items() if k in known}
        extra = {k: v for k, v in data.items() if k not in known}
        extra.update(data.get("extra", {}) or {})
        # HF's Megatron-BERT folders say so only through model_type.
        if "norm_placement" not in kwargs and data.get("model_type") in _NORM_FOR_MODEL_TYPE:
            kwargs["norm_placement"] = _NORM_FOR_MODEL_TYPE[data["model_type"]]
        # HF spells the attention backend with a leading underscore in memory.
        if "_attn_implementation" in extra and "attn_implementation" not in kwargs:
            value = extra.pop("_attn_implementation")
            if value in ATTN_IMPLEMENTATIONS:
                kwargs["attn_implementation"] = value
        return cls(**kwargs, extra=extra)

    def to_dict(self) -> dict[str, Any]:
        if self.model_type == "blip_text_model":
            return _to_blip_text(self._to_dict())
        return self._to_dict()

    def _to_dict(self) -> dict[str, Any]:
        out = {f.name: copy.deepcopy(getattr(self, f.name)) for f in dataclasses.fields(self) if f.name != "extra"}
        out["id2label"] = {str(k): v for k, v in self.id2label.items()}
        out["pruned_heads"] = {str(k): v for k, v in self.pruned_heads.items()}
        del out["num_labels"]  # HF derives it from id2label
        # The attention backend is a run-time choice, not a property of the checkpoint (HF does not save it either,
        # and would take the key as a request that Megatron-BERT cannot honour).
        for key in ("attn_implementation", "unpad_inputs", "sparse_prediction", "fused_qkv"):
            del out[key]
        for key in ("architectures", "problem_type"):
            if out[key] is None:
                del out[key]
        out.update(copy.deepcopy(self.extra))
        return dict(sorted(out.items()))

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, **overrides) -> "BertConfig":
        """Reads ``config.json`` from a model folder (or the file itself).

        Raises:
            FileNotFoundError: the folder or its ``config.json`` does not exist.
            ValueError: the file is not valid JSON, or a field is invalid.
        """
        path = Path(path)
        file = path / "config.json" if path.is_dir() else path
        if not file.exists():
            if not path.exists():
                raise FileNotFoundError(f"model path {str(path)!r} does not exist; pass a folder with config.json")
            raise FileNotFoundError(f"{file} not found: {path} is not a model folder (it needs a config.json)")
        try:
            data = json.loads(file.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"{file} is not valid JSON ({exc}); the file is corrupted") from exc
        if not isinstance(data, dict):
            raise ValueError(f"{file} must hold a JSON object, got {type(data).__name__}")
        try:
            return cls.from_dict(data, **overrides)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{file}: {exc}") from exc

    def save_pretrained(self, path: str | os.PathLike) -> None:
        """Writes ``config.json`` into ``path`` atomically."""
        Path(path).mkdir(parents=True, exist_ok=True)
        text = json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"
        atomic_write_bytes(Path(path) / "config.json", text.encode("utf-8"))

    def copy(self, **changes) -> "BertConfig":
        return BertConfig.from_dict(self.to_dict(), **changes)


def unknown_field_message(key: str, what: str = "BertConfig") -> str:
    """``"BertConfig has no field 'hidden_sise'; did you mean hidden_size?"``, shared by the CLI's --config."""
    import difflib

    fields = [f.name for f in dataclasses.fields(BertConfig) if f.name != "extra"]  # extra: unknown keys of files
    near = difflib.get_close_matches(key, fields, n=3)
    return (f"{what} has no field {key!r}"
            + (f"; did you mean {' or '.join(near)}?" if near else f"; fields: {', '.join(fields)}"))


def _checked_init(init):
    # The dataclass __init__ would say only "got an unexpected keyword argument"; name the nearest fields.
    def __init__(self, *args, **kwargs):
        for key in kwargs:
            if key not in _INIT_FIELDS:
                raise TypeError(unknown_field_message(key))
        init(self, *args, **kwargs)

    __init__.__doc__, __init__.__wrapped__ = init.__doc__, init
    return __init__


_INIT_FIELDS = frozenset(f.name for f in dataclasses.fields(BertConfig))
BertConfig.__init__ = _checked_init(BertConfig.__init__)


def _from_blip_text(data: dict[str, Any]) -> dict[str, Any]:
    # HF's BlipTextConfig says `is_decoder` where it means "has cross-attention" (causality is chosen at call
    # time: BlipTextModel defaults to bidirectional, BlipTextLMHeadModel to causal), names the image width
    # `encoder_hidden_size` and has no token-type embeddings.
    data = dict(data)
    data["add_cross_attention"] = bool(data.pop("is_decoder", True))
    data["is_decoder"] = False
    if "encoder_hidden_size" in data:
        data["encoder_width"] = data.pop("encoder_hidden_size")
    data.setdefault("type_vocab_size", 0)
    return data


def _to_blip_text(out: dict[str, Any]) -> dict[str, Any]:
    out["is_decoder"] = out.pop("add_cross_attention")
    out["encoder_hidden_size"] = out.pop("encoder_width") or out["hidden_size"]
    return out


# Preset configs are plain dictionaries (DESIGN.md).
PRESETS: dict[str, dict[str, Any]] = {
    "bert-base": dict(),
    "bert-large": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096),
    "bert-tiny": dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=2, intermediate_size=512),
    "minilm-l6": dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536),
    "megatron-bert-345m": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                               intermediate_size=4096, vocab_size=29056, norm_placement="pre"),
}
