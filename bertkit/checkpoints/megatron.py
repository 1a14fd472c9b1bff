"""Converts NVIDIA Megatron-LM BERT checkpoints into a HuggingFace Megatron-BERT folder.

    convert_megatron_checkpoint("checkpoints/bert_345m", "megatron-bert-345m")

The source is what Megatron-LM's ``save_checkpoint`` writes (NVIDIA/Megatron-LM megatron/checkpointing.py):
a folder with ``latest_checkpointed_iteration.txt`` naming ``iter_0000100/`` or ``release/``, which holds
one ``mp_rank_NN/model_optim_rng.pt`` per tensor-parallel rank -- or any of those folders, or one
``model_optim_rng.pt``. Each file is a pickle of ``{"model": nested state dict, "args": Namespace,
"checkpoint_version", "iteration", "optimizer", "*rng_state*", ...}``; only the model and the args are
used. Shards are merged here, then names and the fused QKV go through the declarative table in
:mod:`bertkit.checkpoints.tables.megatron_lm`.

The files are pickles, so they are read with ``torch.load(weights_only=True)``: tensors, containers and
``argparse.Namespace`` as such, the few non-weight globals Megatron is known to pickle (numpy RNG state,
enums in args, old loss scalers) as inert placeholders, and anything else refused by name.
"""

from __future__ import annotations

import argparse
import dataclasses
import pickle
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from .convert import apply, inverse
from .io import SAFE_WEIGHTS, atomic_write_bytes, save_safetensors, torch_load_reason
from .tables.megatron_lm import TENSOR_PARALLEL_DIMS, megatron_bert_table, merge_qkv_shards, qkv_layout

CHECKPOINT_FILE = "model_optim_rng.pt"
TRACKER_FILE = "latest_checkpointed_iteration.txt"


# ------------------------------------------------------------------------------------- safe loading
class _Ignored:
    """Read in place of a non-weight object; the real class is never imported nor called."""

    qualified_name = "?"

    def __new__(cls, *args, **kwargs):
        return object.__new__(cls)

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass

    def __repr__(self) -> str:
        return f"<ignored {self.qualified_name}>"


# Globals found outside the weights of Megatron checkpoints; they are unpickled as inert _Ignored.
IGNORED_GLOBALS = (
    # np_rng_state = numpy.random.get_state(), under numpy 1.x and 2.x module names.
    "numpy.core.multiarray._reconstruct", "numpy._core.multiarray._reconstruct", "numpy.ndarray", "numpy.dtype",
    "numpy.core.multiarray.scalar", "numpy._core.multiarray.scalar",
    # Enums kept in args: model_type (training.py get_model), --position-embedding-type, --attention-backend.
    "megatron.core.enums.ModelType", "megatron.model.enums.ModelType", "megatron.model.enums.PositionEmbeddingType",
    "megatron.core.transformer.enums.AttnBackend",
    # The pre-2021 fp16 optimizer pickled its loss scaler object (the names load_checkpoint aliases).
    *(f"{m}.{c}" for m in ("fp16.loss_scaler", "megatron.fp16.loss_scaler", "megatron.fp16_deprecated.loss_scaler")
      for c in ("LossScaler", "DynamicLossScaler")),
)


def _stand_ins(names: Iterable[str]) -> list[tuple[type, str]]:
    return [(type(n.rsplit(".", 1)[-1], (_Ignored,), {"qualified_name": n}), n) for n in names]


def load_megatron_checkpoint(path: str | Path, ignore_globals: Iterable[str] = ()) -> dict[str, Any]:
    """Unpickles one Megatron-LM checkpoint file with ``torch.load(weights_only=True)``.

    Tensors, containers and ``argparse.Namespace`` are read as such; the globals in
    :data:`IGNORED_GLOBALS` and ``ignore_globals`` become inert placeholders; any other global is refused.

    Args:
        path: a ``model_optim_rng.pt``.
        ignore_globals: more fully qualified names (``"pkg.module.Class"``) to read as placeholders.

    Raises:
        ValueError: a refused global (named in the message), or a file that is not a torch checkpoint.
    """
    path = Path(path)
    ignored = [*IGNORED_GLOBALS, *ignore_globals]
    try:
        with torch.serialization.safe_globals([argparse.Namespace, *_stand_ins(ignored)]):
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        names = _refused_globals(path, exc, {"argparse.Namespace", *ignored})
        if not names:
            raise ValueError(f"{path} could not be read ({torch_load_reason(exc)}); it is not a torch checkpoint, "
                             "or is corrupted") from exc
        raise ValueError(
            f"{path} was refused: its pickle needs {', '.join(names)}, which bertkit does not load from Megatron "
            "checkpoints (only tensors, argparse.Namespace, numpy RNG state, Megatron's enums and loss scalers). "
            "Loading it could run code. If it is not part of the model weights (optimizer or RNG state, an args "
            f"value), pass --ignore-global {names[0]} (ignore_globals=[...]): it is then read as an inert placeholder, "
            "never imported or called") from exc
    except (RuntimeError, EOFError, OSError) as exc:
        raise ValueError(f"{path} could not be read ({torch_load_reason(exc)}); the file is truncated or not a "
                         "torch checkpoint") from exc
    if not isinstance(checkpoint, dict):
        raise ValueError(f"{path} holds a {type(checkpoint).__name__}, not a Megatron-LM checkpoint dict")
    return checkpoint


def _refused_globals(path: Path, exc: Exception, allowed: set[str]) -> list[str]:
    # torch names only the first global it refuses; list them all where torch can (zip-format files).
    found = re.findall(r"GLOBAL (\S+)", str(exc))
    try:
        found += torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # older torch, or a legacy (non-zip) file
        pass
    return [n for n in dict.fromkeys(found) if n not in allowed]


# ------------------------------------------------------------------------------------ finding shards
def find_megatron_shards(src: str | Path) -> list[Path]:
    """The ``model_optim_rng.pt`` file of each tensor-parallel rank of a Megatron-LM checkpoint, in rank order.

    Raises:
        FileNotFoundError: nothing Megatron-like at ``src`` (the message says what it looks like instead).
        ValueError: pipeline-parallel checkpoints, or gaps in the tensor-parallel ranks.
    """
    src = Path(src)
    if src.is_file():
        return [src]
    if not src.is_dir():
        raise FileNotFoundError(f"{src} does not exist; pass a Megatron-LM checkpoint folder or a {CHECKPOINT_FILE}")
    tracker = src / TRACKER_FILE
    if tracker.is_file():
        text = tracker.read_text().strip()
        sub = "release" if text == "release" else f"iter_{int(text):07d}" if text.isdigit() else None
        if sub is None or not (src / sub).is_dir():
            raise FileNotFoundError(f"{tracker} says {text!r}, but {src / (sub or text)} is not a checkpoint folder")
        src = src / sub
    if (src / CHECKPOINT_FILE).is_file():
        return [src / CHECKPOINT_FILE]
    ranks = sorted(p.name for p in src.glob("mp_rank_*") if p.is_dir())
    if any(not re.fullmatch(r"mp_rank_\d\d", r) for r in ranks):
        raise ValueError(f"{src} is pipeline-parallel ({', '.join(ranks[:4])}...); merge it to pipeline size 1 with "
                         "Megatron-LM's tools/checkpoint_util.py (--target-pipeline-parallel-size 1) first")
    if not ranks:
        hint = ""
        if any(src.glob("*.distcp")) or (src / "metadata.json").is_file():
            hint = (" It looks like a distributed (torch_dist) checkpoint: save it with --ckpt-format torch "
                    "(Megatron-LM's checkpoint converter) first.")
        iters = sorted(p.name for p in src.glob("iter_*"))
        if iters:
            hint = f" It has {', '.join(iters)} but no {TRACKER_FILE}: pass one of those folders."
        raise FileNotFoundError(f"no {CHECKPOINT_FILE} and no mp_rank_NN/ folders in {src}.{hint}")
    if ranks != [f"mp_rank_{r:02d}" for r in range(len(ranks))]:
        raise ValueError(f"{src} has ranks {', '.join(ranks)}: some tensor-parallel ranks are missing")
    missing = [r for r in ranks if not (src / r / CHECKPOINT_FILE).is_file()]
    if missing:
        raise FileNotFoundError(f"{', '.join(missing)} in {src} lack {CHECKPOINT_FILE}")
    return [src / r / CHECKPOINT_FILE for r in ranks]


def _model_state(checkpoint: dict, path: Path) -> dict[str, torch.Tensor]:
    if "model0" in checkpoint:
        raise ValueError(f"{path} uses the virtual-pipeline (interleaved) schedule; convert it to one model chunk "
                         "with Megatron-LM's tools/checkpoint_util.py first")
    model = checkpoint.get("model", checkpoint if "language_model" in checkpoint else None)
    if not isinstance(model, Mapping):
        raise ValueError(f"{path} has no 'model' entry (top-level keys: {', '.join(map(str, checkpoint))}); "
                         "is it a Megatron-LM checkpoint?")
    return _flatten(model, "", path)


def _flatten(tree: Mapping, prefix: str, path: Path) -> dict[str, torch.Tensor]:
    # Megatron nests state_dict_for_save_checkpoint per module ("language_model" -> "embedding" -> ...).
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(_flatten(value, name + ".", path))
        elif isinstance(value, torch.Tensor):
            out[name] = value
        else:
            raise ValueError(f"{path}: model entry {name!r} is a {type(value).__name__}, not a tensor")
    return out


# -------------------------------------------------------------------------------- tensor parallelism
def merge_tensor_parallel(states: list[dict[str, torch.Tensor]], checkpoint_version: float, num_heads: int,
                          check_replicas: bool = True) -> dict[str, torch.Tensor]:
    """Joins the flattened model states of all tensor-parallel ranks into one (see ``TENSOR_PARALLEL_DIMS``).

    Split tensors are concatenated on their split dimension (the fused QKV per head, in the layout of
    ``checkpoint_version``); replicated ones are taken from rank 0 and, if ``check_replicas``, must be
    equal on every rank.
    """
    if len(states) == 1:
        return dict(states[0])
    if num_heads % len(states):
        raise ValueError(f"num_attention_heads={num_heads} is not divisible by the {len(states)} tensor-parallel ranks")
    for rank, state in enumerate(states[1:], 1):
        if state.keys() != states[0].keys():
            diff = sorted(state.keys() ^ states[0].keys())
            raise ValueError(f"tensor-parallel rank {rank} and rank 0 hold different tensors: {', '.join(diff[:5])}")
    layout, out = qkv_layout(checkpoint_version), {}
    for key in states[0]:
        parts = [state[key] for state in states]
        dim = next((d for pattern, d in TENSOR_PARALLEL_DIMS if re.search(pattern, key)), None)
        try:
            if dim == "qkv":
                out[key] = merge_qkv_shards(parts, layout, num_heads)
            elif dim is not None:
                out[key] = torch.cat(parts, dim=dim)
            else:
                out[key] = parts[0]
        except RuntimeError as exc:
            shapes = ", ".join(str(tuple(p.shape)) for p in parts)
            raise ValueError(f"{key}: the tensor-parallel shards do not fit together ({shapes}): {exc}") from exc
        if dim is None and check_replicas:
            bad = [r for r, p in enumerate(parts) if p.shape != parts[0].shape or not torch.equal(p, parts[0])]
            if bad:
                raise ValueError(f"{key} is replicated across tensor-parallel ranks but rank {bad[0]} differs from "
                                 "rank 0: the shards come from different checkpoints, or the copies drifted in "
                                 "training (then pass --no-check-replicas to take rank 0's)")
    return out


# ------------------------------------------------------------------------------------------- config
# HF config field <- Megatron args attribute (megatron/arguments.py), for what shapes cannot tell.
_FROM_ARGS = {"num_attention_heads": "num_attention_heads", "layer_norm_eps": "layernorm_epsilon",
              "hidden_dropout_prob": "hidden_dropout", "attention_probs_dropout_prob": "attention_dropout",
              "initializer_range": "init_method_std"}
# Shape-defining fields: HF field, Megatron args attribute, the tensor and dimension that define it.
_SHAPES = [
    ("vocab_size", "padded_vocab_size", "language_model.embedding.word_embeddings.weight", 0),
    ("hidden_size", "hidden_size", "language_model.embedding.word_embeddings.weight", 1),
    ("intermediate_size", "ffn_hidden_size", "language_model.{encoder}.layers.0.mlp.dense_h_to_4h.weight", 0),
    ("max_position_embeddings", "max_position_embeddings", "language_model.embedding.position_embeddings.weight", 0),
    ("type_vocab_size", None, "language_model.embedding.tokentype_embeddings.weight", 0),
]
_HEADS = [(("lm_head.bias", "binary_head.weight"), "BertForPreTraining"), (("lm_head.bias",), "BertForMaskedLM"),
          (("binary_head.weight",), "BertForNextSentencePrediction")]


def _check_override_names(overrides: dict) -> None:
    from ..config import BertConfig

    known = {f.name for f in dataclasses.fields(BertConfig)}
    known -= {"norm_placement", "model_type", "extra", "architectures"}  # fixed by the conversion
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"unknown config override(s) {', '.join(unknown)}; use BertConfig field names such as "
                         "num_attention_heads, layer_norm_eps, hidden_act")


def _config_fields(state: dict, args: Any, overrides: dict, encoder: str) -> dict[str, Any]:
    arg = lambda name: getattr(args, name, None)  # noqa: E731 -- old checkpoints lack args or some of them
    for name, ok, why in (("apply_residual_connection_post_layernorm", False, "residuals after the LayerNorm"),
                          ("swiglu", False, "a SwiGLU MLP"), ("squared_relu", False, "a squared-ReLU MLP"),
                          ("add_bias_linear", True, "linear layers without biases")):
        if arg(name) is not None and bool(arg(name)) != ok:
            raise ValueError(f"the checkpoint was trained with {name}={arg(name)} ({why}); HF Megatron-BERT "
                             "cannot express that")
    layers = {int(m.group(1)) for k in state if (m := re.match(rf"language_model\.{encoder}\.layers\.(\d+)\.", k))}
    fields = {"num_hidden_layers": max(layers) + 1 if layers else 0}
    if arg("num_layers") not in (None, fields["num_hidden_layers"]):
        raise ValueError(f"the checkpoint holds {fields['num_hidden_layers']} layers but its args say "
                         f"num_layers={arg('num_layers')}")
    for field, arg_name, key, dim in _SHAPES:
        key = key.format(encoder=encoder)
        if key not in state:
            if field != "type_vocab_size":
                raise ValueError(f"the checkpoint has no {key}; is it a Megatron-LM BERT checkpoint?")
            continue  # trained without token types; filled with zeros by the caller
        fields[field] = state[key].shape[dim]
        for said, value in ((f"the checkpoint's args say {arg_name}", arg(arg_name) if arg_name else None),
                            (f"the override says {field}", overrides.get(field))):
            if value is not None and value != fields[field]:
                raise ValueError(f"{key} has shape {tuple(state[key].shape)}, but {said}={value}: either the tensor "
                                 "has the wrong shape or the value is wrong")
    fields.update({f: arg(a) for f, a in _FROM_ARGS.items() if arg(a) is not None})
    fields.setdefault("layer_norm_eps", 1e-5)  # Megatron's --layernorm-epsilon default (HF BERT's is 1e-12)
    # Megatron's default activation is torch's erf GeLU; --openai-gelu is the tanh approximation. (The fused
    # bias-GeLU kernel, megatron/model/fused_bias_gelu.py, also computes the tanh form in the MLP; HF's
    # converter and released Megatron-BERTs use "gelu", which differs by < 1e-3; override if you need it.)
    fields["hidden_act"] = "gelu_new" if arg("openai_gelu") else "gelu"
    fields.update(overrides)
    if arg("kv_channels") not in (None, fields["hidden_size"] // fields["num_attention_heads"]):
        raise ValueError(f"kv_channels={arg('kv_channels')} is not hidden_size / num_attention_heads; "
                         "HF Megatron-BERT cannot express that")
    fields.setdefault("type_vocab_size", 2)
    return fields


def _check_against_model(state: dict, model, table, arch: str) -> None:
    # Every tensor the model expects, with its shape; named in Megatron's terms too.
    prefix = "bert." if arch == "BertModel" else ""
    expected = {prefix + k: tuple(v.shape) for k, v in model.state_dict().items() if k not in model._tied_keys()}
    back = inverse(table)

    def source(key: str) -> str:
        for rule in back:
            if (bound := rule.match(key)) is not None:
                return re.sub(r"\{(\w+)(?::[^}]*)?\}", lambda m: bound[m.group(1)], rule.targets[0])
        return key

    problems = [f"{source(k)} (-> {k}) has shape {tuple(v.shape)}, expected {expected[k]}"
                for k, v in state.items() if k in expected and tuple(v.shape) != expected[k]]
    problems += [f"{source(k)} is missing (-> {k})" for k in expected if k not in state]
    problems += [f"{source(k)} (-> {k}) does not belong in a {arch}" for k in state if k not in expected]
    if problems:
        raise ValueError("the checkpoint does not fit the model its args and shapes describe:\n  "
                         + "\n  ".join(problems[:10]) + ("\n  ..." if len(problems) > 10 else ""))


# --------------------------------------------------------------------------------------- conversion
def convert_megatron_checkpoint(src: str | Path, out_dir: str | Path, *, ignore_globals: Iterable[str] = (),
                                check_replicas: bool = True, dtype: torch.dtype | None = None,
                                vocab_file: str | Path | None = None, **overrides) -> Path:
    """Writes ``config.json`` and ``model.safetensors`` of an HF Megatron-BERT for a Megatron-LM BERT checkpoint.

    Hyper-parameters come from the tensors' shapes and the checkpoint's stored ``args``; keyword
    ``overrides`` (BertConfig field names) win, but shape-defining ones must agree with the tensors.

    Args:
        src: a Megatron-LM checkpoint folder (with ``latest_checkpointed_iteration.txt``), an
            ``iter_XXXXXXX``/``release`` folder of ``mp_rank_NN`` shards, or one ``model_optim_rng.pt``.
        out_dir: the folder to write; created if needed. Files are written atomically.
        ignore_globals: extra pickled globals to read as inert placeholders (see :func:`load_megatron_checkpoint`).
        check_replicas: require replicated tensors (LayerNorms, ...) to be equal on every tensor-parallel rank.
        dtype: cast floating-point weights (default: as stored, often float16).
        vocab_file: a ``vocab.txt`` to copy beside the weights.
        **overrides: config fields, e.g. ``num_attention_heads=16`` when the checkpoint has no args.

    Returns:
        ``out_dir``, loadable with ``bertkit.BertForPreTraining.from_pretrained`` (or the class in
        ``config.json["architectures"]``) and ``transformers.MegatronBertForPreTraining``.

    Raises:
        FileNotFoundError: no checkpoint at ``src``.
        ValueError: a refused pickle global, unknown or missing tensors, shapes or args that do not fit.
    """
    from .. import models
    from ..config import BertConfig

    _check_override_names(overrides)
    vocab = Path(vocab_file).read_bytes() if vocab_file is not None else None  # fail before writing anything
    states, args, version = _read_shards(src, ignore_globals)
    encoder = "transformer" if any(k.startswith("language_model.transformer.") for k in states[0]) else "encoder"
    attention = "attention" if any(re.search(r"\.layers\.\d+\.attention\.", k) for k in states[0]) else "self_attention"
    heads = overrides.get("num_attention_heads", getattr(args, "num_attention_heads", None))
    if heads is None:
        raise ValueError("the checkpoint does not store its args, so the number of attention heads is unknown "
                         "(shapes cannot tell it): pass --num-attention-heads N (num_attention_heads=N)")
    state = merge_tensor_parallel(states, version, heads, check_replicas)
    fields = _config_fields(state, args, {**overrides, "num_attention_heads": heads}, encoder)
    table = megatron_bert_table(version, heads, encoder, attention)
    converted = apply(table, state)
    word = converted["bert.embeddings.word_embeddings.weight"]
    if "bert.embeddings.token_type_embeddings.weight" not in converted:
        # Trained without token types (no --bert-binary-head): zero rows add nothing, as in Megatron.
        converted["bert.embeddings.token_type_embeddings.weight"] = word.new_zeros(fields["type_vocab_size"],
                                                                                  word.shape[1])
    arch = next((a for keys, a in _HEADS if all(k in state for k in keys)), "BertModel")
    config = BertConfig(norm_placement="pre", architectures=[arch], **fields)
    with torch.device("meta"):
        model = getattr(models, arch)(config)
    _check_against_model(converted, model, table, arch)
    if dtype is not None:
        converted = {k: v.to(dtype) if v.is_floating_point() else v for k, v in converted.items()}
    # As save_pretrained does: the dtype the weights are stored in (transformers reads it).
    config.extra["dtype"] = str(converted["bert.embeddings.word_embeddings.weight"].dtype).removeprefix("torch.")

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_safetensors(converted, out_dir / SAFE_WEIGHTS, metadata={"source": "megatron-lm",
                                                                   "checkpoint_version": str(version)})
    config.save_pretrained(out_dir)  # after the weights: a config.json means a complete folder
    if vocab is not None:
        atomic_write_bytes(out_dir / "vocab.txt", vocab)
    return out_dir


def _read_shards(src: str | Path, ignore_globals: Iterable[str]) -> tuple[list[dict], Any, float]:
    """The flattened model state of every tensor-parallel rank, the args and the checkpoint version."""
    paths = find_megatron_shards(src)
    checkpoints = [load_megatron_checkpoint(p, ignore_globals) for p in paths]
    first, args = checkpoints[0], checkpoints[0].get("args")
    for path, ck in zip(paths[1:], checkpoints[1:]):
        for entry in ("checkpoint_version", "iteration"):
            if ck.get(entry) != first.get(entry):
                raise ValueError(f"{path} has {entry}={ck.get(entry)} but {paths[0]} has {first.get(entry)}: "
                                 "the shards come from different checkpoints")
    tp = getattr(args, "tensor_model_parallel_size", getattr(args, "model_parallel_size", None))
    if tp not in (None, len(paths)):
        raise ValueError(f"{paths[0]} was saved with tensor_model_parallel_size={tp} but {len(paths)} shard(s) "
                         "were found; pass the iter_XXXXXXX folder that holds every mp_rank_NN")
    if getattr(args, "pipeline_model_parallel_size", 1) not in (None, 1):
        raise ValueError(f"{src} is pipeline-parallel; merge it to pipeline size 1 with Megatron-LM's "
                         "tools/checkpoint_util.py first")
    states = [_model_state(ck, p) for ck, p in zip(checkpoints, paths)]
    if not any(k.startswith("language_model.") for k in states[0]) and \
            any(k.startswith(("embedding.", "encoder.", "decoder.")) for k in states[0]):
        raise ValueError(f"{paths[0]} uses Megatron-core (mcore) module names ({next(iter(states[0]))}, ...); "
                         "only the legacy megatron/model BERT layout (language_model.*) is supported")
    # load_checkpoint reads a missing version as 0 (megatron/checkpointing.py).
    return states, args, first.get("checkpoint_version", 0)


# ----------------------------------------------------------------------------------------------- CLI
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def add_megatron_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Adds the arguments of ``bertkit convert megatron-lm SRC OUT [--num-attention-heads N] ...``."""
    parser.add_argument("src", metavar="SRC", help="Megatron-LM checkpoint folder (with latest_checkpointed_iteration.txt), "
                                    "an iter_XXXXXXX/ or release/ folder, or a model_optim_rng.pt")
    parser.add_argument("out_dir", metavar="OUT", help="folder to write config.json and model.safetensors into")
    parser.add_argument("--num-attention-heads", type=int, metavar="N", help="needed when the checkpoint stores no args")
    parser.add_argument("--max-position-embeddings", type=int, metavar="N", help="checked against the position embeddings")
    parser.add_argument("--layer-norm-eps", type=float, metavar="EPS", help="default: args.layernorm_epsilon, else 1e-5")
    parser.add_argument("--hidden-act", metavar="NAME", help="default: gelu (erf), gelu_new with args.openai_gelu")
    parser.add_argument("--dtype", choices=sorted(_DTYPES), help="cast the weights (default: as stored)")
    parser.add_argument("--vocab-file", metavar="PATH", help="a vocab.txt to copy into OUT")
    parser.add_argument("--ignore-global", action="append", default=[], metavar="NAME",
                        help="read this pickled global (e.g. an optimizer class) as an inert placeholder; repeatable")
    parser.add_argument("--no-check-replicas", dest="check_replicas", action="store_false",
                        help="take replicated tensors from rank 0 without checking the other ranks agree")
    parser.set_defaults(func=cli_convert_megatron)
    return parser


def cli_convert_megatron(args: argparse.Namespace) -> int:
    """Runs the conversion for parsed CLI arguments (see :func:`add_megatron_arguments`)."""
    names = ("num_attention_heads", "max_position_embeddings", "layer_norm_eps", "hidden_act")
    overrides = {name: getattr(args, name) for name in names if getattr(args, name) is not None}
    out = convert_megatron_checkpoint(args.src, args.out_dir, ignore_globals=args.ignore_global,
                                      check_replicas=args.check_replicas, dtype=_DTYPES.get(args.dtype),
                                      vocab_file=args.vocab_file, **overrides)
    from ..config import BertConfig

    config = BertConfig.from_pretrained(out)
    print(f"wrote {out / SAFE_WEIGHTS} and {out / 'config.json'} ({config.architectures[0]}: "
          f"{config.num_hidden_layers} layers, hidden {config.hidden_size}, {config.num_attention_heads} heads, "
          f"vocab {config.vocab_size})")
    return 0
