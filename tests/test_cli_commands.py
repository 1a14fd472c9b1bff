"""Every subcommand the issues name is wired into `bertkit` and answers --help."""

import numpy as np
import pytest

from bertkit import cli


@pytest.mark.parametrize("argv,expected", [
    (["quantize", "--help"], "--calib"),
    (["export-onnx", "--help"], "--quantized"),
    (["finetune", "--help"], "--task"),
    (["pretrain", "--help"], "--corpus"),
    (["convert", "megatron-lm", "--help"], "--num-attention-heads"),
    (["convert", "tf", "--help"], "--config"),
])
def test_subcommand_help(argv, expected, capsys):
    try:
        code = cli.main(argv)
    except SystemExit as exc:  # argparse's own --help exit
        code = exc.code
    assert code == 0
    assert expected in capsys.readouterr().out


class _FakeEncoder:
    dim = 4

    def encode_stream(self, texts, chunk_size, **options):
        texts = list(texts)
        for start in range(0, len(texts), chunk_size):
            yield np.full((len(texts[start:start + chunk_size]), 4), start, dtype=np.float32)


@pytest.mark.parametrize("claimed, message", [(4, "shrank"), (2, "grew")])
def test_embed_refuses_an_input_that_changed_while_read(tmp_path, monkeypatch, capsys, claimed, message):
    from bertkit.commands import embed

    (tmp_path / "in.txt").write_text("a\nb\nc\n")
    monkeypatch.setattr(embed, "count_texts", lambda *a: claimed)  # as if the file changed between the two reads
    monkeypatch.setattr(embed, "load_encoder", lambda args: _FakeEncoder())
    assert cli.main(["embed", "-i", str(tmp_path / "in.txt"), "-o", str(tmp_path / "e.npy")]) == 2
    assert message in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.txt"]  # no output, no partial or progress file
