"""Megatron-LM BERT checkpoints -> HF Megatron-BERT folders (``bertkit convert megatron-lm``).

No real Megatron checkpoint can be downloaded here, so each test writes one the way Megatron-LM's
save_checkpoint does (megatron/checkpointing.py): a pickled dict with the nested ``model`` state
(bert_model.py / language_model.py ``state_dict_for_save_checkpoint``), an ``args`` Namespace holding a
Megatron enum, ``checkpoint_version``, ``iteration``, optimizer state with an old-style loss scaler
object, and python/numpy/torch RNG states. The fused QKV rows are laid out here, independently of
bertkit, from separate random Q/K/V matrices; the reference forward reads them back from the fused
activations the way each Megatron version does.
"""

from __future__ import annotations

import argparse
import enum
import math
import os
import random
import sys
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers
from safetensors.torch import load_file

import bertkit
from bertkit.checkpoints.convert import apply, inverse
from bertkit.checkpoints.megatron import (add_megatron_arguments, cli_convert_megatron, convert_megatron_checkpoint,
                                          load_megatron_checkpoint)
from bertkit.checkpoints.tables.megatron_lm import megatron_bert_table

# eps is not Megatron's default 1e-5, so a converter that ignores args.layernorm_epsilon is caught.
CFG = dict(vocab=40, hidden=16, heads=4, layers=2, ffn=40, positions=24, tokentypes=2, eps=1e-3)
HEAD_DIM = CFG["hidden"] // CFG["heads"]
ENC = "language_model.encoder.layers"


# ------------------------------------------------------------------------- fake Megatron modules
# Classes a real checkpoint pickles by reference; pickle needs them importable under Megatron's names.
def _fake_module(name: str, **members) -> types.ModuleType:
    module = types.ModuleType(name)
    for attr, obj in members.items():
        obj.__module__, obj.__qualname__ = name, attr
        setattr(module, attr, obj)
    return module


class ModelType(enum.Enum):  # megatron.core.enums.ModelType, stored in args by training.get_model
    encoder_or_decoder = 1


class DynamicLossScaler:  # megatron.fp16.loss_scaler, pickled whole by the pre-2021 fp16 optimizer
    def __init__(self):
        self.cur_scale, self.cur_iter = 65536.0, 7


@pytest.fixture(autouse=True)
def one_thread():
    # The models here are tiny: on a busy 2-core machine, waking a second thread per matmul costs more than
    # the matmul (4x slower tests). Restored afterwards for the other test files.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def megatron_modules(monkeypatch):
    for name, module in {
        "megatron": types.ModuleType("megatron"), "megatron.core": types.ModuleType("megatron.core"),
        "megatron.core.enums": _fake_module("megatron.core.enums", ModelType=ModelType),
        "megatron.fp16": types.ModuleType("megatron.fp16"),
        "megatron.fp16.loss_scaler": _fake_module("megatron.fp16.loss_scaler", DynamicLossScaler=DynamicLossScaler),
    }.items():
        monkeypatch.setitem(sys.modules, name, module)


# --------------------------------------------------------------------------- building checkpoints
def random_weights(seed: int = 0, tokentypes: bool = True, heads: bool = True) -> dict:
    """Flat Megatron names -> tensors; each fused QKV is kept as its (q, k, v) parts until saving."""
    g = torch.Generator().manual_seed(seed)
    h, f = CFG["hidden"], CFG["ffn"]
    rnd = lambda *shape, s=0.3: torch.randn(*shape, generator=g) * s  # noqa: E731
    ln = lambda: (1 + rnd(h, s=0.5), rnd(h, s=0.5))  # noqa: E731 -- far from (1, 0), so a swapped LN shows
    w = {"language_model.embedding.word_embeddings.weight": rnd(CFG["vocab"], h, s=1.0),
         "language_model.embedding.position_embeddings.weight": rnd(CFG["positions"], h, s=1.0)}
    if tokentypes:
        w["language_model.embedding.tokentype_embeddings.weight"] = rnd(CFG["tokentypes"], h, s=1.0)
    for i in range(CFG["layers"]):
        p = f"{ENC}.{i}."
        w[p + "input_layernorm.weight"], w[p + "input_layernorm.bias"] = ln()
        w[p + "self_attention.query_key_value.weight"] = tuple(rnd(h, h) for _ in range(3))
        w[p + "self_attention.query_key_value.bias"] = tuple(rnd(h) for _ in range(3))
        w[p + "self_attention.dense.weight"], w[p + "self_attention.dense.bias"] = rnd(h, h), rnd(h)
        w[p + "post_attention_layernorm.weight"], w[p + "post_attention_layernorm.bias"] = ln()
        w[p + "mlp.dense_h_to_4h.weight"], w[p + "mlp.dense_h_to_4h.bias"] = rnd(f, h), rnd(f)
        w[p + "mlp.dense_4h_to_h.weight"], w[p + "mlp.dense_4h_to_h.bias"] = rnd(h, f), rnd(h)
    w["language_model.encoder.final_layernorm.weight"], w["language_model.encoder.final_layernorm.bias"] = ln()
    w["lm_head.dense.weight"], w["lm_head.dense.bias"] = rnd(h, h), rnd(h)
    w["lm_head.layernorm.weight"], w["lm_head.layernorm.bias"] = ln()
    w["lm_head.bias"] = rnd(CFG["vocab"])
    if heads:
        w["language_model.pooler.dense.weight"], w["language_model.pooler.dense.bias"] = rnd(h, h), rnd(h)
        w["binary_head.weight"], w["binary_head.bias"] = rnd(2, h), rnd(2)
    return w


def fuse(q, k, v, version: float) -> torch.Tensor:
    """Megatron's fused rows for these heads: v0 all Q then K then V; v1 per row q,k,v; v2 per head Q,K,V."""
    rest = q.shape[1:]
    if version == 0:
        return torch.cat([q, k, v])
    if version == 1.0:
        return torch.stack([q, k, v], dim=1).reshape(-1, *rest)
    n = q.shape[0] // HEAD_DIM
    return torch.stack([x.reshape(n, HEAD_DIM, *rest) for x in (q, k, v)], dim=1).reshape(-1, *rest)


COLUMN = ("word_embeddings.weight", "dense_h_to_4h.weight", "dense_h_to_4h.bias", "lm_head.bias")
ROW = ("attention.dense.weight", "dense_4h_to_h.weight")


def rank_state(w: dict, version: float, rank: int = 0, tp: int = 1) -> dict[str, torch.Tensor]:
    """What tensor-parallel rank ``rank`` of ``tp`` holds: its heads' fused QKV, its rows/columns."""
    out = {}
    for key, value in w.items():
        if isinstance(value, tuple):  # this rank's heads of Q, K and V, fused in the version's order
            out[key] = fuse(*(x.chunk(tp)[rank] for x in value), version)
        elif key.endswith(COLUMN):
            out[key] = value.chunk(tp, dim=0)[rank].clone()
        elif key.endswith(ROW):
            out[key] = value.chunk(tp, dim=1)[rank].clone()
        else:
            out[key] = value.clone()
    return out


def nest(flat: dict[str, torch.Tensor]) -> dict:
    """Megatron's nesting: module dicts down to embedding tables and encoder/pooler/head state dicts."""
    model: dict = {}
    for key, value in flat.items():
        parts = key.split(".")
        if parts[0] == "language_model" and parts[1] == "embedding":
            path, leaf = parts[:3], ".".join(parts[3:])  # embedding -> word_embeddings -> {"weight"}
        elif parts[0] == "language_model":
            path, leaf = parts[:2], ".".join(parts[2:])  # encoder / pooler: a plain module state dict
        else:
            path, leaf = parts[:1], ".".join(parts[1:])  # lm_head / binary_head
        node = model
        for part in path:
            node = node.setdefault(part, {})
        node[leaf] = value
    return model


def megatron_args(**changes) -> argparse.Namespace:
    args = dict(num_layers=CFG["layers"], hidden_size=CFG["hidden"], num_attention_heads=CFG["heads"],
                ffn_hidden_size=CFG["ffn"], max_position_embeddings=CFG["positions"], padded_vocab_size=CFG["vocab"],
                layernorm_epsilon=CFG["eps"], tensor_model_parallel_size=1, pipeline_model_parallel_size=1,
                hidden_dropout=0.1, attention_dropout=0.1, init_method_std=0.02, kv_channels=HEAD_DIM,
                openai_gelu=False, params_dtype=torch.float32, model_type=ModelType.encoder_or_decoder,
                tokenizer_type="BertWordPieceLowerCase", data_path=["corpus_text_sentence"])
    args.update(changes)
    return argparse.Namespace(**args)


def checkpoint(flat: dict, version: float, args: argparse.Namespace | None) -> dict:
    params = list(flat.values())
    ck = {"model": nest(flat), "checkpoint_version": version, "iteration": 100,
          "optimizer": {"optimizer": {"state": {0: {"exp_avg": torch.zeros_like(params[0])}},
                                      "param_groups": [{"lr": 1e-4, "betas": (0.9, 0.999), "params": [0]}]},
                        "loss_scaler": DynamicLossScaler(), "fp32_from_fp16": [[p.float() for p in params[:2]]]},
          "lr_scheduler": {"num_steps": 100, "max_lr": 1e-4},
          "random_rng_state": random.getstate(), "np_rng_state": np.random.get_state(),
          "torch_rng_state": torch.get_rng_state(), "rng_tracker_states": {"model-parallel-rng": torch.get_rng_state()}}
    if version == 0:
        del ck["checkpoint_version"]  # the first checkpoints had no version; load_checkpoint reads 0
    if args is not None:
        ck["args"] = args
    return ck


def save_megatron(root, w: dict, version: float, tp: int = 1, args=None, no_args: bool = False, legacy=False):
    """Writes root/latest_checkpointed_iteration.txt and root/iter_0000100/mp_rank_NN/model_optim_rng.pt.

    ``legacy`` uses torch's pre-1.6 (non-zip) file format, which the first Megatron-LM releases wrote.
    """
    args = None if no_args else (args or megatron_args(tensor_model_parallel_size=tp))
    for rank in range(tp):
        folder = root / "iter_0000100" / f"mp_rank_{rank:02d}"
        folder.mkdir(parents=True)
        torch.save(checkpoint(rank_state(w, version, rank, tp), version, args), folder / "model_optim_rng.pt",
                   _use_new_zipfile_serialization=not legacy)
    (root / "latest_checkpointed_iteration.txt").write_text("100")
    return root


# ---------------------------------------------------------------------------- reference forward
def layer_norm(x, m, name, eps):
    return F.layer_norm(x, x.shape[-1:], m[name + ".weight"], m[name + ".bias"], eps)


def megatron_forward(m: dict, version: float, ids, types_, eps=CFG["eps"]):
    """Megatron-BERT's forward written from its TP=1 state dict (fused QKV as that version stores it)."""
    b, s = ids.shape
    x = m["language_model.embedding.word_embeddings.weight"][ids] + \
        m["language_model.embedding.position_embeddings.weight"][torch.arange(s)]
    if "language_model.embedding.tokentype_embeddings.weight" in m:
        x = x + m["language_model.embedding.tokentype_embeddings.weight"][types_]
    n, d = CFG["heads"], HEAD_DIM
    for i in range(CFG["layers"]):
        p = f"{ENC}.{i}."
        h = layer_norm(x, m, p + "input_layernorm", eps)
        mixed = F.linear(h, m[p + "self_attention.query_key_value.weight"], m[p + "self_attention.query_key_value.bias"])
        if version >= 2.0:  # ParallelAttention: view [.., np, 3 * hn], split the last axis
            q, k, v = mixed.view(b, s, n, 3 * d).split(d, dim=-1)
        elif version == 1.0:  # [.., np, hn, 3]
            q, k, v = mixed.view(b, s, n, d, 3).unbind(-1)
        else:  # [.., 3, np, hn]
            q, k, v = mixed.view(b, s, 3, n, d).unbind(2)
        probs = torch.softmax(torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(d), dim=-1)
        ctx = torch.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, s, n * d)
        x = x + F.linear(ctx, m[p + "self_attention.dense.weight"], m[p + "self_attention.dense.bias"])
        h = layer_norm(x, m, p + "post_attention_layernorm", eps)
        h = F.gelu(F.linear(h, m[p + "mlp.dense_h_to_4h.weight"], m[p + "mlp.dense_h_to_4h.bias"]))  # erf GeLU
        x = x + F.linear(h, m[p + "mlp.dense_4h_to_h.weight"], m[p + "mlp.dense_4h_to_h.bias"])
    x = layer_norm(x, m, "language_model.encoder.final_layernorm", eps)
    t = layer_norm(F.gelu(F.linear(x, m["lm_head.dense.weight"], m["lm_head.dense.bias"])), m, "lm_head.layernorm", eps)
    lm = t @ m["language_model.embedding.word_embeddings.weight"].T + m["lm_head.bias"]
    if "binary_head.weight" not in m:
        return lm, None
    pooled = torch.tanh(F.linear(x[:, 0], m["language_model.pooler.dense.weight"], m["language_model.pooler.dense.bias"]))
    return lm, F.linear(pooled, m["binary_head.weight"], m["binary_head.bias"])


def inputs():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, CFG["vocab"], (3, 11), generator=g)
    return ids, (torch.arange(11) >= 6).long().expand(3, 11)


def assert_outputs_match(out, w, version, eps=CFG["eps"]):
    ids, types_ = inputs()
    lm, nsp = megatron_forward(rank_state(w, version), version, ids, types_, eps)
    ours = bertkit.BertForPreTraining.from_pretrained(out)
    hf = transformers.MegatronBertForPreTraining.from_pretrained(out).eval()
    with torch.no_grad():
        for model in (ours, hf):
            o = model(input_ids=ids, token_type_ids=types_)
            torch.testing.assert_close(o.prediction_logits, lm, atol=2e-5, rtol=1e-5)
            torch.testing.assert_close(o.seq_relationship_logits, nsp, atol=2e-5, rtol=1e-5)


def tensors(folder) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


# ------------------------------------------------------------------------------------------ tests
@pytest.mark.parametrize("version", [0, 1.0, 2.0, 3.0])
def test_each_checkpoint_version_converts_to_megatron_outputs(tmp_path, version):
    w = random_weights()
    src = save_megatron(tmp_path / "ckpt", w, version, legacy=version == 0)
    out = convert_megatron_checkpoint(src, tmp_path / "hf")
    assert_outputs_match(out, w, version)
    config = bertkit.BertConfig.from_pretrained(out)
    assert (config.model_type, config.architectures, config.layer_norm_eps) == ("megatron-bert", ["BertForPreTraining"], 1e-3)
    assert (config.num_attention_heads, config.intermediate_size, config.hidden_act) == (4, 40, "gelu")


@pytest.mark.parametrize("version", [0, 1.0, 2.0])
def test_tensor_parallel_shards_convert_to_the_single_file_result(tmp_path, version):
    w = random_weights(seed=3)
    single = convert_megatron_checkpoint(save_megatron(tmp_path / "tp1", w, version), tmp_path / "hf1")
    sharded = convert_megatron_checkpoint(save_megatron(tmp_path / "tp2", w, version, tp=2), tmp_path / "hf2")
    a, b = tensors(single), tensors(sharded)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert_outputs_match(sharded, w, version)


def test_old_names_transformer_and_attention_convert_identically(tmp_path):
    w = random_weights(seed=4)
    new = convert_megatron_checkpoint(save_megatron(tmp_path / "new", w, 2.0), tmp_path / "hf_new")
    for stack, attn in (("transformer", "attention"), ("encoder", "attention"), ("transformer", "self_attention")):
        old = {k.replace("language_model.encoder.", f"language_model.{stack}.").replace(".self_attention.", f".{attn}."): v
               for k, v in w.items()}
        out = convert_megatron_checkpoint(save_megatron(tmp_path / f"{stack}_{attn}", old, 2.0), tmp_path / f"hf_{stack}_{attn}")
        a, b = tensors(new), tensors(out)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), (stack, attn)


def test_padded_vocabulary_is_read_from_the_embeddings(tmp_path):
    # A tokenizer of 37 words padded to 40 rows (make-vocab-size-divisible-by): the 40 rows are kept.
    w = random_weights(seed=5)
    out = convert_megatron_checkpoint(save_megatron(tmp_path / "ckpt", w, 2.0), tmp_path / "hf")
    model = bertkit.BertForPreTraining.from_pretrained(out)
    assert model.config.vocab_size == 40 and tensors(out)["cls.predictions.bias"].shape == (40,)
    src = save_megatron(tmp_path / "bad", w, 2.0, args=megatron_args(padded_vocab_size=37))
    with pytest.raises(ValueError, match=r"word_embeddings\.weight has shape \(40, 16\), but the checkpoint's "
                                         r"args say padded_vocab_size=37"):
        convert_megatron_checkpoint(src, tmp_path / "hf_bad")


def test_without_args_heads_are_required_and_epsilon_defaults_to_megatrons(tmp_path):
    w = random_weights(seed=6)
    src = save_megatron(tmp_path / "ckpt", w, 2.0, no_args=True)
    with pytest.raises(ValueError, match="number of attention heads is unknown.*--num-attention-heads"):
        convert_megatron_checkpoint(src, tmp_path / "hf")
    out = convert_megatron_checkpoint(src, tmp_path / "hf", num_attention_heads=4)
    assert bertkit.BertConfig.from_pretrained(out).layer_norm_eps == 1e-5
    assert_outputs_match(out, w, 2.0, eps=1e-5)
    with pytest.raises(ValueError, match=r"position_embeddings\.weight has shape \(24, 16\), but the override says "
                                         r"max_position_embeddings=512"):
        convert_megatron_checkpoint(src, tmp_path / "hf2", num_attention_heads=4, max_position_embeddings=512)
    with pytest.raises(ValueError, match="unknown config override.*num_heads"):
        convert_megatron_checkpoint(src, tmp_path / "hf3", num_heads=4)


def test_masked_lm_checkpoint_without_binary_head_or_token_types(tmp_path):
    # --no-bert-binary-head: no pooler, no NSP head, num_tokentypes=0.
    w = random_weights(seed=7, tokentypes=False, heads=False)
    out = convert_megatron_checkpoint(save_megatron(tmp_path / "ckpt", w, 2.0), tmp_path / "hf")
    assert bertkit.BertConfig.from_pretrained(out).architectures == ["BertForMaskedLM"]
    assert not tensors(out)["bert.embeddings.token_type_embeddings.weight"].any()
    ids, types_ = inputs()
    lm, _ = megatron_forward(rank_state(w, 2.0), 2.0, ids, types_)
    with torch.no_grad():
        for model in (bertkit.BertForMaskedLM.from_pretrained(out), transformers.MegatronBertForMaskedLM.from_pretrained(out)):
            torch.testing.assert_close(model(input_ids=ids, token_type_ids=types_).logits, lm, atol=2e-5, rtol=1e-5)


def test_unknown_key_is_named(tmp_path):
    w = random_weights()
    w[f"{ENC}.0.self_attention.rotary_emb.inv_freq"] = torch.ones(2)
    with pytest.raises(ValueError, match=r"(?s)1 key\(s\) match no rule.*'language_model\.encoder\.layers\.0\."
                                         r"self_attention\.rotary_emb\.inv_freq'"):
        convert_megatron_checkpoint(save_megatron(tmp_path / "ckpt", w, 2.0), tmp_path / "hf")
    assert not (tmp_path / "hf").exists()  # nothing written
    # Megatron-core models name modules differently (embedding., decoder.layers.N.self_attention.linear_qkv).
    path = tmp_path / "mcore.pt"
    torch.save({"model": {"embedding.word_embeddings.weight": torch.ones(4, 2),
                          "decoder.layers.0.self_attention.linear_qkv.weight": torch.ones(6, 2)}}, path)
    with pytest.raises(ValueError, match=r"Megatron-core \(mcore\) module names \(embedding\.word_embeddings"):
        convert_megatron_checkpoint(path, tmp_path / "hf")


def test_wrong_shape_is_named(tmp_path):
    w = random_weights()
    w[f"{ENC}.1.mlp.dense_4h_to_h.weight"] = w[f"{ENC}.1.mlp.dense_4h_to_h.weight"].T.contiguous()
    with pytest.raises(ValueError, match=r"language_model\.encoder\.layers\.1\.mlp\.dense_4h_to_h\.weight \(-> "
                                         r"bert\.encoder\.layer\.1\.output\.dense\.weight\) has shape \(40, 16\), "
                                         r"expected \(16, 40\)"):
        convert_megatron_checkpoint(save_megatron(tmp_path / "ckpt", w, 2.0), tmp_path / "hf")
    w = random_weights()
    w["lm_head.bias"] = w["lm_head.bias"][:-1]
    with pytest.raises(ValueError, match=r"lm_head\.bias \(-> cls\.predictions\.bias\) has shape \(39,\)"):
        convert_megatron_checkpoint(save_megatron(tmp_path / "ckpt2", w, 2.0), tmp_path / "hf")
    with pytest.raises(ValueError, match=r"48 fused rows are not 3 x num_attention_heads \(5\)"):
        convert_megatron_checkpoint(save_megatron(tmp_path / "ckpt3", random_weights(), 2.0, no_args=True),
                                    tmp_path / "hf", num_attention_heads=5)


class Exploit:  # a class no allow-list knows, pickled by reference
    def __init__(self):
        self.payload = "x"


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_disallowed_global_is_refused_and_named(tmp_path, monkeypatch, legacy):
    monkeypatch.setitem(sys.modules, "evil_pkg", _fake_module("evil_pkg", Exploit=Exploit))
    src = save_megatron(tmp_path / "ckpt", random_weights(), 2.0)
    path = src / "iter_0000100" / "mp_rank_00" / "model_optim_rng.pt"
    ck = torch.load(path, weights_only=False)
    ck["optimizer"]["extra"] = Exploit()
    torch.save(ck, path, _use_new_zipfile_serialization=not legacy)
    with pytest.raises(ValueError, match=r"refused: its pickle needs evil_pkg\.Exploit.*--ignore-global evil_pkg\.Exploit"):
        convert_megatron_checkpoint(src, tmp_path / "hf")
    out = convert_megatron_checkpoint(src, tmp_path / "hf", ignore_globals=["evil_pkg.Exploit"])
    assert (out / "model.safetensors").is_file()


class RunsCode:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_that_runs_code_never_runs(tmp_path):
    RunsCode.marker = tmp_path / "pwned"
    path = tmp_path / "model_optim_rng.pt"
    torch.save({"model": {}, "args": megatron_args(), "optimizer": RunsCode()}, path)
    with pytest.raises(ValueError, match=r"refused: its pickle needs (posix|nt)\.system"):
        convert_megatron_checkpoint(path, tmp_path / "hf")
    assert not RunsCode.marker.exists()


def test_non_weight_globals_load_as_inert_placeholders(tmp_path):
    src = save_megatron(tmp_path / "ckpt", random_weights(), 2.0)
    ck = load_megatron_checkpoint(src / "iter_0000100" / "mp_rank_00" / "model_optim_rng.pt")
    assert repr(ck["args"].model_type) == "<ignored megatron.core.enums.ModelType>"
    assert repr(ck["optimizer"]["loss_scaler"]) == "<ignored megatron.fp16.loss_scaler.DynamicLossScaler>"
    assert ck["args"].params_dtype is torch.float32 and ck["args"].hidden_size == 16
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.pt could not be read"):
        load_megatron_checkpoint(tmp_path / "junk.pt")


def test_shard_problems_are_reported(tmp_path):
    w = random_weights()
    src = save_megatron(tmp_path / "tp2", w, 2.0, tp=2)
    rank0 = src / "iter_0000100" / "mp_rank_00" / "model_optim_rng.pt"
    with pytest.raises(ValueError, match="tensor_model_parallel_size=2 but 1 shard"):
        convert_megatron_checkpoint(rank0, tmp_path / "hf")
    # A replicated LayerNorm that differs between ranks: an error, unless the user takes rank 0's.
    rank1 = src / "iter_0000100" / "mp_rank_01" / "model_optim_rng.pt"
    ck = torch.load(rank1, weights_only=False)
    ck["model"]["language_model"]["encoder"]["layers.1.input_layernorm.weight"] += 1e-3
    torch.save(ck, rank1)
    with pytest.raises(ValueError, match=r"layers\.1\.input_layernorm\.weight is replicated .* rank 1 differs"):
        convert_megatron_checkpoint(src, tmp_path / "hf")
    assert_outputs_match(convert_megatron_checkpoint(src, tmp_path / "hf", check_replicas=False), w, 2.0)
    ck["iteration"] = 200
    torch.save(ck, rank1)
    with pytest.raises(ValueError, match="iteration=200 .* different checkpoints"):
        convert_megatron_checkpoint(src, tmp_path / "hf3")
    (src / "iter_0000100" / "mp_rank_00_001").mkdir()
    with pytest.raises(ValueError, match="pipeline-parallel"):
        convert_megatron_checkpoint(src, tmp_path / "hf4")


def test_folder_layouts(tmp_path):
    w = random_weights()
    src = save_megatron(tmp_path / "ckpt", w, 2.0)
    (src / "iter_0000100").rename(src / "release")
    (src / "latest_checkpointed_iteration.txt").write_text("release\n")
    assert_outputs_match(convert_megatron_checkpoint(src, tmp_path / "a"), w, 2.0)  # tracker says release
    assert_outputs_match(convert_megatron_checkpoint(src / "release", tmp_path / "b"), w, 2.0)
    assert_outputs_match(convert_megatron_checkpoint(src / "release" / "mp_rank_00", tmp_path / "c"), w, 2.0)
    (src / "latest_checkpointed_iteration.txt").write_text("300")
    with pytest.raises(FileNotFoundError, match="says '300'.*iter_0000300 is not a checkpoint folder"):
        convert_megatron_checkpoint(src, tmp_path / "d")
    (src / "latest_checkpointed_iteration.txt").unlink()
    (src / "release").rename(src / "iter_0000300")
    with pytest.raises(FileNotFoundError, match="has iter_0000300 but no latest_checkpointed_iteration.txt"):
        convert_megatron_checkpoint(src, tmp_path / "d")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        convert_megatron_checkpoint(tmp_path / "nowhere", tmp_path / "d")


def test_unknown_checkpoint_version_is_refused(tmp_path):
    src = save_megatron(tmp_path / "ckpt", random_weights(), 1.5)  # 1.5 lays QKV out as 2.0 here
    with pytest.raises(ValueError, match=r"checkpoint_version 1\.5 is unknown"):
        convert_megatron_checkpoint(src, tmp_path / "hf")


@pytest.mark.parametrize("version", [0, 1.0, 2.0])
def test_inverse_table_writes_the_megatron_state_back(version):
    flat = rank_state(random_weights(), version)
    table = megatron_bert_table(version, CFG["heads"])
    back = apply(inverse(table), apply(table, flat))
    assert back.keys() == flat.keys() and all(torch.equal(back[k], flat[k]) for k in flat)


def test_cli_functions(tmp_path, capsys):
    w = random_weights()
    src = save_megatron(tmp_path / "ckpt", w, 1.0, tp=2)
    (tmp_path / "vocab.txt").write_text("[PAD]\n[UNK]\n")
    parser = add_megatron_arguments(argparse.ArgumentParser(prog="bertkit convert megatron-lm"))
    args = parser.parse_args([str(src), str(tmp_path / "hf"), "--dtype", "float16", "--layer-norm-eps", "1e-6",
                              "--vocab-file", str(tmp_path / "vocab.txt")])
    assert args.func is cli_convert_megatron and args.func(args) == 0
    assert "BertForPreTraining: 2 layers, hidden 16, 4 heads, vocab 40" in capsys.readouterr().out
    config = bertkit.BertConfig.from_pretrained(tmp_path / "hf")
    assert config.layer_norm_eps == 1e-6 and (tmp_path / "hf" / "vocab.txt").read_text() == "[PAD]\n[UNK]\n"
    assert all(t.dtype == torch.float16 for t in tensors(tmp_path / "hf").values())
    args = parser.parse_args([str(src / "iter_0000100" / "mp_rank_01"), str(tmp_path / "x")])
    with pytest.raises(ValueError, match="tensor_model_parallel_size=2 but 1 shard"):
        args.func(args)
