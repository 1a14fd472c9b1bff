"""Reliability: `bertkit embed` killed mid-run (SIGKILL, SIGINT) in a real subprocess never leaves a
complete-looking file under the output name, and a re-run writes exactly the full, correct output.
(There is no --resume: a re-run starts over.)"""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import bertkit

N = 2000  # short lines: the kill needs a run in progress, the re-run should stay cheap


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    path = tmp_path_factory.mktemp("jobs") / "in.txt"
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda".split()
    path.write_text("".join(f"line {i}: " + words[i % 11] + " " * (i % 3) + words[i % 7] + "\n"
                            for i in range(N)), encoding="utf-8")
    return path


def _start(source, output):
    # batch size 4: slow enough on purpose that the kill lands mid-run
    return subprocess.Popen([sys.executable, "-m", "bertkit", "embed", "-i", str(source), "-o", str(output),
                             "--batch-size", "4"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _temps(output):
    return {p.name for p in output.parent.iterdir() if p.name.startswith(f".{output.name}.")}


def _kill_mid_run(source, output, sig):
    before = _temps(output)  # a temp file left by an earlier kill -9 does not count
    proc = _start(source, output)
    deadline = time.monotonic() + 60
    try:
        while not _temps(output) - before:
            assert proc.poll() is None, f"embed ended before its temp file appeared: {proc.stderr.read()[-2000:]}"
            assert time.monotonic() < deadline, "no temp file after 60 s"
            time.sleep(0.05)
        time.sleep(0.5)  # some rows written
        assert proc.poll() is None, "embed finished before it could be interrupted; make the input larger"
        proc.send_signal(sig)
        code = proc.wait(timeout=30)
        err = proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return code, err


# One killed run per format keeps this under a minute on a loaded 2-core machine: SIGKILL (no cleanup at
# all) on the memory-mapped .npy, SIGINT (Ctrl-C, cleanup runs) on the streamed .jsonl.
@pytest.mark.parametrize("suffix, sig", [(".npy", signal.SIGKILL), (".jsonl", signal.SIGINT)])
def test_killed_embed_leaves_nothing_complete_and_rerun_is_exact(source, suffix, sig):
    output = source.parent / f"out{suffix}"
    code, err = _kill_mid_run(source, output, sig)
    assert not output.exists()
    if sig == signal.SIGKILL:
        assert code == -signal.SIGKILL
        assert len(_temps(output)) == 1  # kill -9 runs no cleanup: a hidden .tmp stays, never the real name
    else:
        assert code == 130 and "interrupted" in err and "Traceback" not in err
        assert not _temps(output)  # Ctrl-C removes its temp file
    leftovers = _temps(output)
    done = subprocess.run([sys.executable, "-m", "bertkit", "embed", "-i", str(source), "-o", str(output),
                           "--batch-size", "128"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    texts = source.read_text(encoding="utf-8").splitlines()
    if suffix == ".npy":
        rows = np.load(output)
    else:
        records = [json.loads(line) for line in output.read_text(encoding="utf-8").splitlines()]
        assert [r["index"] for r in records] == list(range(N)) and [r["text"] for r in records] == texts
        rows = np.array([r["embedding"] for r in records], dtype=np.float32)
    assert rows.shape == (N, 384) and np.isfinite(rows).all()
    sample = list(range(0, N, 157)) + [N - 1]  # no dropped, duplicated or shifted rows
    expected = bertkit.SentenceEncoder.from_pretrained().encode([texts[i] for i in sample])
    np.testing.assert_allclose(rows[sample], expected, rtol=0, atol=1e-5)
    assert len({r.tobytes() for r in rows}) == N
    assert _temps(output) == leftovers  # the re-run neither trips over nor deletes a stale temp file
    os.unlink(output)
