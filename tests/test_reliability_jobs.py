"""Reliability of `bertkit embed` as a job, in real subprocesses (issue #18 points 6 and 14):

* killed (SIGKILL) or terminated (SIGTERM) with --resume, then run again: the result equals one
  uninterrupted run, bit for bit (the same chunks are embedded the same way);
* terminated or interrupted without --resume: no output and no partial file under any name;
* --shard I/N parts joined by `bertkit merge` equal the whole run.
"""

import json
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

N, CHUNK = 600, 75  # 8 chunks: the stop lands after some are saved and before the last
# One torch thread: on a busy 2-core machine two spinning threads are several times slower than one.
BASE = ["--chunk-size", str(CHUNK), "--batch-size", "8", "--threads", "1"]


def _bertkit(*argv, **options):
    return subprocess.run([sys.executable, "-m", "bertkit", *map(str, argv)], capture_output=True, text=True,
                          timeout=600, **options)


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    path = tmp_path_factory.mktemp("jobs") / "in.txt"
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda".split()
    lines = [f"line {i}: " + words[i % 11] + " " * (i % 3) + words[i % 7] for i in range(N)]
    lines[5] = ""  # a blank line is a row too
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def reference(source):
    out = source.parent / "reference.npy"
    done = _bertkit("embed", "-i", source, "-o", out, *BASE)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = np.load(out)
    assert rows.shape == (N, 384) and len({r.tobytes() for r in rows}) == N
    return rows


def _hidden(output):
    return sorted(p.name for p in output.parent.iterdir() if p.name.startswith(f".{output.name}."))


def _stop_mid_run(source, output, sig, *extra):
    proc = subprocess.Popen([sys.executable, "-m", "bertkit", "embed", "-i", str(source), "-o", str(output), *BASE,
                             *extra], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    progress = output.with_name(f".{output.name}.progress.json")
    deadline = time.monotonic() + 300
    try:
        while True:  # until at least one chunk is saved
            assert proc.poll() is None, f"embed ended before it could be stopped: {proc.stderr.read()[-2000:]}"
            assert time.monotonic() < deadline, "no chunk saved after 300 s"
            try:
                if json.loads(progress.read_text())["rows"] >= CHUNK:
                    break
            except (OSError, ValueError):
                pass
            time.sleep(0.05)
        proc.send_signal(sig)
        code = proc.wait(timeout=60)
        err = proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return code, err


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_stopped_embed_resumes_to_the_uninterrupted_result(source, reference, sig):
    output = source.parent / f"resumed-{sig.name}.npy"
    code, err = _stop_mid_run(source, output, sig, "--resume")
    assert not output.exists()
    if sig == signal.SIGTERM:
        assert code == 143 and "terminated" in err and "progress kept" in err and "Traceback" not in err
    else:
        assert code == -signal.SIGKILL
    assert _hidden(output) == [f".{output.name}.partial", f".{output.name}.progress.json"]
    saved = json.loads(output.with_name(f".{output.name}.progress.json").read_text())["rows"]
    other = _bertkit("embed", "-i", source, "-o", output, *BASE, "--batch-size", "16", "--resume")
    assert other.returncode == 2 and "batch_size" in other.stderr and "without --resume to start over" in other.stderr
    done = _bertkit("embed", "-i", source, "-o", output, *BASE, "--resume")
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"(from row {saved}, resumed)" in done.stderr and saved % CHUNK == 0
    np.testing.assert_array_equal(np.load(output), reference)
    assert _hidden(output) == []


def test_terminated_embed_without_resume_leaves_nothing(source):
    # SIGINT (Ctrl-C) is checked in-process by test_cli.py::test_interrupted_embed_leaves_no_output.
    output = source.parent / "plain.jsonl"
    code, err = _stop_mid_run(source, output, signal.SIGTERM)
    assert code == 143 and "bertkit embed: terminated" in err and "Traceback" not in err
    assert not output.exists() and _hidden(output) == []  # no partial file under any name


def test_shards_merged_equal_the_whole(source, reference):
    parts = [source.parent / f"part{i}.npy" for i in range(3)]
    for i, part in enumerate(parts):
        done = _bertkit("embed", "-i", source, "-o", part, *BASE, "--shard", f"{i}/3", "-q")
        assert done.returncode == 0 and done.stderr == "", done.stderr[-2000:]
    assert [len(np.load(p)) for p in parts] == [200, 200, 200]
    merged = source.parent / "merged.npy"
    done = _bertkit("merge", *parts, "-o", merged)
    assert done.returncode == 0 and f"merged 3 parts, {N} rows" in done.stderr
    # Other chunks, so other batches: equal up to float rounding, and every row in its place.
    np.testing.assert_allclose(np.load(merged), reference, rtol=0, atol=1e-6)
