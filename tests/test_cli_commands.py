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


def test_npy_writer_streams_rows_and_refuses_a_file_that_changed_size(tmp_path):
    from bertkit.cli import InputError, _write_npy

    rows = np.arange(12, dtype=np.float32).reshape(3, 4)
    out = tmp_path / "e.npy"
    _write_npy(out, ((i, "t", r) for i, r in enumerate(rows)), 3, 4, "in.txt")
    np.testing.assert_array_equal(np.load(out), rows)
    for n, message in ((4, "shrank"), (2, "grew")):
        target = tmp_path / f"bad{n}.npy"
        with pytest.raises(InputError, match=message):
            _write_npy(target, ((i, "t", r) for i, r in enumerate(rows)), n, 4, "in.txt")
        assert not target.exists() and not list(tmp_path.glob(f".bad{n}*"))
