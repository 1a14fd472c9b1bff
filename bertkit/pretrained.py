"""What every bertkit model shares: weight init, tying, ``from_pretrained`` and ``save_pretrained``."""

from __future__ import annotations

import fnmatch
import logging
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .checkpoints.io import SAFE_WEIGHTS, load_state_dict, load_weight_file, save_safetensors
from .config import BertConfig

logger = logging.getLogger("bertkit")

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
           "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def resolve_dtype(dtype: Any, config: BertConfig | None = None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        stored = (config.extra.get("dtype") or config.extra.get("torch_dtype")) if config else None
        return _DTYPES.get(stored) if stored else None
    if dtype in _DTYPES:
        return _DTYPES[dtype]
    raise ValueError(f"dtype {dtype!r} is unknown; use a torch.dtype, 'auto' or one of {', '.join(_DTYPES)}")


def _rename_legacy(key: str) -> str:
    # Checkpoints converted from TensorFlow by old transformers versions kept TF's gamma/beta names.
    if key.endswith(".gamma"):
        return key[: -len("gamma")] + "weight"
    if key.endswith(".beta"):
        return key[: -len("beta")] + "bias"
    return key


class BertPreTrainedModel(nn.Module):
    """Base class: holds the config, initialises weights the way HF does, loads and saves HF folders."""

    config_class = BertConfig
    base_model_prefix = "bert"

    def __init__(self, config: BertConfig):
        super().__init__()
        if not isinstance(config, BertConfig):
            raise TypeError(f"config must be a bertkit.BertConfig, got {type(config).__name__}")
        self.config = config

    # ------------------------------------------------------------------ init and tying
    def post_init(self) -> None:
        """Initialises every weight (a no-op on the meta device) and ties the MLM decoder."""
        self.apply(self._init_weights)
        self.tie_weights()

    def _init_weights(self, module: nn.Module) -> None:
        for name, param in list(module.named_parameters(recurse=False)):
            self._init_tensor(module, name, param)

    @torch.no_grad()
    def _init_tensor(self, module: nn.Module, name: str, tensor: torch.Tensor) -> None:
        if tensor.is_meta:
            # from_pretrained builds on the meta device; random init there is pointless and normal_ on meta
            # tensors imports torch._dynamo (seconds on a cold process).
            return
        std = self.config.initializer_range
        if isinstance(module, nn.LayerNorm):
            tensor.fill_(1.0 if name == "weight" else 0.0)
        elif name == "bias":
            tensor.zero_()
        else:
            tensor.normal_(0.0, std)
            if isinstance(module, nn.Embedding) and module.padding_idx is not None:
                tensor[module.padding_idx].zero_()

    def tie_weights(self) -> None:
        head = self.get_output_embeddings()
        if head is None:
            return
        if self.config.tie_word_embeddings:
            head.weight = self.get_input_embeddings().weight
            # The output bias is then one parameter under two names (predictions.bias and decoder.bias).
            predictions = self.cls.predictions
            predictions.decoder.bias = predictions.bias

    def _tied_keys(self) -> set[str]:
        if self.get_output_embeddings() is None:
            return set()
        if self.config.tie_word_embeddings:
            return {"cls.predictions.decoder.bias", "cls.predictions.decoder.weight"}
        return set()

    # ------------------------------------------------------------------ embeddings
    def get_input_embeddings(self) -> nn.Embedding:
        base = getattr(self, self.base_model_prefix, self)
        return base.embeddings.word_embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        base = getattr(self, self.base_model_prefix, self)
        base.embeddings.word_embeddings = value

    def get_output_embeddings(self) -> nn.Linear | None:
        cls_head = getattr(self, "cls", None)
        predictions = getattr(cls_head, "predictions", None)
        return predictions.decoder if predictions is not None else None

    def resize_token_embeddings(self, new_num_tokens: int) -> nn.Embedding:
        """Grows or shrinks the vocabulary; new rows are initialised like fresh weights."""
        old = self.get_input_embeddings()
        if new_num_tokens < 1:
            raise ValueError(f"new_num_tokens must be positive, got {new_num_tokens}")
        pad = self.config.pad_token_id
        if pad is not None and pad >= new_num_tokens:
            raise ValueError(f"new_num_tokens={new_num_tokens} would drop pad_token_id={pad}; keep at least {pad + 1}")
        n = min(old.num_embeddings, new_num_tokens)
        new = nn.Embedding(new_num_tokens, old.embedding_dim, padding_idx=pad, device=old.weight.device,
                           dtype=old.weight.dtype)
        self._init_tensor(new, "weight", new.weight)
        with torch.no_grad():
            new.weight[:n] = old.weight[:n]
        self.set_input_embeddings(new)
        head = self.get_output_embeddings()
        if head is not None:
            predictions = self.cls.predictions
            bias = torch.zeros(new_num_tokens, device=predictions.bias.device, dtype=predictions.bias.dtype)
            bias[:n] = predictions.bias.detach()[:n]
            predictions.bias = nn.Parameter(bias)
            if not self.config.tie_word_embeddings:
                weight = head.weight.new_empty(new_num_tokens, head.weight.shape[1])
                self._init_tensor(head, "weight", weight)
                weight[:n] = head.weight.detach()[:n]
                head.weight = nn.Parameter(weight)
                own_bias = head.bias.new_zeros(new_num_tokens)
                own_bias[:n] = head.bias.detach()[:n]
                head.bias = nn.Parameter(own_bias)
            head.out_features = new_num_tokens
        self.config.vocab_size = new_num_tokens
        self.tie_weights()
        return new

    def prune_heads(self, heads_to_prune: dict[int, list[int]]) -> None:
        """Removes attention heads, ``{layer: [heads]}`` in the original numbering.

        The pruned heads are recorded in ``config.pruned_heads``, so ``save_pretrained`` /
        ``from_pretrained`` rebuild the smaller layers. Pruning every head of a layer is allowed: its
        attention block then adds only the output projection's bias to the residual stream.
        """
        base = getattr(self, self.base_model_prefix, self)
        layers = base.encoder.layer
        for layer, heads in heads_to_prune.items():
            if not 0 <= int(layer) < len(layers):
                raise ValueError(f"cannot prune layer {layer}: the model has layers 0..{len(layers) - 1}")
            attention = layers[int(layer)].attention
            attention.prune_heads(heads)
            self.config.pruned_heads[int(layer)] = sorted(attention.pruned_heads)

    # ------------------------------------------------------------------ misc
    def num_parameters(self, only_trainable: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not only_trainable)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def gradient_checkpointing_enable(self) -> None:
        base = getattr(self, self.base_model_prefix, self)
        base.encoder.gradient_checkpointing = True

    def gradient_checkpointing_disable(self) -> None:
        base = getattr(self, self.base_model_prefix, self)
        base.encoder.gradient_checkpointing = False

    # ------------------------------------------------------------------ loading
    def _loadable_keys(self) -> set[str]:
        """Keys this model takes from a checkpoint: its state dict, plus buffers declared without a value yet
        (a quantizer's ``_amax`` exists only once calibrated or loaded)."""
        keys = set(self.state_dict().keys())
        for name, module in self.named_modules():
            keys.update(f"{name}.{b}" if name else b for b, value in module._buffers.items() if value is None)
        return keys

    def _adapt_state_dict(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Maps an HF state dict onto this model's names (prefix, legacy names, tied aliases)."""
        state = {_rename_legacy(k): v for k, v in state.items()
                 if not k.endswith(("embeddings.position_ids", "embeddings.token_type_ids"))}  # old buffers
        expected = self._loadable_keys()
        prefix = self.base_model_prefix + "."
        has_base = hasattr(self, self.base_model_prefix)
        if has_base and not any(k.startswith(prefix) for k in state):
            # A bare BertModel checkpoint loaded into a task model.
            state = {(prefix + k if prefix + k in expected else k): v for k, v in state.items()}
        elif not has_base and any(k.startswith(prefix) for k in state):
            # A task checkpoint loaded into BertModel: keep the encoder, report the heads as unexpected.
            state = {(k[len(prefix):] if k.startswith(prefix) else k): v for k, v in state.items()}
        if "cls.predictions.decoder.bias" in state and "cls.predictions.bias" in expected:
            state.setdefault("cls.predictions.bias", state["cls.predictions.decoder.bias"])
        for key in self._tied_keys():
            state.pop(key, None)
        return state

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        dtype: torch.dtype | str | None = None,
        device: torch.device | str | None = None,
        config: BertConfig | None = None,
        strict: bool = False,
        output_loading_info: bool = False,
        prefix: str | None = None,
        ignore_unexpected: Iterable[str] = (),
        prepare: Callable[[nn.Module, list[str]], None] | None = None,
        **kwargs,
    ):
        """Loads an HF model folder (``config.json`` + safetensors, sharded or not, or ``pytorch_model.bin``).

        Args:
            path: the folder (or, with ``config=``, a single weight file such as a Salesforce BLIP ``.pth``).
            dtype: ``torch.float16``, ``"bfloat16"``, ``"auto"`` (the dtype in config.json) or None (float32).
            device: where the weights go (default CPU).
            config: use this config instead of the folder's ``config.json``.
            strict: raise if any key is missing or unexpected instead of reporting it.
            output_loading_info: also return ``{"missing_keys": [...], "unexpected_keys": [...]}``.
            prefix: load only the tensors under this prefix (``"text_decoder"`` for the caption decoder of a
                BLIP checkpoint, ``"text_encoder"`` for its text encoder).
            ignore_unexpected: ``fnmatch`` patterns of checkpoint keys the caller expects this model not to use
                (``("pooler.*",)`` for a sentence encoder built without the pooler): neither reported nor an
                error under ``strict``.
            prepare: ``prepare(model, checkpoint_keys)`` runs on the model, still on the meta device, before the
                weights load; modules it adds take their tensors from the same checkpoint in the same pass
                (:func:`bertkit.quant.load_quantized` adds the quantizers here, so their ``_amax`` load too).
            **kwargs: config overrides (``num_labels=3``, ``attn_implementation="eager"``) and model
                arguments (``add_pooling_layer=False``).

        Raises:
            FileNotFoundError: the path, its config.json or its weights are missing.
            ValueError: corrupted or refused weight files, or a tensor whose shape does not fit the model.
        """
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"model path {str(path)!r} does not exist")
        if not path.is_dir() and config is None:
            raise FileNotFoundError(f"model path {str(path)!r} is a file; pass the folder that holds config.json, "
                                    "or pass config= to load a bare weight file")
        model_kwargs = {k: kwargs.pop(k) for k in list(kwargs) if k == "add_pooling_layer"}
        config = config.copy(**kwargs) if config is not None else BertConfig.from_pretrained(path, **kwargs)
        state = load_state_dict(path) if path.is_dir() else load_weight_file(path)
        if prefix:
            # The text part of a larger checkpoint (BLIP: text_decoder / text_encoder / text_model).
            dotted = prefix.rstrip(".") + "."
            kept = {k[len(dotted):]: v for k, v in state.items() if k.startswith(dotted)}
            if not kept:
                raise ValueError(f"{path}: no tensor starts with {dotted!r}; prefixes present: "
                                 f"{', '.join(sorted({k.split('.')[0] for k in state}))}")
            state = kept
        if config.type_vocab_size and not any(k.endswith("token_type_embeddings.weight") for k in state) and \
                any(k.endswith("embeddings.word_embeddings.weight") for k in state):
            # BLIP's med.py checkpoints have no token-type embeddings although their med_config.json says
            # type_vocab_size 2: build the model without them rather than add random vectors.
            logger.info("%s: no token_type_embeddings in the checkpoint; using type_vocab_size=0", path)
            config.type_vocab_size = 0
        with torch.device("meta"):
            model = cls(config, **model_kwargs)
        if prepare is not None:
            prepare(model, list(state))
        state = model._adapt_state_dict(state)
        expected = model.state_dict()
        for key, tensor in state.items():
            if key in expected and expected[key].shape != tensor.shape:
                raise ValueError(
                    f"{path}: tensor {key!r} has shape {tuple(tensor.shape)} but the model built from its "
                    f"config expects {tuple(expected[key].shape)}; the config and the weights do not match"
                )
        loadable = model._loadable_keys()
        missing = sorted(set(expected) - set(state) - model._tied_keys())
        unexpected = sorted(k for k in set(state) - loadable
                            if not any(fnmatch.fnmatchcase(k, pattern) for pattern in ignore_unexpected))
        if strict and (missing or unexpected):
            raise ValueError(f"{path}: missing keys {missing}, unexpected keys {unexpected}")
        try:
            model.load_state_dict({k: v for k, v in state.items() if k in loadable}, strict=False, assign=True)
        except RuntimeError as err:  # a module refused its tensor (e.g. an amax of the wrong shape)
            raise ValueError(f"{path}: {err}") from None
        model._materialize_missing()
        model.tie_weights()
        if missing:
            logger.warning("%s: newly initialised (not in the checkpoint): %s", cls.__name__, ", ".join(missing))
        if unexpected:
            logger.warning("%s: checkpoint keys not used by this model: %s", cls.__name__, ", ".join(unexpected))
        dtype = resolve_dtype(dtype, config)
        model.to(device=device or "cpu", dtype=dtype or torch.float32)
        model.eval()
        if output_loading_info:
            return model, {"missing_keys": missing, "unexpected_keys": unexpected}
        return model

    @torch.no_grad()
    def _materialize_missing(self) -> None:
        # Parameters the checkpoint did not provide are still on the meta device: give them real storage
        # and initialise them as a fresh model would.
        for module in self.modules():
            for name, param in list(module._parameters.items()):
                if param is not None and param.is_meta:
                    fresh = nn.Parameter(torch.empty(param.shape, dtype=param.dtype), requires_grad=param.requires_grad)
                    self._init_tensor(module, name, fresh)
                    module._parameters[name] = fresh

    # ------------------------------------------------------------------ saving
    def save_pretrained(self, path: str | os.PathLike) -> None:
        """Writes ``config.json`` and ``model.safetensors`` (HF layout, atomically) into ``path``."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.config.architectures = [type(self).__name__]
        self.config.extra["dtype"] = str(self.dtype).removeprefix("torch.")
        state = {k: v for k, v in self.state_dict().items() if k not in self._tied_keys()}
        save_safetensors(state, path / SAFE_WEIGHTS)
        self.config.save_pretrained(path)
