"""Issue #18 point 3: one 50 MB line costs `bertkit embed` about the line itself, not the 5.4 GB and 47 s of
tokenizing all of it to keep 256 tokens (the tokenizer reads only as far as the truncation; see
tests/test_tokenizer_bounded.py for the proof that the ids are the same)."""

import os
import subprocess
import sys

import numpy as np

import bertkit

WORDS = "the quick brown fox jumps over a lazy dog while reading".split()


def _peak_rss_mb(source, output) -> float:
    # os.wait4 gives this child's own peak RSS (RUSAGE_CHILDREN would be the maximum over all children).
    proc = subprocess.Popen([sys.executable, "-m", "bertkit", "embed", "-i", str(source), "-o", str(output), "-q",
                             "--threads", "1"], stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    assert status == 0, proc.stderr.read().decode()[-2000:]
    return usage.ru_maxrss / 1024  # KiB on Linux


def test_a_50_mb_line_costs_about_its_own_size(tmp_path):
    line = " ".join(WORDS[i % 11] for i in range(10_000_000))  # 50 MB, one line
    (tmp_path / "big.txt").write_text(line + "\n")
    (tmp_path / "short.txt").write_text(line[:5000] + "\n")
    short = _peak_rss_mb(tmp_path / "short.txt", tmp_path / "short.npy")
    big = _peak_rss_mb(tmp_path / "big.txt", tmp_path / "big.npy")
    size_mb = len(line) / 2**20
    assert big - short < 2 * size_mb, (short, big)  # measured: +56 MB (the line's bytes, then its text)
    # The first 5000 characters already hold far more than the model's 256 tokens: the same embedding.
    np.testing.assert_array_equal(np.load(tmp_path / "big.npy"), np.load(tmp_path / "short.npy"))
    expected = bertkit.SentenceEncoder.from_pretrained(device="cpu").encode([line[:5000]])
    np.testing.assert_allclose(np.load(tmp_path / "big.npy"), expected, rtol=0, atol=1e-6)
