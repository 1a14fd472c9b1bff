"""NVIDIA Megatron-LM BERT checkpoints (the ``megatron/model`` layout) -> HF Megatron-BERT names.

Source names are those of Megatron's nested ``state_dict["model"]`` flattened with dots
(``language_model.encoder.layers.0.self_attention.query_key_value.weight``); the nesting comes from
``state_dict_for_save_checkpoint`` in NVIDIA/Megatron-LM ``megatron/model/bert_model.py``
(``language_model``, ``lm_head``, ``binary_head``) and ``megatron/model/language_model.py``
(``embedding``, ``encoder`` -- ``transformer`` before Megatron-LM 2.x -- and ``pooler``).

Targets are HF Megatron-BERT names (``attention.ln``, ``ln``, ``bert.encoder.ln``). The MLM decoder
matrix is the word embedding matrix (Megatron's ``parallel_lm_logits`` multiplies by it), so only
its bias is stored, as for every HF BERT; loaders tie the rest.
"""

from __future__ import annotations

import torch

from ..convert import Rule, copy, split

# Megatron fuses Q, K and V into one ColumnParallelLinear whose 3 * heads * head_dim output rows were
# laid out differently over time. The axes of each layout, outermost first:
#   * version >= 2.0: (head, qkv, dim) -- ParallelAttention.forward views the output as
#     [sq, b, np, 3 * hn] and splits the last axis into q, k, v (megatron/model/transformer.py);
#   * version 1.0: (head, dim, qkv), and version 0: (qkv, head, dim) -- what
#     fix_query_key_value_ordering / _transpose_first_dim in megatron/checkpointing.py turn into the
#     2.0 order when Megatron reads an old checkpoint (num_splits_first=True for 0, False for 1.0).
# HF's old converter (transformers/models/megatron_bert/convert_megatron_bert_checkpoint.py,
# fix_query_key_value_ordering) reads them the same way. Version 3.0 changed only the saved args.
QKV_AXES = ("qkv", "head", "dim")
QKV_LAYOUTS: dict[float, tuple[str, str, str]] = {0.0: ("qkv", "head", "dim"), 1.0: ("head", "dim", "qkv"),
                                                  2.0: ("head", "qkv", "dim")}


def qkv_layout(checkpoint_version: float) -> tuple[str, str, str]:
    """The axis order of the fused QKV rows for a ``checkpoint_version`` (0, 1.0, or >= 2.0)."""
    if checkpoint_version >= 2.0:
        return QKV_LAYOUTS[2.0]
    if checkpoint_version in (0, 1.0):
        return QKV_LAYOUTS[float(checkpoint_version)]
    raise ValueError(f"checkpoint_version {checkpoint_version!r} is unknown: Megatron-LM wrote 0, 1.0, 2.0 "
                     "and 3.0; pass the version the checkpoint was saved with")


def _unfuse(x: torch.Tensor, layout: tuple[str, str, str], heads: int) -> torch.Tensor:
    """(3 * heads * head_dim, ...) in ``layout`` -> (3, heads, head_dim, ...)."""
    if x.shape[0] % (3 * heads):
        raise ValueError(f"{x.shape[0]} fused rows are not 3 x num_attention_heads ({heads}) x head_dim; "
                         "is num_attention_heads right?")
    sizes = {"qkv": 3, "head": heads, "dim": x.shape[0] // (3 * heads)}
    rest = tuple(x.shape[1:])
    t = x.reshape(*(sizes[a] for a in layout), *rest)
    return t.permute(*(layout.index(a) for a in QKV_AXES), *range(3, 3 + len(rest)))


def split_qkv(x: torch.Tensor, layout: tuple[str, str, str], heads: int) -> tuple[torch.Tensor, ...]:
    """Splits a fused QKV weight or bias into separate query, key and value tensors."""
    t = _unfuse(x, layout, heads)
    t = t.reshape(3, -1, *x.shape[1:])
    return tuple(part.clone() for part in t)  # own storage each: safetensors refuses shared tensors


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: tuple[str, str, str],
             heads: int) -> torch.Tensor:
    """Inverse of :func:`split_qkv`: query, key and value into Megatron's fused rows."""
    rest = tuple(q.shape[1:])
    t = torch.stack([q, k, v]).reshape(3, heads, q.shape[0] // heads, *rest)
    t = t.permute(*(QKV_AXES.index(a) for a in layout), *range(3, 3 + len(rest)))
    return t.reshape(-1, *rest).contiguous()


def merge_qkv_shards(shards: list[torch.Tensor], layout: tuple[str, str, str], heads: int) -> torch.Tensor:
    """The fused QKV of the whole model from its tensor-parallel shards.

    Each rank holds the fused rows of *its* heads (ParallelAttention uses
    num_attention_heads_per_partition), so shards cannot simply be stacked when the head axis is not
    the outermost one (version 0): each is viewed in the layout and joined on the head axis.
    """
    per_rank = heads // len(shards)
    views = []
    for x in shards:
        sizes = {"qkv": 3, "head": per_rank, "dim": x.shape[0] // (3 * per_rank)}
        views.append(x.reshape(*(sizes[a] for a in layout), *x.shape[1:]))
    return torch.cat(views, dim=layout.index("head")).reshape(-1, *shards[0].shape[1:])


# How tensor parallelism cut each tensor (megatron/mpu/layers.py, megatron/core/tensor_parallel/layers.py):
# ColumnParallelLinear splits output rows (dim 0), RowParallelLinear input columns (dim 1, its bias is
# replicated), VocabParallelEmbedding the vocabulary rows, and BertLMHead's bias follows the
# vocabulary (set_tensor_model_parallel_attributes(bias, True, 0, 1)). Anything else is replicated.
# Patterns are matched with re.search on the flattened source names.
TENSOR_PARALLEL_DIMS: list[tuple[str, int | str]] = [
    (r"\.query_key_value\.(weight|bias)$", "qkv"),
    (r"\.mlp\.dense_h_to_4h\.(weight|bias)$", 0),
    (r"^language_model\.embedding\.word_embeddings\.weight$", 0),
    (r"^lm_head\.bias$", 0),
    (r"\.(self_attention|attention)\.dense\.weight$", 1),
    (r"\.mlp\.dense_4h_to_h\.weight$", 1),
]


def _linear(src: str, dst: str) -> list[Rule]:
    # Megatron's Linear layers are torch (out, in) matrices, as HF's: no transpose.
    return [copy(f"{src}.weight", f"{dst}.weight"), copy(f"{src}.bias", f"{dst}.bias")]


def megatron_bert_table(checkpoint_version: float, num_heads: int, encoder: str = "encoder",
                        attention: str = "self_attention") -> list[Rule]:
    """The rules for one checkpoint's names and QKV layout.

    Args:
        checkpoint_version: ``state_dict["checkpoint_version"]`` (0 when absent); picks the QKV layout.
        num_heads: attention heads of the whole model (after merging tensor-parallel shards).
        encoder: ``"encoder"`` (Megatron-LM >= 2.x) or ``"transformer"`` (older).
        attention: ``"self_attention"`` (Megatron-LM >= 2.x) or ``"attention"`` (older).

    Returns:
        Rules for :func:`bertkit.checkpoints.convert.apply`; ``inverse`` of them writes this layout.
    """
    layout = qkv_layout(checkpoint_version)
    src, dst = f"language_model.{encoder}.layers.{{i:\\d+}}", "bert.encoder.layer.{i}"
    qkv = [f"{dst}.attention.self.{p}" for p in ("query", "key", "value")]
    return [
        copy("language_model.embedding.word_embeddings.weight", "bert.embeddings.word_embeddings.weight"),
        copy("language_model.embedding.position_embeddings.weight", "bert.embeddings.position_embeddings.weight"),
        copy("language_model.embedding.tokentype_embeddings.weight", "bert.embeddings.token_type_embeddings.weight"),
        # Pre-LayerNorm: input_layernorm feeds attention, post_attention_layernorm feeds the MLP.
        *_linear(f"{src}.input_layernorm", f"{dst}.attention.ln"),
        *(split(f"{src}.{attention}.query_key_value.{p}", [f"{t}.{p}" for t in qkv],
                lambda x: split_qkv(x, layout, num_heads),
                lambda q, k, v: fuse_qkv(q, k, v, layout, num_heads)) for p in ("weight", "bias")),
        *_linear(f"{src}.{attention}.dense", f"{dst}.attention.output.dense"),
        *_linear(f"{src}.post_attention_layernorm", f"{dst}.ln"),
        *_linear(f"{src}.mlp.dense_h_to_4h", f"{dst}.intermediate.dense"),
        *_linear(f"{src}.mlp.dense_4h_to_h", f"{dst}.output.dense"),
        *_linear(f"language_model.{encoder}.final_layernorm", "bert.encoder.ln"),
        *_linear("language_model.pooler.dense", "bert.pooler.dense"),
        # BertLMHead: dense -> GeLU -> layernorm, then logits against the word embeddings + bias.
        *_linear("lm_head.dense", "cls.predictions.transform.dense"),
        *_linear("lm_head.layernorm", "cls.predictions.transform.LayerNorm"),
        copy("lm_head.bias", "cls.predictions.bias"),
        *_linear("binary_head", "cls.seq_relationship"),  # NSP on the tanh pooler
    ]
