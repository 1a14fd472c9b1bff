"""Google's TensorFlow BERT checkpoints (google-research/bert) -> HuggingFace BERT state-dict names.

Covers the encoder, the pre-training heads (``run_pretraining.py``), the SQuAD head
(``run_squad.py``) and the classifier head (``run_classifier.py``); optimizer slots and training
counters are dropped. Tied weights are not written (``cls.predictions.decoder.weight`` is the word
embedding matrix, ``cls.predictions.decoder.bias`` is ``cls.predictions.bias``); loaders tie them.
"""

from __future__ import annotations

from ..convert import Rule, copy, drop, transpose


def _dense(tf: str, hf: str) -> list[Rule]:
    # TF stores kernels as (in, out) and computes x @ kernel; torch's Linear stores (out, in).
    return [transpose(f"{tf}/kernel", f"{hf}.weight"), copy(f"{tf}/bias", f"{hf}.bias")]


def _layer_norm(tf: str, hf: str) -> list[Rule]:
    # TF's LayerNorm calls its scale and shift gamma and beta.
    return [copy(f"{tf}/gamma", f"{hf}.weight"), copy(f"{tf}/beta", f"{hf}.bias")]


_TF_LAYER, _HF_LAYER = "bert/encoder/layer_{i:\\d+}", "bert.encoder.layer.{i}"

TF_BERT: list[Rule] = [
    *(copy(f"bert/embeddings/{name}", f"bert.embeddings.{name}.weight")
      for name in ("word_embeddings", "position_embeddings", "token_type_embeddings")),
    *_layer_norm("bert/embeddings/LayerNorm", "bert.embeddings.LayerNorm"),
    *(rule for proj in ("query", "key", "value")
      for rule in _dense(f"{_TF_LAYER}/attention/self/{proj}", f"{_HF_LAYER}.attention.self.{proj}")),
    *_dense(f"{_TF_LAYER}/attention/output/dense", f"{_HF_LAYER}.attention.output.dense"),
    *_layer_norm(f"{_TF_LAYER}/attention/output/LayerNorm", f"{_HF_LAYER}.attention.output.LayerNorm"),
    *_dense(f"{_TF_LAYER}/intermediate/dense", f"{_HF_LAYER}.intermediate.dense"),
    *_dense(f"{_TF_LAYER}/output/dense", f"{_HF_LAYER}.output.dense"),
    *_layer_norm(f"{_TF_LAYER}/output/LayerNorm", f"{_HF_LAYER}.output.LayerNorm"),
    *_dense("bert/pooler/dense", "bert.pooler.dense"),
    # Masked-LM head; its output matrix is the word embedding matrix, so only the bias is stored.
    *_dense("cls/predictions/transform/dense", "cls.predictions.transform.dense"),
    *_layer_norm("cls/predictions/transform/LayerNorm", "cls.predictions.transform.LayerNorm"),
    copy("cls/predictions/output_bias", "cls.predictions.bias"),
    # The task heads are bare tf.get_variable matrices used as matmul(x, w, transpose_b=True):
    # already (out, in), so they are copied, not transposed.
    copy("cls/seq_relationship/output_weights", "cls.seq_relationship.weight"),
    copy("cls/seq_relationship/output_bias", "cls.seq_relationship.bias"),
    copy("cls/squad/output_weights", "qa_outputs.weight"),
    copy("cls/squad/output_bias", "qa_outputs.bias"),
    copy("output_weights", "classifier.weight"),  # run_classifier.py creates them at the top level
    copy("output_bias", "classifier.bias"),
    # Training state, not weights: AdamWeightDecayOptimizer's slots (optimization.py names them
    # "<var>/adam_m" and "<var>/adam_v"; TF2-style slots are "<var>/AdamWeightDecayOptimizer[_1]"),
    # the step counter, and the loss-scale state of mixed-precision training.
    *(drop(f"{{var:.+}}/{slot}") for slot in ("adam_m", "adam_v", "AdamWeightDecayOptimizer",
                                              "AdamWeightDecayOptimizer_1")),
    *(drop(name) for name in ("global_step", "loss_scale", "current_loss_scale", "good_steps", "bad_steps")),
]
