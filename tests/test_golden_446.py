"""bertkit against golden outputs of transformers==4.46.3 (relative positions, head masks, pruning, tuple caches).

The files come from tests/golden/make_golden_446.py; the checkpoints are the ones 4.46.3 saved.
"""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import bertkit

GOLDEN = Path(__file__).parent / "golden" / "hf446"
CASES = sorted((p.parent.name, p.stem) for p in GOLDEN.glob("*/*.safetensors") if p.name != "model.safetensors")


def flatten(prefix, value, out):
    if value is None:
        return
    if isinstance(value, torch.Tensor):
        out[prefix] = value
    else:
        for i, v in enumerate(value):
            flatten(f"{prefix}.{i}", v, out)


def split(tensors):
    inputs = {k[3:]: v for k, v in tensors.items() if k.startswith("in.")}
    expected = {k[4:]: v for k, v in tensors.items() if k.startswith("out.")}
    return inputs, expected


def run_case(model, spec, inputs, expected):
    got = {}
    if spec["steps"]:
        extra = {k: v for k, v in inputs.items() if k.startswith("encoder_")}
        past, logits = None, []
        for start, end in spec["steps"]:
            out = model(inputs["input_ids"][:, start:end], attention_mask=torch.ones(2, end, dtype=torch.long),
                        past_key_values=past, use_cache=True, **extra)
            past = out.past_key_values
            logits.append(out.logits)
        flatten("step_logits", logits, got)
        flatten("past_key_values", past, got)
        return got
    wants = {k.split(".")[0] for k in expected}
    out = model(**inputs, output_attentions="attentions" in wants, output_hidden_states="hidden_states" in wants)
    for name in wants:
        flatten(name, getattr(out, name), got)
    return got


def test_every_golden_case_is_collected():
    # 3 position types x (encoder: forward, 3-D mask, 2 head-mask shapes; 2 decoders: forward, cached) + 2 pruned
    assert len(CASES) == 3 * (4 + 2 * 2) + 2


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("folder,case", CASES)
def test_matches_transformers_4_46_3(folder, case, attn):
    spec = json.loads((GOLDEN / folder / f"{case}.json").read_text())
    inputs, expected = split(load_file(str(GOLDEN / folder / f"{case}.safetensors")))
    model = getattr(bertkit, spec["class"]).from_pretrained(GOLDEN / folder, attn_implementation=attn, strict=True)
    with torch.no_grad():
        got = run_case(model, spec, inputs, expected)
    assert got.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-5, atol=1e-5, msg=lambda m: f"{key}: {m}")


def test_pruned_model_survives_save_and_load(tmp_path):
    model = bertkit.BertForSequenceClassification.from_pretrained(GOLDEN / "abs-pruned")
    assert model.config.pruned_heads == {0: [0, 1, 3], 2: [0, 1, 2, 3]}
    assert model.bert.encoder.layer[0].attention.self.query.out_features == 8 // 4
    model.save_pretrained(tmp_path)
    again = bertkit.BertForSequenceClassification.from_pretrained(tmp_path, strict=True)
    ids = torch.randint(0, 24, (2, 5))
    torch.testing.assert_close(again(ids).logits, model(ids).logits)
    # Pruning continues in the original numbering; already-pruned heads are skipped.
    again.prune_heads({0: [2, 3], 1: [1]})
    assert again.config.pruned_heads == {0: [0, 1, 2, 3], 1: [1], 2: [0, 1, 2, 3]}
    assert again(ids).logits.shape == (2, 3)
