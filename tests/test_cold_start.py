"""Cold start: `bertkit --help`, `--version` and argument errors never import torch; `import bertkit` neither,
and loading a model does not pull in torch._dynamo (about 1 s, for a CUDA-only kernel)."""

import subprocess
import sys

import pytest

import bertkit


def _imported(code: str, *args: str) -> tuple[set[str], subprocess.CompletedProcess]:
    """Runs ``code`` with ``args`` in a fresh interpreter; returns the modules loaded at exit (and the process)."""
    report = "import atexit, sys; atexit.register(lambda: print('\\nMODULES', *sorted(sys.modules), file=sys.stderr))\n"
    proc = subprocess.run([sys.executable, "-c", report + code, *args], capture_output=True, text=True, timeout=120)
    lines = [line for line in proc.stderr.splitlines() if line.startswith("MODULES ")]
    assert lines, proc.stderr[-2000:]
    return set(lines[-1].split()[1:]), proc


CLI = "import sys; from bertkit.cli import main; sys.exit(main())"


@pytest.mark.parametrize("argv, status", [
    (["--help"], 0), (["--version"], 0), ([], 2), (["nosuch"], 2), (["embed", "--help"], 0),
    (["embed", "--batch-size", "0", "text"], 2), (["search", "query"], 2), (["info", "--help"], 0),
])
def test_cli_help_version_and_argument_errors_do_not_import_torch(argv, status):
    modules, proc = _imported(CLI, *argv)
    assert proc.returncode == status, proc.stderr[-2000:]
    assert "bertkit.cli" in modules
    assert "torch" not in modules, f"bertkit {' '.join(argv)} imported torch"
    if status == 2:
        errors = [line for line in proc.stderr.splitlines() if line and not line.startswith("MODULES ")]
        assert "Traceback" not in proc.stderr and errors
        assert errors[-1].startswith("bertkit") or not argv  # no command: the help, on stderr


def test_help_still_lists_every_command_and_each_command_its_arguments(capsys):
    from bertkit.cli import COMMANDS, main

    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in COMMANDS)
    assert main(["embed", "--help"]) == 0
    assert "--batch-size" in capsys.readouterr().out
    assert main(["finetune", "--help"]) == 0  # an argument builder that lives in another module
    assert "--task" in capsys.readouterr().out


def test_import_bertkit_is_light_and_models_load_without_dynamo():
    modules, proc = _imported("import bertkit")
    assert proc.returncode == 0 and "bertkit" in modules and "torch" not in modules
    modules, proc = _imported("from bertkit import BertModel, SentenceEncoder, BertConfig")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "bertkit.models" in modules and "torch" in modules
    assert "torch._dynamo" not in modules


def test_lazy_names_and_submodules():
    assert bertkit.BertModel.__name__ == "BertModel" and bertkit.PRESETS
    assert set(bertkit.__all__) <= set(dir(bertkit))
    assert callable(bertkit.quant.quantize)  # a submodule reached as an attribute, as before
    with pytest.raises(AttributeError, match="no attribute 'NoSuchThing'"):
        bertkit.NoSuchThing
    namespace = {}
    exec("from bertkit import *", namespace)
    assert namespace["SentenceEncoder"].__name__ == "SentenceEncoder"
