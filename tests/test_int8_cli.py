"""The int8 path as a new user meets it: no temporary files left behind, a missing extra named before any model
loads, a `bertkit quantize` folder never silently run in float, calibration on every text it is given."""

import importlib.util
import os
import tempfile

import pytest
import torch

import bertkit
from bertkit.cli import main
from bertkit.encoder import bundled_model_dir
from bertkit.quant import int8
from test_quant_model import TINY

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    # A tiny BERT with the bundled model's tokenizer (its vocabulary fits the tokenizer).
    folder = tmp_path_factory.mktemp("tiny")
    torch.manual_seed(0)
    bertkit.BertModel(bertkit.BertConfig(**{**TINY, "vocab_size": 30522})).save_pretrained(folder)
    bertkit.Tokenizer.from_pretrained(bundled_model_dir()).save_pretrained(folder)
    return folder


@pytest.fixture
def temp_dir(tmp_path, monkeypatch):
    folder = tmp_path / "tmp"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


def _ours(folder):
    # torch may create its own cache folder (torchinductor_<user>) in the temp folder on first use.
    return [name for name in os.listdir(folder) if not name.startswith("torchinductor")]


@pytest.mark.parametrize("backend", ["onnxruntime-dynamic", "onnxruntime"])
def test_to_int8_leaves_no_temporary_file_on_success_or_failure(backend, model_dir, temp_dir, monkeypatch):
    model = bertkit.BertModel.from_pretrained(model_dir)
    batches = list(int8.calibration_batches(bertkit.Tokenizer.from_pretrained(model_dir), ["a short text", "another"]))
    quantized = int8.to_int8(model, batches, backend=backend)
    assert _ours(temp_dir) == []
    ids = torch.tensor([[101, 2023, 2003, 102]])
    # The session runs from memory once its file is gone.
    assert quantized(input_ids=ids).last_hidden_state.shape == (1, 4, TINY["hidden_size"])

    from bertkit.quant import onnx_export

    real_export = onnx_export.export_onnx

    def export_then_fail(module, path, **kwargs):
        real_export(module, path, **kwargs)
        assert os.path.isfile(path)  # the graph was written, then something fails
        raise RuntimeError("disk full")

    monkeypatch.setattr(onnx_export, "export_onnx", export_then_fail)
    with pytest.raises(RuntimeError, match="disk full"):
        int8.to_int8(model, batches, backend=backend)
    assert _ours(temp_dir) == []


AVX2_ONLY = frozenset({"avx2", "fma"})  # a CPU where int8 runs on onnxruntime (torch._int_mm is a scalar loop)
VNNI = frozenset({"avx2", "avx512f", "avx512_vnni"})  # ... and one where it runs in torch, without onnx


@pytest.fixture
def without_onnx(monkeypatch):
    monkeypatch.setattr(bertkit.cpu, "cpu_flags", lambda: AVX2_ONLY)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a, **k: None if name in ("onnx", "onnxruntime") else real(name, *a, **k))

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded before the missing extra was reported")

    monkeypatch.setattr(bertkit.BertModel, "from_pretrained", no_loading)
    monkeypatch.setattr(bertkit.BertPreTrainedModel, "from_pretrained", no_loading)


@pytest.mark.parametrize("argv", [["embed", "--quantize", "int8", "a text"],
                                  ["search", "--corpus", "CORPUS", "--quantize", "int8", "query"],
                                  ["export-onnx", "MODEL", "OUT/m.onnx"]])
def test_missing_onnx_exits_2_with_the_install_hint_before_loading(argv, model_dir, tmp_path, without_onnx, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("first\nsecond\n")
    argv = [str(corpus) if a == "CORPUS" else str(model_dir) if a == "MODEL" else a.replace("OUT", str(tmp_path))
            for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install 'bertkit[int8]'" in err and "onnx" in err, err
    assert not (tmp_path / "m.onnx").exists()
    if argv[0] == "embed":  # and why onnx is needed on this CPU
        assert "AVX512-VNNI" in err, err


def test_without_onnx_a_vnni_cpu_runs_int8_in_torch(model_dir, monkeypatch, capsys):
    monkeypatch.setattr(bertkit.cpu, "cpu_flags", lambda: VNNI)
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: True)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a, **k: None if name in ("onnx", "onnxruntime") else real(name, *a, **k))
    assert main(["embed", "--model", str(model_dir), "--quantize", "int8", "a text"]) == 0
    assert capsys.readouterr().out.strip()


def test_library_user_gets_an_import_error(without_onnx):
    with pytest.raises(ImportError, match=r"pip install 'bertkit\[int8\]'"):
        bertkit.SentenceEncoder.from_pretrained(quantize="int8")


def test_quantized_folder_is_refused_by_embed_with_the_way_out(model_dir, tmp_path, capsys):
    calib = tmp_path / "calib.txt"
    calib.write_text("A man is eating food.\nThe weather is nice today.\n")
    out = tmp_path / "qdq"
    assert main(["quantize", str(model_dir), "--calib", str(calib), "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["embed", "--model", str(out), "a text"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "bertkit quantize" in err and "--quantize int8" in err
    assert "export-onnx --quantized" in err
    with pytest.raises(ValueError, match="quantization_config"):
        bertkit.SentenceEncoder.from_pretrained(out)


def test_calibration_uses_every_text_unless_capped_and_says_so(model_dir, tmp_path, capsys, monkeypatch):
    calib = tmp_path / "calib.txt"
    calib.write_text("".join(f"text number {i}\n" for i in range(1100)))  # more than the old silent cap of 1024
    assert main(["quantize", str(model_dir), "--calib", str(calib), "--out", str(tmp_path / "a"),
                 "--batch-size", "256", "--max-length", "8"]) == 0
    out, err = capsys.readouterr()
    assert "on 1100 texts" in out and "Calibrating" not in err  # no progress bar off a terminal

    monkeypatch.setattr("sys.stderr.isatty", lambda: True)
    assert main(["quantize", str(model_dir), "--calib", str(calib), "--out", str(tmp_path / "b"),
                 "--max-texts", "300", "--batch-size", "256", "--max-length", "8"]) == 0
    out, err = capsys.readouterr()
    assert "on 300 texts" in out
    assert "calibrating on the first 300 of the 1100 texts" in err and "Calibrating" in err and "300/300" in err


def test_torch_per_token_writes_no_temporary_file(model_dir, temp_dir):
    model = bertkit.BertModel.from_pretrained(model_dir)
    batches = list(int8.calibration_batches(bertkit.Tokenizer.from_pretrained(model_dir), ["a short text", "another"]))
    quantized = int8.to_int8(model, batches, backend="torch-per-token")
    hidden = quantized(input_ids=torch.tensor([[101, 2023, 2003, 102]])).last_hidden_state
    assert hidden.shape == (1, 4, TINY["hidden_size"])
    assert _ours(temp_dir) == []
