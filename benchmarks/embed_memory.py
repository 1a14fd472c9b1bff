"""Peak memory of `bertkit embed` on big files: does it stay flat as the input grows?

`bertkit embed --input FILE --output OUT` reads the file and embeds it in chunks of
``bertkit.commands.embed.CHUNK_SIZE`` texts and writes each chunk's rows as it goes (.npy and
.jsonl appended through a buffered file), so its peak memory should not depend on the number of lines. This script checks
that on the real command line:

* it writes .txt files of N short synthetic sentences (5 to 12 words from a fixed word list, fixed
  seed; by default N = 10,000 and 100,000) into a temporary folder;
* for each N and each output format it runs ``python -m bertkit embed -i FILE -o OUT`` in a fresh
  child process, reaps it with ``os.wait4`` (that child's own rusage, not the cumulative maximum over
  all children that ``RUSAGE_CHILDREN`` gives) and reports its peak RSS (``ru_maxrss``), wall time,
  CPU time, lines/s and output size. While the child runs, ``/proc/PID/status`` is sampled to split
  the resident memory into anonymous memory (heap, tensors) and file-backed pages (shared libraries,
  the model's safetensors map), at the sampling interval, so short spikes may be
  missed; ``ru_maxrss`` is exact;
* a baseline child that only imports bertkit and loads the model shows how much of the peak is the
  model and the libraries rather than the data;
* the parent then checks each output: the right number of rows, and a few rows (first, last and
  random ones) equal ``SentenceEncoder.encode`` of the same lines within 1e-5.

`bertkit embed` has no thread option; the children get ``--threads`` through ``OMP_NUM_THREADS``
(torch's intra-op threads), ``MKL_NUM_THREADS`` and ``RAYON_NUM_THREADS`` (the Rust tokenizer).

Run time is dominated by embedding: about 11 tokens per sentence, so the 100k-line file is about
1.2M tokens, roughly 24 TFLOP for all-MiniLM-L6-v2; at 50 to 80 GFLOP/s (an idle 2-core CPU) that is
5 to 8 minutes per output format (an estimate, not a measurement). ``--formats jsonl`` halves the total.

    python benchmarks/embed_memory.py --threads 2                      # 10k and 100k lines, .jsonl and .npy
    python benchmarks/embed_memory.py --lines 200 500 --threads 2      # a quick look
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
from embed_throughput import WORDS  # noqa: E402  (the same word list as the throughput benchmark)
TOLERANCE = 1e-5


def write_sentences(path: Path, n: int, seed: int) -> None:
    """Writes n lines of 5 to 12 random words (capitalized, with a full stop), reproducible by seed."""
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as handle:
        for _ in range(n):
            words = [rng.choice(WORDS) for _ in range(rng.randint(5, 12))]
            words[0] = words[0].capitalize()
            handle.write(" ".join(words) + ".\n")


def read_lines(path: Path, indices: set[int]) -> dict[int, str]:
    """The lines of `path` at the given 0-based indices (the generated files have no blank lines)."""
    found = {}
    with open(path, encoding="utf-8") as handle:
        for index, line in enumerate(handle):
            if index in indices:
                found[index] = line.rstrip("\n")
    return found


def _status_kib(pid: int, fields: tuple[str, ...]) -> dict[str, int]:
    # /proc/PID/status lines look like "RssAnon:\t  123456 kB"; the process may be gone already.
    values = {}
    try:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                name, _, rest = line.partition(":")
                if name in fields:
                    values[name] = int(rest.split()[0])
    except (OSError, ValueError, IndexError):
        pass
    return values


def run_child(command: list[str], env: dict[str, str], log: Path, interval: float) -> dict:
    """Runs a command in a fresh child, samples its memory, and returns its own rusage via os.wait4."""
    peaks = {"RssAnon": 0, "RssFile": 0}
    with open(log, "wb") as out:
        start = time.perf_counter()
        child = subprocess.Popen(command, env=env, cwd=REPO, stdin=subprocess.DEVNULL, stdout=out, stderr=out)
        while True:
            pid, status, usage = os.wait4(child.pid, os.WNOHANG)
            if pid == child.pid:
                break
            for name, kib in _status_kib(child.pid, tuple(peaks)).items():
                peaks[name] = max(peaks[name], kib)
            time.sleep(interval)
        wall = time.perf_counter() - start
    child.returncode = os.waitstatus_to_exitcode(status)  # reaped here, so Popen must not wait again
    return {"rc": child.returncode, "wall": wall, "cpu": usage.ru_utime + usage.ru_stime,
            "maxrss_mib": usage.ru_maxrss / 1024,  # Linux reports KiB
            "anon_mib": peaks["RssAnon"] / 1024, "file_mib": peaks["RssFile"] / 1024, "log": log}


def _tail(path: Path, chars: int = 2000) -> str:
    text = path.read_text(encoding="utf-8", errors="replace")
    return text[-chars:].replace("\r", "\n")


def check_output(encoder, output: Path, input_path: Path, n: int, count: int, seed: int) -> str:
    """Checks the row count and compares a few rows with SentenceEncoder.encode; returns a short verdict."""
    import numpy as np

    rng = random.Random(seed + n)
    picks = sorted({0, n - 1} | set(rng.sample(range(n), min(n, max(0, count - 2)))))
    lines = read_lines(input_path, set(picks))
    if output.suffix == ".npy":
        matrix = np.load(output, mmap_mode="r")
        if matrix.shape != (n, encoder.dim) or matrix.dtype != np.float32:
            return f"FAIL: shape {matrix.shape} {matrix.dtype}, expected ({n}, {encoder.dim}) float32"
        rows = {i: np.array(matrix[i]) for i in picks}
        del matrix
    else:
        rows, total = {}, 0
        wanted = set(picks)
        with open(output, encoding="utf-8") as handle:
            for number, line in enumerate(handle):
                total += 1
                if number in wanted:
                    record = json.loads(line)
                    if record["index"] != number or record["text"] != lines[number]:
                        return f"FAIL: line {number} holds index {record['index']} / text {record['text']!r}"
                    rows[number] = np.asarray(record["embedding"], dtype=np.float32)
        if total != n:
            return f"FAIL: {total} lines, expected {n}"
    expected = encoder.encode([lines[i] for i in picks])
    got = np.stack([rows[i] for i in picks])
    diff = float(np.abs(got - expected).max())
    verdict = "ok" if diff <= TOLERANCE else "FAIL"
    return f"{verdict}: {n} rows; {len(picks)} rows vs encode, max |diff| {diff:.1e}"


def machine_info(threads: int) -> None:
    import numpy as np
    import torch

    import bertkit
    from bertkit.encoder import bundled_model_dir

    mem = "?"
    try:
        with open("/proc/meminfo") as handle:
            mem = f"{int(handle.readline().split()[1]) / 2**20:.1f} GiB"
    except (OSError, ValueError, IndexError):
        pass
    print(f"date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}")
    print(f"machine: {platform.platform()}, {platform.processor() or platform.machine()}, "
          f"os.cpu_count() {os.cpu_count()}, usable CPUs {len(os.sched_getaffinity(0))}, RAM {mem}")
    print(f"python {platform.python_version()}, torch {torch.__version__}, numpy {np.__version__}, "
          f"bertkit {bertkit.__version__}; children get {threads} thread(s) through OMP_NUM_THREADS")
    print(f"bundled model: {bundled_model_dir()}")
    print(f"load average (1, 5, 15 min) before: {', '.join(f'{x:.2f}' for x in os.getloadavg())}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n")[-1].strip("\n"),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lines", type=int, nargs="+", default=[10_000, 100_000], metavar="N",
                        help="input sizes in lines, one child run each (default: 10000 100000)")
    parser.add_argument("--formats", nargs="+", choices=["jsonl", "npy"], default=["jsonl", "npy"],
                        help="output formats to run (default: jsonl npy)")
    parser.add_argument("--threads", type=int, default=2, help="threads for the children and the parent's "
                        "check (default 2)")
    parser.add_argument("--batch-size", type=int, default=32, help="bertkit embed --batch-size (default 32)")
    parser.add_argument("--model", metavar="PATH", help="bertkit embed --model (default: the bundled model)")
    parser.add_argument("--check-rows", type=int, default=5, help="rows per output compared with "
                        "SentenceEncoder.encode (default 5: first, last, 3 random)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic sentences (default 0)")
    parser.add_argument("--interval", type=float, default=0.05, help="seconds between /proc samples (default 0.05)")
    parser.add_argument("--workdir", metavar="DIR", help="where to put the inputs and outputs (default: a new "
                        "temporary folder, deleted at the end)")
    parser.add_argument("--keep", action="store_true", help="keep the inputs and outputs")
    args = parser.parse_args()
    sizes = sorted(set(args.lines))
    if sizes[0] < 1:
        parser.error("--lines must be positive")

    machine_info(args.threads)
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads),
               RAYON_NUM_THREADS=str(args.threads), RAYON_RS_NUM_CPUS=str(args.threads))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    model_args = ["--model", args.model] if args.model else []
    work = Path(tempfile.mkdtemp(prefix="bertkit-embed-memory-", dir=args.workdir))
    failed = False
    try:
        baseline_code = (f"import bertkit; bertkit.SentenceEncoder.from_pretrained({args.model!r}, device='cpu')")
        base = run_child([sys.executable, "-c", baseline_code], env, work / "baseline.log", args.interval)
        if base["rc"] != 0:
            print(f"baseline child failed (exit {base['rc']}):\n{_tail(base['log'])}")
            return 1
        print(f"\nbaseline (import bertkit + load the model, nothing embedded): peak RSS {base['maxrss_mib']:.1f} MiB "
              f"(sampled RssAnon {base['anon_mib']:.1f}, RssFile {base['file_mib']:.1f}), {base['wall']:.1f} s")

        inputs = {}
        for n in sizes:
            inputs[n] = work / f"sentences_{n}.txt"
            write_sentences(inputs[n], n, args.seed)
        results = []
        for fmt in args.formats:
            for n in sizes:
                output = work / f"embeddings_{n}.{fmt}"
                command = [sys.executable, "-m", "bertkit", "embed", "-i", str(inputs[n]), "-o", str(output),
                           "--batch-size", str(args.batch_size), *model_args]
                if not results:
                    print(f"child command: {' '.join(command[1:])}")
                res = run_child(command, env, work / f"embed_{n}_{fmt}.log", args.interval)
                res.update(fmt=fmt, n=n, output=output, input=inputs[n],
                           size_mib=output.stat().st_size / 2**20 if output.exists() else float("nan"))
                if res["rc"] != 0:
                    print(f"`bertkit embed` failed on {n} lines -> .{fmt} (exit {res['rc']}):\n{_tail(res['log'])}")
                    failed = True
                results.append(res)
                print(f"  done: .{fmt} {n} lines in {res['wall']:.1f} s, peak RSS {res['maxrss_mib']:.1f} MiB",
                      flush=True)

        import torch

        from bertkit.encoder import SentenceEncoder

        torch.set_num_threads(args.threads)
        encoder = SentenceEncoder.from_pretrained(args.model, device="cpu")
        for res in results:
            res["check"] = (check_output(encoder, res["output"], res["input"], res["n"], args.check_rows, args.seed)
                            if res["rc"] == 0 else f"FAIL: exit {res['rc']}")
            failed |= not res["check"].startswith("ok")

        print(f"\nload average (1, 5, 15 min) after: {', '.join(f'{x:.2f}' for x in os.getloadavg())}")
        print("\npeak RSS = the child's ru_maxrss (os.wait4); anon / file = sampled peaks of RssAnon / RssFile; "
              "+base = peak RSS minus the baseline\n")
        header = (f"{'output':<7}{'lines':>9}{'wall s':>9}{'CPU s':>9}{'lines/s':>10}{'peak RSS MiB':>14}"
                  f"{'+base':>8}{'anon':>8}{'file':>8}{'out MiB':>9}  check")
        print(header)
        print("-" * len(header))
        for res in results:
            rate = res["n"] / res["wall"] if res["wall"] > 0 else float("nan")
            print(f"{'.' + res['fmt']:<7}{res['n']:>9,}{res['wall']:>9.1f}{res['cpu']:>9.1f}{rate:>10.0f}"
                  f"{res['maxrss_mib']:>14.1f}{res['maxrss_mib'] - base['maxrss_mib']:>8.1f}{res['anon_mib']:>8.1f}"
                  f"{res['file_mib']:>8.1f}{res['size_mib']:>9.1f}  {res['check']}")
        if len(sizes) > 1:
            small, big = sizes[0], sizes[-1]
            print()
            for fmt in args.formats:
                by_n = {r["n"]: r for r in results if r["fmt"] == fmt}
                a, b = by_n[small]["maxrss_mib"], by_n[big]["maxrss_mib"]
                extra_a, extra_b = a - base["maxrss_mib"], b - base["maxrss_mib"]
                above = f"{extra_b / extra_a:.2f}" if extra_a > 0 else "n/a"
                anon = by_n[big]["anon_mib"] / by_n[small]["anon_mib"] if by_n[small]["anon_mib"] else float("nan")
                print(f".{fmt}: peak RSS({big:,}) / peak RSS({small:,}) = {b / a:.3f} ({b - a:+.1f} MiB for "
                      f"{big / small:.0f}x the lines); above the baseline: {extra_b:.1f} / {extra_a:.1f} MiB = "
                      f"{above}; sampled peak RssAnon ratio {anon:.3f}")
    finally:
        if args.keep:
            print(f"\nkept inputs, outputs and child logs in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
