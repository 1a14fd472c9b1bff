"""Every subcommand the issues name is wired into `bertkit` and answers --help."""

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
