"""Writes the golden outputs of transformers' question-answering pipeline, which transformers 5 removed,
using transformers==4.46.3 (the release the other golden files come from).

Run once, in a throwaway environment (never a bertkit dependency):

    python3 -m venv /tmp/hf446 && /tmp/hf446/bin/pip install torch==2.13.0 transformers==4.46.3 safetensors
    /tmp/hf446/bin/python tests/golden/make_golden_qa_446.py

tests/golden/qa446/ then holds a tiny random BertForQuestionAnswering as 4.46.3 saved it, with a small
WordPiece vocabulary (whole words, and single characters as subwords, so answers get widened to words), and
cases.json: each call's arguments and the pipeline's output. Weights are drawn with a large spread so the
start/end scores are far from uniform.
"""

import json
import string
from pathlib import Path

import torch
import transformers

assert transformers.__version__ == "4.46.3", transformers.__version__
OUT = Path(__file__).parent / "qa446"

CONTEXT = ("The Amazon rainforest covers much of the Amazon basin of South America. The basin spans nine "
           "nations; Brazil holds sixty percent of the forest, followed by Peru with thirteen percent and "
           "Colombia with ten percent. Scientists estimate that the forest holds about 390 billion individual "
           "trees divided into 16,000 species. Deforestation  accelerated in the 1970s when roads opened the "
           "interior, and Zoë Kaufmann-Ortiz documented its effect on rainfall in 2004.")
SHORT = "Marie Curie won the Nobel Prize in Physics in 1903 and in Chemistry in 1911."
WORDS = sorted(set("the of in and a is was by with to that its on when how many who what which where did "
                   "amazon rainforest covers much basin south america spans nine nations brazil holds sixty "
                   "percent forest followed peru thirteen colombia ten scientists estimate about billion "
                   "individual trees divided into species deforestation accelerated roads opened interior "
                   "documented effect rainfall marie curie won nobel prize physics chemistry year first "
                   "country share".split()))


def vocab() -> list[str]:
    chars = list(string.ascii_lowercase + string.digits + string.punctuation)
    return (["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [w for w in WORDS if w not in chars] + chars
            + ["##" + c for c in chars])


def main():
    OUT.mkdir(exist_ok=True)
    (OUT / "vocab.txt").write_text("".join(t + "\n" for t in vocab()), encoding="utf-8")
    tok = transformers.BertTokenizerFast(str(OUT / "vocab.txt"), do_lower_case=True)
    config = transformers.BertConfig(vocab_size=len(vocab()), hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=2, intermediate_size=48, max_position_embeddings=128)
    torch.manual_seed(0)
    model = transformers.BertForQuestionAnswering(config).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            offset = 1.0 if name.endswith("LayerNorm.weight") else 0.0
            spread = 3.0 if name.startswith("qa_outputs") else 0.4  # peaked start/end distributions
            p.copy_(torch.randn(p.shape, generator=g) * spread + offset)
    model.save_pretrained(OUT)
    tok.save_pretrained(OUT)
    pipe = transformers.pipeline("question-answering", model=str(OUT), tokenizer=str(OUT))
    cases = [
        ("short", dict(question="Who won the Nobel Prize?", context=SHORT), {}),
        ("short_top5", dict(question="When did she win?", context=SHORT), dict(top_k=5)),
        ("windows", dict(question="Which country holds sixty percent?", context=CONTEXT),
         dict(max_seq_len=48, doc_stride=16, top_k=3)),
        ("windows_stride0", dict(question="how many trees?", context=CONTEXT), dict(max_seq_len=40, doc_stride=0)),
        ("impossible", dict(question="What is the share of Peru?", context=CONTEXT),
         dict(max_seq_len=64, doc_stride=24, handle_impossible_answer=True, top_k=3)),
        ("max_answer_len", dict(question="Who documented the effect?", context=CONTEXT),
         dict(max_answer_len=2, top_k=4)),
        ("many_questions", dict(question=["Who won?", "What year was the first prize?"], context=SHORT), {}),
        ("impossible_listed", dict(question="Who?", context="In the basin of South America."),
         dict(handle_impossible_answer=True, top_k=100)),
        ("top_k_large", dict(question="Where?", context="In the basin of South America."), dict(top_k=40)),
    ]
    golden = []
    for name, inputs, kwargs in cases:
        golden.append({"name": name, "inputs": inputs, "kwargs": kwargs, "output": pipe(**inputs, **kwargs)})
    (OUT / "cases.json").write_text(json.dumps(golden, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
