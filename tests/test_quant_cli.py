"""`bertkit quantize` / `bertkit export-onnx` functions, called through a parser built here."""

import argparse
import collections
import json

import pytest
import torch

import bertkit
from bertkit.checkpoints.io import _umask
from bertkit.quant import load_quantized, quantizers
from bertkit.quant.cli import add_export_onnx_arguments, add_quantize_arguments, run_export_onnx, run_quantize
from test_quant_model import TINY

onnx = pytest.importorskip("onnx")


def parser():
    root = argparse.ArgumentParser(prog="bertkit")
    sub = root.add_subparsers(dest="command")
    add_quantize_arguments(sub.add_parser("quantize"))
    add_export_onnx_arguments(sub.add_parser("export-onnx"))
    return root


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    # A tiny classifier with the bundled model's tokenizer (so its vocabulary fits the tokenizer).
    from bertkit.encoder import bundled_model_dir

    folder = tmp_path_factory.mktemp("tiny")
    torch.manual_seed(0)
    model = bertkit.BertForSequenceClassification(bertkit.BertConfig(**{**TINY, "vocab_size": 30522}))
    model.save_pretrained(folder)
    bertkit.Tokenizer.from_pretrained(bundled_model_dir()).save_pretrained(folder)
    return folder


def test_quantize_then_export(model_dir, tmp_path, capsys):
    calib = tmp_path / "calib.txt"
    calib.write_text("A man is eating food.\n\nThe weather is nice today.\nStocks fell sharply on Monday.\n")
    out = tmp_path / "int8"
    args = parser().parse_args(["quantize", str(model_dir), "--calib", str(calib), "--method", "percentile",
                                "--out", str(out), "--exclude", "*.output.add_local_input_quantizer"])
    assert run_quantize(args) == 0
    assert "calibrated (percentile) on 3 texts" in capsys.readouterr().out
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["calib_method"] == "percentile"
    assert (out / "tokenizer.json").is_file() or (out / "vocab.txt").is_file()
    model = load_quantized(bertkit.BertForSequenceClassification, out)
    states = dict((n, q.is_enabled) for n, q in quantizers(model))
    assert not states["bert.encoder.layer.0.output.add_local_input_quantizer"]
    assert states["bert.encoder.layer.0.output.add_residual_input_quantizer"]

    onnx_file = tmp_path / "m.onnx"
    assert run_export_onnx(parser().parse_args(["export-onnx", str(out), str(onnx_file), "--quantized"])) == 0
    ops = collections.Counter(n.op_type for n in onnx.load(str(onnx_file)).graph.node)
    assert ops["QuantizeLinear"] > 0 and ops["QuantizeLinear"] == ops["DequantizeLinear"]
    # Issue #18 point 13: a quantized folder is detected, --quantized is not needed (and wrong on a float one).
    assert run_export_onnx(parser().parse_args(["export-onnx", str(out), str(tmp_path / "f.onnx")])) == 0
    assert collections.Counter(n.op_type for n in onnx.load(str(tmp_path / "f.onnx")).graph.node) == ops
    with pytest.raises(ValueError, match="holds no quantized model.*drop --quantized"):
        run_export_onnx(parser().parse_args(["export-onnx", str(model_dir), str(tmp_path / "g.onnx"), "--quantized"]))
    # Issue #18 point 7: written beside the output and moved into place; an unwritable place is refused first.
    assert sorted(p.name for p in tmp_path.glob("*.onnx*")) == ["f.onnx", "m.onnx"]
    assert oct(onnx_file.stat().st_mode & 0o777) == oct(0o666 & ~_umask())
    with pytest.raises(FileNotFoundError, match="folder .*nowhere' does not exist"):
        run_export_onnx(parser().parse_args(["export-onnx", str(out), str(tmp_path / "nowhere" / "x.onnx")]))

    float_file = tmp_path / "float.onnx"
    assert run_export_onnx(parser().parse_args(["export-onnx", str(model_dir), str(float_file)])) == 0
    assert "QuantizeLinear" not in {n.op_type for n in onnx.load(str(float_file)).graph.node}


def test_errors_name_the_fix(model_dir, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    args = parser().parse_args(["quantize", str(model_dir), "--calib", str(empty), "--out", str(tmp_path / "o")])
    with pytest.raises(ValueError, match="no non-empty texts"):
        run_quantize(args)
    args = parser().parse_args(["quantize", str(tmp_path), "--calib", str(empty), "--out", str(tmp_path / "o")])
    with pytest.raises(FileNotFoundError, match="config.json"):
        run_quantize(args)
    args = parser().parse_args(["export-onnx", str(model_dir), str(tmp_path / "m.txt")])
    with pytest.raises(ValueError, match=r"\.onnx"):
        run_export_onnx(args)
    with pytest.raises(SystemExit):
        parser().parse_args(["quantize", str(model_dir), "--calib", "x.txt", "--out", "o", "--method", "kl"])
