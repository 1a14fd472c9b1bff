"""Load test of `bertkit serve` against the server a user would write (FastAPI calling
sentence-transformers' ``encode`` per request), in the same run, on loopback only.

Both servers load the same model (default: the bundled all-MiniLM-L6-v2) with the same torch thread count
and answer the same TEI-shaped ``POST /embed``. The client (aiohttp, in this process) sends mixed-length
texts (80 % queries of 4-16 words, 20 % documents of 30-250 words, fixed seed; one text a request) at
each concurrency, bounded by ``--requests`` and ``--seconds`` per level. Every response is checked
against ``SentenceEncoder.encode`` in process (nothing lost, nothing wrong: a non-200 or a row further
than ``--atol`` from the reference counts as an error). Printed per server and concurrency: requests/s,
p50 and p99 latency, errors; at concurrency 1 also the p50 of calling ``SentenceEncoder.encode`` on one
text directly (what the server adds). The CPU's flags and each server's RSS (and peak) at start and end
are printed; ``--soak S`` then keeps bertkit at the highest concurrency for S seconds, printing its RSS
every 30 s (memory must stay flat).

    python benchmarks/serve_load.py --concurrency 1 16 64 --requests 2000 --seconds 60 --threads 2
    python benchmarks/serve_load.py --requests 40 --seconds 10 --concurrency 1 4   # smoke test
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import random
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from embed_throughput import WORDS  # noqa: E402  (the same word list as the other benchmarks)

BASELINE = r'''
import sys, torch
from fastapi import FastAPI
from pydantic import BaseModel
from sentence_transformers import SentenceTransformer
import uvicorn

torch.set_num_threads(int(sys.argv[3]))
model = SentenceTransformer(sys.argv[1], device="cpu")
app = FastAPI()

class Req(BaseModel):
    inputs: str | list[str]

@app.post("/embed")
def embed(req: Req):  # what a first server does: encode each request on its own (FastAPI's thread pool)
    texts = [req.inputs] if isinstance(req.inputs, str) else req.inputs
    return model.encode(texts, normalize_embeddings=True).tolist()

@app.get("/health")
def health():
    return {"status": "ok"}

uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[2]), log_level="warning")
'''


def make_texts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        k = rng.randint(4, 16) if rng.random() < 0.8 else rng.randint(30, 250)
        out.append(" ".join(rng.choice(WORDS) for _ in range(k)).capitalize() + ".")
    return out


def cpu_line() -> str:
    flags, model = set(), platform.processor()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
            elif line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
    except OSError:
        pass
    isa = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile") if f in flags]
    return f"CPU: {model}; {os.cpu_count()} cores; flags: {' '.join(isa) or 'none of avx2/avx512/amx'}"


def rss(pid: int) -> str:
    fields = {}
    try:
        for line in open(f"/proc/{pid}/status"):
            key, _, value = line.partition(":")
            fields[key] = value.strip()
    except OSError:
        return "n/a"
    return f"RSS {fields.get('VmRSS', '?')} (peak {fields.get('VmHWM', '?')})"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(cmd: list[str], port: int, log: Path) -> subprocess.Popen:
    import urllib.request

    proc = subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited ({proc.returncode}); see {log}")
        try:
            if urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).status == 200:
                return proc
        except OSError:
            pass
        time.sleep(0.3)
    proc.kill()
    raise SystemExit(f"server not healthy after 180 s; see {log}")


async def load(port: int, texts: list[str], expected: dict, concurrency: int, requests: int, seconds: float,
               atol: float) -> dict:
    import aiohttp

    url = f"http://127.0.0.1:{port}/embed"
    latencies, errors, sent = [], [], 0
    stop_at = time.monotonic() + seconds
    rng = random.Random(concurrency)

    async def worker(session):
        nonlocal sent
        while sent < requests and time.monotonic() < stop_at:
            sent += 1
            text = rng.choice(texts)
            t0 = time.perf_counter()
            try:
                async with session.post(url, json={"inputs": text}) as resp:
                    body = await resp.json(content_type=None)
                    status = resp.status
            except (aiohttp.ClientError, asyncio.TimeoutError) as err:
                errors.append(f"{type(err).__name__}: {err}")
                continue
            latencies.append(time.perf_counter() - t0)
            if status != 200:
                errors.append(f"HTTP {status}: {str(body)[:100]}")
            elif not np.allclose(np.asarray(body[0], dtype=np.float32), expected[text], atol=atol):
                errors.append(f"wrong embedding for {text[:30]!r}")

    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=concurrency)) as session:
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
        elapsed = time.perf_counter() - t0
    lat = np.array(latencies) * 1000 if latencies else np.array([np.nan])
    return {"rps": len(latencies) / elapsed, "p50": float(np.percentile(lat, 50)), "p99": float(np.percentile(lat, 99)),
            "done": len(latencies), "errors": errors}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="model folder (default: the bundled all-MiniLM-L6-v2)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--requests", type=int, default=2000, help="requests per level at most (default 2000)")
    parser.add_argument("--seconds", type=float, default=60, help="seconds per level at most (default 60)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of each server (default 2)")
    parser.add_argument("--max-batch-tokens", type=int, default=16384)
    parser.add_argument("--distinct", type=int, default=500, help="distinct texts (default 500)")
    parser.add_argument("--atol", type=float, default=1e-4, help="max |difference| to the reference (default 1e-4)")
    parser.add_argument("--no-baseline", action="store_true", help="skip the FastAPI + sentence-transformers server")
    parser.add_argument("--soak", type=float, default=0, metavar="S", help="then S seconds at the top concurrency")
    args = parser.parse_args()

    import torch

    from bertkit.encoder import SentenceEncoder, bundled_model_dir

    model_dir = str(args.model or bundled_model_dir())
    torch.set_num_threads(args.threads)
    print(cpu_line())
    print(f"torch {torch.__version__}, threads {args.threads}; model {model_dir}; levels {args.concurrency}, "
          f"<= {args.requests} requests and <= {args.seconds:g} s each")
    texts = make_texts(args.distinct)
    encoder = SentenceEncoder.from_pretrained(model_dir, device="cpu")
    expected = dict(zip(texts, encoder.encode(texts)))
    # What the server adds at concurrency 1: SentenceEncoder.encode on one text, in process.
    direct = []
    for text in random.Random(1).choices(texts, k=min(args.requests, 300)):
        t0 = time.perf_counter()
        encoder.encode(text)
        direct.append(time.perf_counter() - t0)
    direct_p50 = float(np.percentile(np.array(direct) * 1000, 50))
    del encoder

    tmp = Path(tempfile.mkdtemp(prefix="serve_load-"))
    servers = [("bertkit serve", [sys.executable, "-m", "bertkit", "serve", "--model", model_dir, "--threads",
                                  str(args.threads), "--log-level", "warning", "--device", "cpu",
                                  "--max-concurrent-requests", "4096", "--max-batch-tokens", str(args.max_batch_tokens)])]
    if not args.no_baseline:
        (tmp / "baseline.py").write_text(BASELINE)
        servers.append(("FastAPI + sentence-transformers", [sys.executable, str(tmp / "baseline.py"), model_dir]))
    results = {}
    for name, cmd in servers:
        port = free_port()
        cmd = cmd + (["--port", str(port)] if name.startswith("bertkit") else [str(port), str(args.threads)])
        proc = start(cmd, port, tmp / f"{name.split()[0]}.log")
        try:
            print(f"\n{name} (pid {proc.pid}) at start: {rss(proc.pid)}")
            asyncio.run(load(port, texts, expected, 4, 40, 30, args.atol))  # warm-up
            for c in args.concurrency:
                r = asyncio.run(load(port, texts, expected, c, args.requests, args.seconds, args.atol))
                results[name, c] = r
                extra = f"; direct encode p50 {direct_p50:.1f} ms" if c == 1 else ""
                print(f"  concurrency {c:3d}: {r['rps']:7.1f} req/s  p50 {r['p50']:7.1f} ms  p99 {r['p99']:7.1f} ms  "
                      f"{r['done']} answered, {len(r['errors'])} errors{extra}")
                for e in r["errors"][:3]:
                    print(f"    {e}")
            if args.soak and name.startswith("bertkit"):
                c, end = max(args.concurrency), time.monotonic() + args.soak
                while time.monotonic() < end:
                    r = asyncio.run(load(port, texts, expected, c, 10**9, min(30, end - time.monotonic()), args.atol))
                    print(f"  soak: {r['rps']:.1f} req/s, {len(r['errors'])} errors, {rss(proc.pid)}")
            print(f"{name} at end: {rss(proc.pid)}")
        finally:
            proc.terminate()
            proc.wait(60)
    if not args.no_baseline:
        print()
        for c in args.concurrency:
            ours, base = results["bertkit serve", c], results["FastAPI + sentence-transformers", c]
            print(f"concurrency {c:3d}: throughput {ours['rps'] / base['rps']:.2f}x the baseline; bertkit p99 "
                  f"{ours['p99']:.1f} ms vs baseline p50 {base['p50']:.1f} ms")
    print(f"bertkit p50 at concurrency 1 vs direct encode: "
          f"{results.get(('bertkit serve', 1), {}).get('p50', float('nan')) / direct_p50:.2f}x")
    lost = sum(len(r["errors"]) for r in results.values())
    print(f"errors (lost or wrong) over all runs: {lost}")
    sys.exit(1 if lost else 0)


if __name__ == "__main__":
    main()
