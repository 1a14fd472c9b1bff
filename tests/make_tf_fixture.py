"""Writes the tiny TensorFlow BERT checkpoints under tests/fixtures/tf_bert/ with real TensorFlow.

The tests read these files *without* TensorFlow; this script is the only place TensorFlow is used,
and it must never become a dependency of bertkit. To regenerate the fixture (a few tens of KB):

    python3 -m venv /tmp/tfvenv
    /tmp/tfvenv/bin/pip install tensorflow-cpu numpy
    /tmp/tfvenv/bin/python tests/make_tf_fixture.py

It writes, into tests/fixtures/tf_bert/:

* ``bert_model.ckpt.{index,data-00000-of-00001}`` -- a 2-layer BERT with the variable names of
  google-research/bert (``bert/encoder/layer_0/attention/self/query/kernel`` ...), the MLM and NSP
  heads, an ``adam_m``/``adam_v`` slot per weight (named as BERT's AdamWeightDecayOptimizer names
  them) and an int64 ``global_step``; saved by ``tf.compat.v1.train.Saver`` (format V2), as
  run_pretraining.py does.
* ``bert_config.json`` and ``vocab.txt`` as Google ships them beside the checkpoint.
* ``dtypes.ckpt.*`` -- a reader-level checkpoint with float16, bfloat16, float64, int8, uint8,
  int32, int64, bool, a scalar, an empty tensor, a 200-character name and a string tensor (which
  bertkit refuses), split over two data shards (two devices, ``Saver(sharded=True)``).
* ``<prefix>.npz`` -- every tensor of each checkpoint as TensorFlow reads it back (strings
  excepted), plus a JSON
  string ``__tf_dtypes__`` mapping each name to TensorFlow's dtype name. bfloat16 is stored as
  float32 (exact: bfloat16 is the top half of a float32) because numpy has no bfloat16.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import tensorflow as tf

OUT = Path(__file__).resolve().parent / "fixtures" / "tf_bert"
CONFIG = {
    "attention_probs_dropout_prob": 0.1,
    "hidden_act": "gelu",
    "hidden_dropout_prob": 0.1,
    "hidden_size": 8,
    "initializer_range": 0.02,
    "intermediate_size": 12,
    "max_position_embeddings": 16,
    "num_attention_heads": 2,
    "num_hidden_layers": 2,
    "type_vocab_size": 2,
    "vocab_size": 20,
}
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "a", "cat", "dog", "sat", "on", "mat",
         "ran", "fast", "big", "small", "red", "blue", "##s", "."]


def bert_weights(rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Random weights under Google's names; kernels are (in, out) as TF's dense layer stores them."""
    c = CONFIG
    h, i_size, v = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
    w: dict[str, np.ndarray] = {}

    def normal(*shape, scale=0.5):
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    def dense(name, n_in, n_out):
        w[f"{name}/kernel"] = normal(n_in, n_out)
        w[f"{name}/bias"] = normal(n_out, scale=0.1)

    def layer_norm(name, n):
        # gamma away from 1 and beta away from 0, so a swapped or skipped LayerNorm shows in the logits.
        w[f"{name}/gamma"] = (1.0 + normal(n, scale=0.2)).astype(np.float32)
        w[f"{name}/beta"] = normal(n, scale=0.1)

    w["bert/embeddings/word_embeddings"] = normal(v, h)
    w["bert/embeddings/token_type_embeddings"] = normal(c["type_vocab_size"], h)
    w["bert/embeddings/position_embeddings"] = normal(c["max_position_embeddings"], h)
    layer_norm("bert/embeddings/LayerNorm", h)
    for layer in range(c["num_hidden_layers"]):
        p = f"bert/encoder/layer_{layer}"
        for proj in ("query", "key", "value"):
            dense(f"{p}/attention/self/{proj}", h, h)
        dense(f"{p}/attention/output/dense", h, h)
        layer_norm(f"{p}/attention/output/LayerNorm", h)
        dense(f"{p}/intermediate/dense", h, i_size)
        dense(f"{p}/output/dense", i_size, h)
        layer_norm(f"{p}/output/LayerNorm", h)
    dense("bert/pooler/dense", h, h)
    dense("cls/predictions/transform/dense", h, h)
    layer_norm("cls/predictions/transform/LayerNorm", h)
    w["cls/predictions/output_bias"] = normal(v, scale=0.1)
    # run_pretraining.py creates these with tf.get_variable directly, stored (2, hidden), not (in, out).
    w["cls/seq_relationship/output_weights"] = normal(2, h)
    w["cls/seq_relationship/output_bias"] = normal(2, scale=0.1)
    return w


def save(prefix: Path, variables: dict[str, tuple[np.ndarray, tf.DType, str]], sharded: bool) -> None:
    """Creates each variable on its device with its value and saves them all with a V2 Saver."""
    graph = tf.Graph()
    with graph.as_default():
        tf_vars = []
        for name, (value, dtype, device) in variables.items():
            with tf.device(device):
                tf_vars.append(tf.compat.v1.get_variable(
                    name, initializer=tf.constant(value, dtype=dtype), use_resource=False))
        saver = tf.compat.v1.train.Saver(tf_vars, sharded=sharded,
                                         write_version=tf.compat.v1.train.SaverDef.V2)
        config = tf.compat.v1.ConfigProto(device_count={"CPU": 2})
        with tf.compat.v1.Session(graph=graph, config=config) as sess:
            sess.run(tf.compat.v1.global_variables_initializer())
            saver.save(sess, str(prefix), write_meta_graph=False, write_state=False)


def dump_npz(prefix: Path) -> None:
    """Reads the checkpoint back with TensorFlow and stores what it reads, as the tests' reference."""
    reader = tf.train.load_checkpoint(str(prefix))
    dtypes = reader.get_variable_to_dtype_map()
    arrays, names = {}, {}
    for name, dtype in sorted(dtypes.items()):
        names[name] = dtype.name
        if dtype == tf.string:
            continue  # an object array would need pickle; the tests only check that it is refused
        value = np.asarray(reader.get_tensor(name))
        if dtype == tf.bfloat16:
            value = value.astype(np.float32)
        arrays[name] = value
    arrays["__tf_dtypes__"] = np.array(json.dumps(names, sort_keys=True))
    np.savez_compressed(f"{prefix}.npz", **arrays)


def main() -> None:
    tf.compat.v1.disable_eager_execution()
    OUT.mkdir(parents=True, exist_ok=True)
    for old in OUT.glob("*.ckpt*"):
        old.unlink()
    rng = np.random.default_rng(20181031)  # BERT's release date; any fixed seed will do

    # 1. The BERT checkpoint, as run_pretraining.py leaves it mid-training.
    cpu = "/cpu:0"
    weights = bert_weights(rng)
    variables = {name: (value, tf.float32, cpu) for name, value in weights.items()}
    for name, value in weights.items():
        # AdamWeightDecayOptimizer names its slots "<param>/adam_m" and "<param>/adam_v".
        variables[f"{name}/adam_m"] = ((rng.standard_normal(value.shape) * 1e-3).astype(np.float32), tf.float32, cpu)
        variables[f"{name}/adam_v"] = ((rng.random(value.shape) * 1e-6).astype(np.float32), tf.float32, cpu)
    variables["global_step"] = (np.array(12345, np.int64), tf.int64, cpu)
    save(OUT / "bert_model.ckpt", variables, sharded=False)
    dump_npz(OUT / "bert_model.ckpt")
    (OUT / "bert_config.json").write_text(json.dumps(CONFIG, indent=2, sort_keys=True) + "\n")
    (OUT / "vocab.txt").write_text("\n".join(VOCAB) + "\n")

    # 2. Every dtype the reader supports, over two shards (one per device).
    dtype_vars = {
        "half": (rng.standard_normal((3, 2)).astype(np.float16), tf.float16, "/cpu:0"),
        "bfloat16": (np.array([[1.5, -2.25], [3.0e38, 1e-3]], np.float32), tf.bfloat16, "/cpu:1"),
        "double": (rng.standard_normal(4), tf.float64, "/cpu:0"),
        "int8": (np.array([-128, 0, 127], np.int8), tf.int8, "/cpu:1"),
        "uint8": (np.array([0, 200, 255], np.uint8), tf.uint8, "/cpu:0"),
        "int32": (np.array([-(2**31), 7, 2**31 - 1], np.int32), tf.int32, "/cpu:1"),
        "int64": (np.array([-5, 2**40 + 3, 2**62], np.int64), tf.int64, "/cpu:0"),
        "bool": (np.array([True, False, True, True]), tf.bool, "/cpu:1"),
        "scalar": (np.array(3.25, np.float32), tf.float32, "/cpu:0"),
        "empty": (np.zeros((0, 3), np.float32), tf.float32, "/cpu:1"),
        # Listed but not readable by bertkit: the reader must refuse it by name.
        "string": (np.array([b"not", b"a weight"]), tf.string, "/cpu:1"),
        # Longer than 127 bytes, so the SSTable entry lengths need multi-byte varints.
        "long/" + "x" * 195: (np.arange(5, dtype=np.float32), tf.float32, "/cpu:0"),
    }
    save(OUT / "dtypes.ckpt", dtype_vars, sharded=True)
    dump_npz(OUT / "dtypes.ckpt")
    for path in sorted(OUT.iterdir()):
        print(f"{os.path.getsize(path):8d}  {path.name}")


if __name__ == "__main__":
    main()
