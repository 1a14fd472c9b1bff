"""Embedding throughput: bertkit vs sentence-transformers vs a naive transformers loop, one process.

All three embed the same synthetic texts (5 to 250 words, fixed seed) with the bundled
all-MiniLM-L6-v2 (truncated to its max_seq_length, 256 tokens), with the same thread count:

* bertkit: ``SentenceEncoder.encode`` (sorts by token count, pads each batch to its longest text).
* sentence-transformers: ``SentenceTransformer(model_dir).encode`` (sorts by character count).
* transformers: ``AutoTokenizer`` + ``AutoModel``, batches taken in input order and padded to the
  longest text of each batch, then mean pooling and L2 normalization (what a first script does).

Each is warmed up first, then the libraries take turns, once per round (the best round counts). The
script also reports how many token positions each batching scheme feeds the model (real + padding)
and checks that they agree.

Efficiency against this machine's limit: the fp32 GEMM rate is measured at the model's own matrix
shapes (tokens-per-batch x hidden x hidden, x intermediate, and back) before and after the timed runs,
and each library's achieved model FLOP/s (useful FLOPs only: real tokens, attention at each text's own
length) is printed as a fraction of it.

``--int8`` adds ``SentenceEncoder.from_pretrained(quantize="int8")`` (onnxruntime int8 GEMMs), with
its cosine similarity to the fp32 embeddings.

    python benchmarks/embed_throughput.py --n 2000 --threads 2 --repeats 3 [--int8]
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import time

import numpy as np
import torch

WORDS = """the of and to in is was for on that with as by at from his her they this are be or an which
one have had not but what all were when we there can more if no out so said up its about into than them
time could only other new some these two may first then do any like my now over such our man me even
most made after also did many before must through back years where much your way well down should
because each just those people how too little state good very make world still own see men work long
get here between both life being under never day same another know while last might us great old year
off come since against go came right used take three river mountain garden plant water light soil leaf
train city travel flight ticket station road bridge market price bank money interest loan fund stock
music piano guitar song concert science planet star ocean forest winter summer morning evening coffee
bread cheese kitchen recipe oven program code function compiler memory server network database query
football tennis match team goal player coach season doctor health sleep heart brain memory language
history empire war peace village castle museum painting camera photo phone battery screen window door
""".split()


def make_texts(n: int, seed: int = 0) -> list[str]:
    """n texts of 5 to 250 random words, with some punctuation and capitals, reproducible by seed."""
    rng = random.Random(seed)
    texts = []
    for _ in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(5, 250))]
        words[0] = words[0].capitalize()
        texts.append(" ".join(w + ("," if rng.random() < 0.08 else "") for w in words) + ".")
    return texts


def padded_positions(lengths: np.ndarray, order: np.ndarray, batch_size: int) -> int:
    """Token positions the model computes when texts are batched in `order` and padded per batch."""
    return sum(int(lengths[order[i:i + batch_size]].max()) * len(order[i:i + batch_size])
               for i in range(0, len(order), batch_size))


def model_flops(config, lengths: np.ndarray) -> float:
    """Useful forward FLOPs: the Linear layers on real tokens + attention at each text's own length."""
    h, inter, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    per_token = 2 * (4 * h * h + 2 * h * inter) * layers
    attention = 4 * h * layers * float((lengths.astype(np.float64) ** 2).sum())  # scores + context
    return per_token * float(lengths.sum()) + attention


def gemm_rate(config, rows: int, seconds: float = 1.0) -> float:
    """fp32 FLOP/s of this machine's torch GEMMs at the model's shapes, ``rows`` tokens per batch.

    The four hidden x hidden projections, hidden -> intermediate and intermediate -> hidden, in the
    proportion the model runs them (with bias, as nn.Linear does); the best of several rounds.
    """
    h, inter = config.hidden_size, config.intermediate_size
    x, y = torch.randn(rows, h), torch.randn(rows, inter)
    w_hh, w_hi, w_ih = torch.randn(h, h), torch.randn(inter, h), torch.randn(h, inter)
    b_h, b_i = torch.randn(h), torch.randn(inter)

    def step():
        for _ in range(4):
            torch.nn.functional.linear(x, w_hh, b_h)
        torch.nn.functional.linear(x, w_hi, b_i)
        torch.nn.functional.linear(y, w_ih, b_h)

    flops = 2 * rows * (4 * h * h + 2 * h * inter)
    step()
    best = float("inf")
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        start = time.perf_counter()
        step()
        best = min(best, time.perf_counter() - start)
    return flops / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=2000, help="number of texts (default 2000)")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    parser.add_argument("--batch-size", type=int, default=32, help="texts per forward pass (default 32)")
    parser.add_argument("--max-batch-tokens", type=int, default=None,
                        help="bertkit's token budget per batch (default: none, batches of --batch-size)")
    parser.add_argument("--repeats", type=int, default=1, help="timed rounds; the best round of each library counts")
    parser.add_argument("--int8", action="store_true", help="also time SentenceEncoder with quantize='int8'")
    parser.add_argument("--skip", nargs="*", default=[], choices=["sentence-transformers", "transformers"],
                        help="references to leave out (the naive transformers loop is the slowest)")
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="also print torch.profiler's top operators for bertkit encoding N of the texts")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from bertkit import SentenceEncoder
    from bertkit.encoder import bundled_model_dir

    model_dir = str(bundled_model_dir())
    texts = make_texts(args.n, args.seed)
    ours = SentenceEncoder.from_pretrained(model_dir, device="cpu", max_batch_tokens=args.max_batch_tokens)
    config = ours.model.config
    max_len = ours.max_seq_length
    runners = {"bertkit": lambda t: ours.encode(t, batch_size=args.batch_size, show_progress_bar=False)}
    if args.int8:
        quantized = SentenceEncoder.from_pretrained(model_dir, device="cpu", quantize="int8",
                                                    calibration_texts=make_texts(256, args.seed + 1))
        runners["bertkit int8"] = lambda t: quantized.encode(t, batch_size=args.batch_size, show_progress_bar=False)
    if "sentence-transformers" not in args.skip:
        from sentence_transformers import SentenceTransformer

        st = SentenceTransformer(model_dir, device="cpu")
        runners["sentence-transformers"] = lambda t: st.encode(t, batch_size=args.batch_size,
                                                               show_progress_bar=False)
    if "transformers" not in args.skip:
        from transformers import AutoModel, AutoTokenizer

        hf_tok = AutoTokenizer.from_pretrained(model_dir)
        hf_model = AutoModel.from_pretrained(model_dir).eval()

        @torch.inference_mode()
        def hf_encode(batch_texts: list[str]) -> np.ndarray:
            rows = []
            for i in range(0, len(batch_texts), args.batch_size):
                enc = hf_tok(batch_texts[i:i + args.batch_size], padding=True, truncation=True,
                             max_length=max_len, return_tensors="pt")
                hidden = hf_model(**enc).last_hidden_state
                mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
                rows.append(torch.nn.functional.normalize(pooled, p=2, dim=1))
            return torch.cat(rows).numpy()

        runners["transformers (naive)"] = hf_encode

    lengths = np.array([len(ids) for ids in ours.tokenizer(texts, padding=False, truncation=True, max_length=max_len,
                                                           return_tensors=None)["input_ids"]])
    char_len = np.array([len(t) for t in texts])
    by_tokens = padded_positions(lengths, np.argsort(-lengths, kind="stable"), args.batch_size)
    positions = {"bertkit": int(lengths.sum()),  # padding-free: only real tokens go through the Linear layers
                 "bertkit int8": by_tokens,  # the onnxruntime graph runs padded batches
                 "sentence-transformers": padded_positions(lengths, np.argsort(-char_len), args.batch_size),
                 "transformers (naive)": padded_positions(lengths, np.arange(len(texts)), args.batch_size)}
    flops = model_flops(config, lengths)
    rows_per_batch = int(round(lengths.sum() / -(-args.n // args.batch_size)))

    print(f"{args.n} texts, {lengths.sum()} real tokens (mean {lengths.mean():.0f}, max_seq_length {max_len}), "
          f"batch size {args.batch_size}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs")
    print(f"useful model FLOPs: {flops / 1e12:.3f} TFLOP")
    for run in runners.values():
        run(texts[:2 * args.batch_size])  # warm-up: allocator, kernels, lazy init
    # The GEMM rate is measured before every timed run (and once after): on a shared or throttled machine
    # it drifts by up to 1.5x over minutes, and the fastest spell is the machine's limit.
    rates = [gemm_rate(config, rows_per_batch)]
    print(f"fp32 GEMM rate at the model's shapes ({rows_per_batch} tokens x {config.hidden_size} x "
          f"{config.hidden_size}/{config.intermediate_size}): {rates[0] / 1e9:.1f} GFLOP/s at the start")
    print(f"load average before: {os.getloadavg()[0]:.1f} (other processes compete for the cores when > 0)")
    results, best, cpu = {}, dict.fromkeys(runners, float("inf")), {}
    for _ in range(args.repeats):  # rounds, so a slow spell of the machine hits every library alike
        for name, run in runners.items():
            rates.append(gemm_rate(config, rows_per_batch, seconds=0.5))
            start, start_cpu = time.perf_counter(), time.process_time()
            results[name] = run(texts)
            seconds = time.perf_counter() - start
            if seconds < best[name]:
                # CPU seconds of this process: less sensitive than wall time to other processes
                # taking the cores, so it is reported too.
                best[name], cpu[name] = seconds, time.process_time() - start_cpu
    rates.append(gemm_rate(config, rows_per_batch))
    rate = max(rates)
    print(f"fp32 GEMM rate, {len(rates)} measurements around the runs: {min(rates) / 1e9:.1f} to "
          f"{rate / 1e9:.1f} GFLOP/s; the highest is the limit below")
    print(f"load average after: {os.getloadavg()[0]:.1f}")
    speeds = {name: args.n / seconds for name, seconds in best.items()}
    print(f"{'':<22} {'texts/s':>8} {'wall s':>7} {'CPU s':>7} {'GFLOP/s':>8} {'of GEMM':>8}  token positions")
    for name in runners:
        achieved = flops / best[name]
        print(f"{name:<22} {speeds[name]:8.1f} {best[name]:7.1f} {cpu[name]:7.1f} {achieved / 1e9:8.1f} "
              f"{achieved / rate:8.1%}  {positions[name]} ({positions[name] / lengths.sum():.2f}x real)")
    for other in runners:
        if other != "bertkit":
            print(f"ratio bertkit / {other}: {speeds['bertkit'] / speeds[other]:.2f}x")
    if "bertkit int8" in runners:
        for other in ("sentence-transformers", "transformers (naive)"):
            if other in runners:
                print(f"ratio bertkit int8 / {other}: {speeds['bertkit int8'] / speeds[other]:.2f}x")
        cosine = (results["bertkit int8"] * results["bertkit"]).sum(1) / (
            np.linalg.norm(results["bertkit int8"], axis=1) * np.linalg.norm(results["bertkit"], axis=1))
        print(f"cosine bertkit int8 vs fp32: min {cosine.min():.4f}, mean {cosine.mean():.4f}")
    for other in ("sentence-transformers", "transformers (naive)"):
        if other in runners:
            diff = np.abs(results["bertkit"] - results[other]).max()
            print(f"max abs diff bertkit vs {other}: {diff:.2e}")
    if args.profile:
        with torch.profiler.profile() as prof:
            runners["bertkit"](texts[:args.profile])
        print(f"\nwhere bertkit's time goes ({args.profile} texts):")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


if __name__ == "__main__":
    main()
