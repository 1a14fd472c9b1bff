"""Writes the golden files for what transformers 5.x removed (relative positions, head_mask, prune_heads,
tuple KV caches) using transformers==4.46.3, the last release that had all of it.

Run once, in a throwaway environment (never a bertkit dependency):

    python3 -m venv /tmp/hf446 && /tmp/hf446/bin/pip install torch==2.13.0 transformers==4.46.3 safetensors
    /tmp/hf446/bin/python tests/golden/make_golden_446.py

Each model folder under tests/golden/hf446/ is a checkpoint as 4.46.3 saved it; each ``<case>.safetensors``
beside it holds the inputs (``in.*``) and the outputs 4.46.3 computed (``out.*``), with a ``<case>.json``
naming the model class and the call. Weights are re-drawn with a large spread (LayerNorm and biases too)
so a misplaced term cannot hide.
"""

import json
import shutil
from pathlib import Path

import torch
import transformers
from safetensors.torch import save_file

assert transformers.__version__ == "4.46.3", transformers.__version__
OUT = Path(__file__).parent / "hf446"
TINY = dict(vocab_size=24, hidden_size=8, num_hidden_layers=2, num_attention_heads=2, intermediate_size=12,
            max_position_embeddings=16, type_vocab_size=2, hidden_act="gelu", attn_implementation="eager")
POS = {"abs": "absolute", "rk": "relative_key", "rkq": "relative_key_query"}


def randomize(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            offset = 1.0 if name.endswith("LayerNorm.weight") else 0.0
            p.copy_(torch.randn(p.shape, generator=g) * 0.3 + offset)
    return model.eval()


def flatten(prefix, value, out):
    if value is None:
        return
    if isinstance(value, torch.Tensor):
        out[prefix] = value.detach().contiguous().clone()
    else:
        for i, v in enumerate(value):
            flatten(f"{prefix}.{i}", v, out)


def save_case(folder, name, cls, inputs, outputs, steps=None):
    tensors = {}
    for k, v in inputs.items():
        flatten(f"in.{k}", v, tensors)
    for k, v in outputs.items():
        flatten(f"out.{k}", v, tensors)
    save_file(tensors, str(folder / f"{name}.safetensors"))
    (folder / f"{name}.json").write_text(json.dumps({"class": cls, "steps": steps}, indent=1))


def ids(seed, shape, vocab=TINY["vocab_size"]):
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


def main():
    shutil.rmtree(OUT, ignore_errors=True)
    OUT.mkdir(parents=True)
    enc_states = torch.randn(2, 4, 8, generator=torch.Generator().manual_seed(7))
    enc_mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]])
    for short, pos in POS.items():
        # --- encoder: padded batch, every optional output
        folder = OUT / f"{short}-enc"
        model = randomize(transformers.BertModel(transformers.BertConfig(**TINY, position_embedding_type=pos)), 1)
        model.save_pretrained(folder, safe_serialization=True)
        x = dict(input_ids=ids(2, (2, 6)), attention_mask=mask, token_type_ids=ids(3, (2, 6), 2))
        with torch.no_grad():
            o = model(**x, output_attentions=True, output_hidden_states=True)
        save_case(folder, "forward", "BertModel", x, dict(last_hidden_state=o.last_hidden_state,
                  pooler_output=o.pooler_output, hidden_states=o.hidden_states, attentions=o.attentions))
        mask3d = torch.ones(2, 6, 6, dtype=torch.long).tril()
        mask3d[0, :, 4:] = 0
        mask3d[0, 4:, 0] = 1
        with torch.no_grad():
            o = model(x["input_ids"], attention_mask=mask3d)
        save_case(folder, "mask3d", "BertModel", dict(input_ids=x["input_ids"], attention_mask=mask3d),
                  dict(last_hidden_state=o.last_hidden_state))
        for shape_name, head_mask in (("heads1d", torch.tensor([1.0, 0.0])),
                                      ("heads2d", torch.tensor([[0.5, 1.0], [1.0, 0.0]]))):
            with torch.no_grad():
                o = model(**x, head_mask=head_mask, output_attentions=True)
            save_case(folder, shape_name, "BertModel", dict(x, head_mask=head_mask),
                      dict(last_hidden_state=o.last_hidden_state, attentions=o.attentions))

        # --- decoders, with and without cross-attention; full forward and step-by-step with the cache
        for cross in (False, True):
            folder = OUT / f"{short}-dec{'cross' if cross else ''}"
            cfg = transformers.BertConfig(**TINY, position_embedding_type=pos, is_decoder=True,
                                          add_cross_attention=cross)
            model = randomize(transformers.BertLMHeadModel(cfg), 4)
            model.save_pretrained(folder, safe_serialization=True)
            extra = dict(encoder_hidden_states=enc_states, encoder_attention_mask=enc_mask) if cross else {}
            x = dict(input_ids=ids(5, (2, 6)), attention_mask=mask, labels=ids(6, (2, 6)), **extra)
            with torch.no_grad():
                o = model(**x, output_attentions=True, output_hidden_states=True)
            save_case(folder, "forward", "BertLMHeadModel", x, dict(loss=o.loss, logits=o.logits,
                      attentions=o.attentions, cross_attentions=o.cross_attentions, hidden_states=o.hidden_states))
            # Cached decoding: a 3-token prompt, then one token at a time.
            full = ids(8, (2, 6))
            past, logits = None, []
            with torch.no_grad():
                for start, end in ((0, 3), (3, 4), (4, 5), (5, 6)):
                    o = model(full[:, start:end], attention_mask=torch.ones(2, end, dtype=torch.long),
                              past_key_values=past, use_cache=True, **extra)
                    past = o.past_key_values
                    logits.append(o.logits)
            save_case(folder, "cached", "BertLMHeadModel", dict(input_ids=full, **extra),
                      dict(step_logits=logits, past_key_values=past), steps=[[0, 3], [3, 4], [4, 5], [5, 6]])

    # --- pruning, including every head of a layer, then save -> load (pruned again from config.pruned_heads)
    for short in ("abs", "rk"):
        folder = OUT / f"{short}-pruned"
        cfg = transformers.BertConfig(**dict(TINY, num_attention_heads=4, num_hidden_layers=3),
                                      position_embedding_type=POS[short], num_labels=3)
        model = randomize(transformers.BertForSequenceClassification(cfg), 9)
        model.prune_heads({0: [1, 3], 2: [0, 1, 2, 3]})
        model.prune_heads({0: [0]})  # a second call: original head numbering, already-pruned heads skipped
        model.save_pretrained(folder, safe_serialization=True)
        x = dict(input_ids=ids(10, (2, 6)), attention_mask=mask, labels=torch.tensor([0, 2]))
        with torch.no_grad():
            o = model(**x, output_attentions=True)
        save_case(folder, "forward", "BertForSequenceClassification", x,
                  dict(loss=o.loss, logits=o.logits, attentions=o.attentions))
    print("wrote", sum(f.stat().st_size for f in OUT.rglob("*") if f.is_file()), "bytes to", OUT)


if __name__ == "__main__":
    main()
