"""bertkit against the fast CPU engines, side by side: sentence-transformers (torch fp32, ONNX fp32, dynamic
qint8 ONNX), CTranslate2 int8, fastembed, and bertkit fp32 / bf16 / int8, on the bundled all-MiniLM-L6-v2.

    python benchmarks/cpu_engines.py --quick          # smoke test: small sizes, one round (a few minutes)
    python benchmarks/cpu_engines.py --threads 2      # the full run: run it on a quiet machine

The anchors live in their own venv (./.venv-bench, made on first use with `--venv`): installing optimum
changes transformers, which must never touch the project's .venv. bertkit runs in that venv too, from this
source tree (it needs only torch, tokenizers, numpy, safetensors and tqdm at run time). Each engine runs in its
own process (one engine's runtime threads -- onnxruntime's spinning pool, CTranslate2's OpenMP -- slowed the
others' small ops up to 10x when they shared one), all loaded at once and run in turns, interleaved round by
round (the machine's speed drifts; ratios within a round are fair).

Per length bucket (random words; short 3-30, medium 30-100, long 300+ words truncated at 256 tokens, mixed
5-250): throughput at batch 32 and 128 (texts/s and the ratio to sentence-transformers' torch fp32), accuracy
against that reference (min / mean cosine, top-10 neighbour overlap on a retrieval set), batch-1 latency
p50/p95, and per engine in a fresh process: cold start (process start to first embedding) and peak RSS.
The CPU's ISA flags are printed above every table.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# The anchors' versions as measured (docs/benchmarks.md); optimum-onnx holds transformers below 4.58, hence
# sentence-transformers 5.x here while the project's tests use 6.x.
ANCHORS = ["sentence-transformers[onnx]==5.7.0", "optimum==2.1.0", "optimum-onnx==0.1.0", "transformers==4.57.6",
           "ctranslate2==4.8.5", "fastembed==0.9.1", "onnx==1.23.2", "onnxruntime==1.32.0"]
BUCKETS = {"short": (3, 30), "medium": (30, 100), "long": (300, 400), "mixed": (5, 250)}
ISA = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8")
# --emulate-avx2: the kernels of an AVX2-only CPU, where a runtime lets us choose them (onnxruntime does not).
EMULATE_AVX2 = {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2", "CT2_FORCE_CPU_ISA": "AVX2",
                "BERTKIT_CPU_FLAGS": "avx2 fma"}


# ------------------------------------------------------------------------------------- the machine
def cpu_flags() -> dict[str, bool]:
    flags = set()
    if "BERTKIT_CPU_FLAGS" in os.environ:  # --emulate-avx2 (bertkit.cpu reads the same variable)
        flags = set(os.environ["BERTKIT_CPU_FLAGS"].replace(",", " ").split())
        return {name: name in flags for name in ISA}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    return {name: name in flags for name in ISA}


def isa_line() -> str:
    flags = cpu_flags()
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), "unknown CPU") if Path("/proc/cpuinfo").exists() else "unknown CPU"
    line = f"CPU: {model}; " + " ".join(f"{k.upper()}={'yes' if v else 'no'}" for k, v in flags.items())
    if "BERTKIT_CPU_FLAGS" in os.environ:
        line += " (emulated: " + " ".join(f"{k}={os.environ.get(k)}" for k in EMULATE_AVX2) + \
            "; onnxruntime still uses this CPU's own kernels)"
    return line


def st_quant_config() -> str:
    """sentence-transformers / optimum dynamic quantization preset that fits this CPU."""
    flags = cpu_flags()
    return "avx512_vnni" if flags["avx512_vnni"] else "avx512" if flags["avx512f"] else "avx2"


# ------------------------------------------------------------------------------------- the texts
def make_texts(vocab_file: Path, n: int, bucket: str, seed: int) -> list[str]:
    import random

    words = [w for w in vocab_file.read_text(encoding="utf-8").split() if w.isalpha() and w.islower() and len(w) > 2]
    rng = random.Random(f"{bucket}-{seed}")
    lo, hi = BUCKETS[bucket]
    return [" ".join(rng.choices(words, k=rng.randint(lo, hi))).capitalize() + "." for _ in range(n)]


# ------------------------------------------------------------------------------------- the engines
def load_engine(name: str, cache: Path, threads: int):
    """Returns encode(texts, batch_size) -> (n, dim) float32 numpy array, or raises RuntimeError("skipped: ...")."""
    import numpy as np

    model = cache / "model"
    if name.startswith("st_"):
        from sentence_transformers import SentenceTransformer

        if name == "st_torch":
            st = SentenceTransformer(str(model), device="cpu")
        else:
            # export_dynamic_quantized_onnx_model names it model_qint8_<config>.onnx, or model_quint8_avx2.onnx
            file = "onnx/model.onnx" if name == "st_onnx" else next(
                (f"onnx/{p.name}" for p in sorted((model / "onnx").glob(f"model_*int8_{st_quant_config()}.onnx"))),
                f"onnx/model_qint8_{st_quant_config()}.onnx")
            st = SentenceTransformer(str(model), device="cpu", backend="onnx", model_kwargs={"file_name": file})
        return lambda texts, bs: st.encode(texts, batch_size=bs, convert_to_numpy=True)
    if name == "ct2_int8":
        import ctranslate2
        from tokenizers import Tokenizer

        encoder = ctranslate2.Encoder(str(cache / "ct2"), device="cpu", compute_type="int8", intra_threads=threads)
        tok = Tokenizer.from_file(str(model / "tokenizer.json"))
        tok.no_padding()  # the model's tokenizer.json pads to 128; pooling needs the real lengths
        tok.enable_truncation(256)  # sentence-transformers' max_seq_length for this model

        def encode(texts, bs):
            ids = [e.ids for e in tok.encode_batch(texts)]
            order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))  # length-sorted batches, as ST does
            out = np.empty((len(texts), 384), dtype=np.float32)
            for start in range(0, len(order), bs):
                rows = order[start:start + bs]
                hidden = np.array(encoder.forward_batch([ids[i] for i in rows]).last_hidden_state)
                lengths = np.array([len(ids[i]) for i in rows])
                mask = (np.arange(hidden.shape[1])[None, :] < lengths[:, None])[..., None]
                pooled = (hidden * mask).sum(1) / lengths[:, None]
                out[rows] = pooled / np.linalg.norm(pooled, axis=1, keepdims=True)
            return out
        return encode
    if name == "fastembed":
        try:
            from fastembed import TextEmbedding

            fe = TextEmbedding("sentence-transformers/all-MiniLM-L6-v2", threads=threads)
        except Exception as err:  # noqa: BLE001 - any failure (offline hub, no package) is reported, not fatal
            raise RuntimeError(f"skipped: {type(err).__name__}: {str(err).splitlines()[0][:150] if str(err) else ''}")
        return lambda texts, bs: np.stack(list(fe.embed(texts, batch_size=bs)))
    if name.startswith("bertkit_"):
        import torch

        from bertkit import SentenceEncoder

        if name == "bertkit_bf16" and not (cpu_flags()["avx512_bf16"] or cpu_flags()["amx_bf16"]):
            raise RuntimeError("skipped: no native bf16 (AVX512-BF16/AMX) on this CPU")
        kwargs = {"bertkit_fp32": {}, "bertkit_bf16": {"dtype": torch.bfloat16},
                  "bertkit_int8": {"quantize": "int8"}}[name]
        enc = SentenceEncoder.from_pretrained(str(model), device="cpu", **kwargs)
        return lambda texts, bs: enc.encode(texts, batch_size=bs)
    raise ValueError(f"unknown engine {name}")


ENGINES = ["st_torch", "st_onnx", "st_qint8", "ct2_int8", "fastembed", "bertkit_fp32", "bertkit_bf16", "bertkit_int8"]


# ------------------------------------------------------------------------------------- worker side
def worker_main(args) -> None:
    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    cache = Path(args.cache)
    if args.worker == "cold":  # one engine in a fresh process: the parent timed the start
        encode = load_engine(args.engine, cache, args.threads)
        encode(["The first embedding of this process."], 1)
        print(json.dumps({"ready": time.time()}))
        texts = make_texts(cache / "model" / "vocab.txt", args.n, "mixed", 0)
        encode(texts, 32)  # so peak RSS includes a real batch
        return
    # "serve": one engine in its own process, timed on the parent's command (one JSON line each way), so no
    # engine's runtime threads (onnxruntime's spinning pool, CTranslate2's OpenMP) share a process with another's.
    try:
        encode = load_engine(args.engine, cache, args.threads)
    except RuntimeError as err:
        print(json.dumps({"skipped": str(err)}), flush=True)
        return
    vocab = cache / "model" / "vocab.txt"
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["op"] == "time":
            texts = make_texts(vocab, cmd["n"], cmd["bucket"], 0)
            encode(texts[:8], cmd["bs"])  # warm-up
            start = time.perf_counter()
            encode(texts, cmd["bs"])
            reply = {"t": time.perf_counter() - start}
        elif cmd["op"] == "embed":
            emb = encode(make_texts(vocab, cmd["n"], cmd["bucket"], 0), 32)
            reply = {"emb": np.asarray(emb, dtype=np.float32).tobytes().hex(), "dim": int(emb.shape[1])}
        elif cmd["op"] == "latency":
            texts = make_texts(vocab, cmd["calls"], "mixed", 1)
            encode(texts[:3], 1)
            lat = []
            for text in texts:
                start = time.perf_counter()
                encode([text], 1)
                lat.append((time.perf_counter() - start) * 1e3)
            lat.sort()
            reply = {"lat": [lat[len(lat) // 2], lat[min(len(lat) - 1, int(len(lat) * 0.95))]]}
        else:
            return
        print(json.dumps(reply), flush=True)


# ------------------------------------------------------------------------------------- parent side
def ensure_venv(venv: Path) -> Path:
    python = venv / "bin" / "python"
    stamp = venv / ".anchors-installed"
    if not stamp.exists():
        print(f"creating the anchors' venv {venv} (once; never the project's .venv) ...", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        import torch

        # The same torch as the project, so both sides run the same kernels.
        pins = [f"torch=={torch.__version__.split('+')[0]}", *ANCHORS]
        subprocess.run([str(python), "-m", "pip", "install", "-q", *pins], check=True)
        stamp.touch()
    return python


def prepare_models(python: Path, cache: Path) -> None:
    """Copies the bundled model (ST writes its ONNX exports beside it), exports ST's ONNX and qint8 models
    and converts the model for CTranslate2, each once."""
    from bertkit.encoder import bundled_model_dir

    model = cache / "model"
    if not model.exists():
        source = bundled_model_dir()
        if source is None:
            sys.exit("the bundled model is not installed: run `make install` first")
        shutil.copytree(source, model)
    if not list((model / "onnx").glob(f"model_*int8_{st_quant_config()}.onnx")):
        code = ("import os, sys; from sentence_transformers import SentenceTransformer, export_dynamic_quantized_onnx_model\n"
                "exported = os.path.exists(os.path.join(sys.argv[1], 'onnx', 'model.onnx'))\n"
                "st = SentenceTransformer(sys.argv[1], backend='onnx')\n"  # exports onnx/model.onnx if missing
                "if not exported: st.save_pretrained(sys.argv[1])\n"  # (saving over the loaded file fails)
                "export_dynamic_quantized_onnx_model(st, sys.argv[2], sys.argv[1])\n")
        subprocess.run([str(python), "-c", code, str(model), st_quant_config()], check=True)
    if not (cache / "ct2" / "model.bin").exists():
        converter = python.parent / "ct2-transformers-converter"
        subprocess.run([str(converter), "--model", str(model), "--output_dir", str(cache / "ct2"),
                        "--quantization", "int8", "--force"], check=True)


def cold_start(python: Path, engine: str, args) -> tuple[float, float] | str:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(args.threads)}
    start = time.time()
    proc = subprocess.Popen([str(python), __file__, "--worker", "cold", "--engine", engine, "--cache", args.cache,
                             "--threads", str(args.threads), "--n", str(min(args.n, 128))],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    out, err = proc.stdout.read(), proc.stderr.read()
    if status != 0:
        last = (err.strip().splitlines() or ["?"])[-1]
        return last if last.startswith("RuntimeError: skipped") else f"failed: {last[:120]}"
    return json.loads(out.splitlines()[-1])["ready"] - start, usage.ru_maxrss / 1024


class Worker:
    """One engine in its own process (``--worker serve``), driven one JSON command at a time."""

    def __init__(self, python: Path, name: str, args):
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(args.threads)}
        self.proc = subprocess.Popen([str(python), __file__, "--worker", "serve", "--engine", name, "--cache",
                                      args.cache, "--threads", str(args.threads)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env, text=True)
        self.hello = self._read(name)

    def _read(self, name: str) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            sys.exit(f"the {name} worker died; rerun with that engine alone to see its error")
        while not line.startswith("{"):  # an engine's own chatter on stdout
            line = self.proc.stdout.readline()
        return json.loads(line)

    def ask(self, name: str, **cmd) -> dict:
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        return self._read(name)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait(timeout=60)


def run_engines(python: Path, args) -> dict:
    """Every engine in its own process, all loaded at once and run in turns (rotated each round; only one runs
    at a time, and a 0.3 s pause after each lets spinning runtime threads go idle)."""
    import numpy as np

    workers, skipped = {}, {}
    for name in args.engines:
        worker = Worker(python, name, args)
        if "skipped" in worker.hello:
            skipped[name] = worker.hello["skipped"]
            worker.close()
        else:
            workers[name] = worker
    results = {"skipped": skipped, "throughput": {}, "accuracy": {}, "latency": {}}
    try:
        for name, worker in workers.items():  # one untimed pass: first-touch allocations, kernel set-up
            worker.ask(name, op="time", bucket=args.buckets[0], n=args.n, bs=args.batch_sizes[0])
        for bucket in args.buckets:
            for bs in args.batch_sizes:
                times = {name: [] for name in workers}
                for r in range(args.rounds):
                    names = list(workers)
                    for name in names[r % len(names):] + names[: r % len(names)]:
                        times[name].append(workers[name].ask(name, op="time", bucket=bucket, n=args.n, bs=bs)["t"])
                        time.sleep(0.3)
                results["throughput"][f"{bucket}/{bs}"] = times
            embs = {}
            for name, worker in workers.items():
                reply = worker.ask(name, op="embed", bucket=bucket, n=args.n)
                emb = np.frombuffer(bytes.fromhex(reply["emb"]), dtype=np.float32).reshape(-1, reply["dim"])
                embs[name] = emb / np.linalg.norm(emb, axis=1, keepdims=True)
            ref = embs["st_torch"]
            queries = min(50, len(ref) // 4)
            ref_top = np.argsort(-(ref[:queries] @ ref.T), axis=1)[:, 1:11]
            for name, emb in embs.items():
                cos = (emb * ref).sum(1)
                top = np.argsort(-(emb[:queries] @ emb.T), axis=1)[:, 1:11]
                overlap = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(top, ref_top)])
                results["accuracy"].setdefault(bucket, {})[name] = [float(cos.min()), float(cos.mean()),
                                                                    float(overlap)]
        for name, worker in workers.items():
            results["latency"][name] = worker.ask(name, op="latency", calls=args.latency_calls)["lat"]
            time.sleep(0.3)
    finally:
        for worker in workers.values():
            worker.close()
    return results


def report(results: dict, args) -> None:
    flags = isa_line()
    names = [n for n in args.engines if n not in results["skipped"]]
    print(f"\n## Throughput, texts/s (x = ratio to st_torch, median over {args.rounds} interleaved rounds), "
          f"{args.n} texts per bucket, {args.threads} threads\n{flags}\n")
    print("| bucket/batch | " + " | ".join(names) + " |\n" + "|---" * (len(names) + 1) + "|")
    for key, times in results["throughput"].items():
        cells = []
        for name in names:
            ratio = statistics.median(t0 / t for t0, t in zip(times["st_torch"], times[name]))
            cells.append(f"{args.n / statistics.median(times[name]):.0f} ({ratio:.2f}x)")
        print(f"| {key} | " + " | ".join(cells) + " |")
    print(f"\n## Accuracy against st_torch: cosine min / mean, top-10 neighbour overlap\n{flags}\n")
    print("| bucket | " + " | ".join(names) + " |\n" + "|---" * (len(names) + 1) + "|")
    for bucket, row in results["accuracy"].items():
        print(f"| {bucket} | " + " | ".join(f"{a:.4f} / {b:.4f} / {c:.2f}" for a, b, c in (row[n] for n in names)) + " |")
    print(f"\n## Batch-1 latency p50 / p95 (ms, {args.latency_calls} calls)\n{flags}\n")
    print("| engine | p50 | p95 |\n|---|---|---|")
    for name in names:
        p50, p95 = results["latency"][name]
        print(f"| {name} | {p50:.1f} | {p95:.1f} |")
    for name, why in results["skipped"].items():
        print(f"{name}: {why}")
    sys.stdout.flush()


def report_cold(python: Path, names: list[str], args) -> dict:
    print(f"\n## Cold start (process start to first embedding) and peak RSS, one fresh process each\n{isa_line()}\n")
    print("| engine | cold start (s) | peak RSS (MiB) |\n|---|---|---|", flush=True)
    cold = {}
    for name in names:
        cold[name] = c = cold_start(python, name, args)
        print(f"| {name} | " + (f"{c[0]:.2f} | {c[1]:.0f}" if isinstance(c, tuple) else f"{c} | -") + " |", flush=True)
    return cold


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke test: 64 texts, 1 round, 20 latency calls")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--n", type=int, default=1024, help="texts per bucket (default 1024)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--latency-calls", type=int, default=200)
    parser.add_argument("--venv", default=str(ROOT / ".venv-bench"), help="the anchors' venv (made if missing)")
    parser.add_argument("--json", metavar="FILE", help="also write the raw results here")
    parser.add_argument("--no-cold", action="store_true", help="skip the cold-start / peak-RSS processes")
    parser.add_argument("--engines", nargs="+", choices=ENGINES, default=ENGINES,
                        help="engines to run (st_torch, the reference, is always run)")
    parser.add_argument("--buckets", nargs="+", choices=list(BUCKETS), default=list(BUCKETS))
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[32, 128])
    parser.add_argument("--emulate-avx2", action="store_true",
                        help="run torch, oneDNN, CTranslate2 and bertkit's CPU detection as on an AVX2-only CPU "
                             "(onnxruntime's kernels cannot be capped: the ST onnx/qint8 columns keep this CPU's)")
    parser.add_argument("--worker", choices=["serve", "cold"], help=argparse.SUPPRESS)
    parser.add_argument("--engine", help=argparse.SUPPRESS)
    parser.add_argument("--cache", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.n, args.rounds, args.latency_calls = 64, 1, 20
    args.engines = ["st_torch"] + [n for n in ENGINES if n in args.engines and n != "st_torch"]
    if args.worker:
        return worker_main(args)
    if args.emulate_avx2:
        os.environ.update(EMULATE_AVX2)
    venv = Path(args.venv)
    python = ensure_venv(venv)
    args.cache = str(venv / "cache")
    prepare_models(python, Path(args.cache))
    print(isa_line(), file=sys.stderr)
    results = run_engines(python, args)
    report(results, args)
    cold = {} if args.no_cold else report_cold(python, [n for n in args.engines if n not in results["skipped"]], args)
    if args.json:
        Path(args.json).write_text(json.dumps({"cpu": isa_line(), "args": vars(args), "results": results,
                                               "cold": cold}, indent=1))


if __name__ == "__main__":
    main()
