"""Fixed-length forward on CPU: bertkit.BertModel vs transformers.BertModel (SDPA), bert-base shaped, fp32.

Both models hold the same random weights: transformers builds a bert-base-shaped ``BertModel`` (hidden
768, 12 layers, 12 heads, FFN 3072, vocab 30522, ``attn_implementation="sdpa"``) and saves it, bertkit
loads that folder with ``bertkit.BertModel.from_pretrained``. Inputs are random token ids of one fixed
length (128) with no padding (attention_mask all ones), at batch sizes 1 and 32. In one process, under
``torch.inference_mode()`` and with ``torch.set_num_threads(--threads)``, each is warmed up, then the
libraries are timed in alternation (the order rotates every round), so load changes on the machine hit
all alike. bertkit is also timed with ``unpad=True`` (padding-free execution), a separate row: with no
padding it computes the same positions, so this row shows that path's overhead.

Reported per batch size: median and best ms per forward, tokens/s, transformers time / bertkit time
(>1 means bertkit is faster), the max abs difference of last_hidden_state, and the achieved model
GFLOP/s next to this machine's fp32 GEMM rate (a 2048x768 @ 768x3072 ``torch.mm``, best of 10 calls,
measured at the start and again at the end). Model FLOPs = per token 2*(4*h*h + 2*h*i)*layers (the six
Linears of each layer) plus 4*L*L*h*layers per sequence (QK^T and attention x V); embeddings, LayerNorm,
softmax, GELU and the pooler are left out.

Timed rounds per batch size: ``--runs`` (one value, or one per batch size); by default they come from
``--budget`` seconds split evenly across the batch sizes and the time of a warm-up round, clamped to
3..7. On an idle 2-core CPU the defaults take about 2 to 4 minutes.

    python benchmarks/fixed_length.py --threads 2
    python benchmarks/fixed_length.py --layers 2 --runs 1        # a quick look
"""

from __future__ import annotations

import argparse
import datetime
import inspect
import os
import platform
import statistics
import tempfile
import time

import torch


def _load() -> str:
    return ", ".join(f"{x:.2f}" for x in os.getloadavg())


def gemm_rate(reps: int = 10) -> tuple[float, float]:
    """fp32 GFLOP/s of a 2048x768 @ 768x3072 torch.mm: (median, best) over `reps` timed calls."""
    a, b = torch.randn(2048, 768), torch.randn(768, 3072)
    flops = 2 * 2048 * 768 * 3072
    with torch.inference_mode():
        for _ in range(2):
            torch.mm(a, b)
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            torch.mm(a, b)
            times.append(time.perf_counter() - start)
    return flops / statistics.median(times) / 1e9, flops / min(times) / 1e9


def model_flops(batch: int, seq: int, hidden: int, intermediate: int, layers: int) -> int:
    per_token = 2 * (4 * hidden * hidden + 2 * hidden * intermediate) * layers
    per_sequence = 4 * seq * seq * hidden * layers
    return batch * seq * per_token + batch * per_sequence


def make_runners(ours, hf, ids: torch.Tensor, mask: torch.Tensor) -> dict:
    """One forward per library on the same inputs, each returning last_hidden_state."""
    return {
        "bertkit": lambda: ours(input_ids=ids, attention_mask=mask).last_hidden_state,
        "bertkit unpad=True": lambda: ours(input_ids=ids, attention_mask=mask, unpad=True).last_hidden_state,
        "transformers": lambda: hf(input_ids=ids, attention_mask=mask).last_hidden_state,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n")[-1].strip("\n"),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32], metavar="B",
                        help="batch sizes (default: 1 32)")
    parser.add_argument("--seq", type=int, default=128, help="tokens per sequence, no padding (default 128)")
    parser.add_argument("--layers", type=int, default=12, help="encoder layers (default 12; fewer for a smoke test)")
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--intermediate", type=int, default=3072)
    parser.add_argument("--vocab", type=int, default=30522)
    parser.add_argument("--warmup", type=int, default=2, help="warm-up calls per library and batch size (default 2; "
                        "the first also gives the outputs that are compared)")
    parser.add_argument("--runs", type=int, nargs="+", metavar="N", help="timed rounds per batch size: one value "
                        "for all, or one per --batches entry (default: from --budget)")
    parser.add_argument("--budget", type=float, default=150.0, help="seconds of timed rounds in all, split evenly "
                        "across the batch sizes, when --runs is not given (default 150)")
    parser.add_argument("--min-runs", type=int, default=3, help="fewest rounds --budget may pick (default 3)")
    parser.add_argument("--max-runs", type=int, default=7, help="most rounds --budget may pick (default 7)")
    parser.add_argument("--no-unpad", action="store_true", help="skip the bertkit unpad=True row")
    args = parser.parse_args()
    if args.runs is not None and len(args.runs) not in (1, len(args.batches)):
        parser.error(f"--runs takes one value or one per batch size ({len(args.batches)})")
    if args.warmup < 1:
        parser.error("--warmup must be at least 1")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    import transformers

    import bertkit

    print(f"date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}")
    print(f"machine: {platform.platform()}, {platform.processor() or platform.machine()}, os.cpu_count() "
          f"{os.cpu_count()}, usable CPUs {len(os.sched_getaffinity(0))}")
    print(f"python {platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}, "
          f"bertkit {bertkit.__version__}; torch.get_num_threads() {torch.get_num_threads()}")
    print(f"load average (1, 5, 15 min) before: {_load()}")
    gemm_start = gemm_rate()
    print(f"fp32 GEMM 2048x768 @ 768x3072 (torch.mm): {gemm_start[0]:.1f} GFLOP/s median, {gemm_start[1]:.1f} best")

    config = transformers.BertConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.layers,
        num_attention_heads=args.heads, intermediate_size=args.intermediate, max_position_embeddings=512,
        attn_implementation="sdpa")
    transformers.utils.logging.disable_progress_bar()  # no "Writing model shards" bar in the report
    hf = transformers.BertModel(config).eval()
    with tempfile.TemporaryDirectory(prefix="bertkit-fixed-length-") as folder:
        hf.save_pretrained(folder)
        ours = bertkit.BertModel.from_pretrained(folder).eval()
    print(f"model: hidden {args.hidden}, {args.layers} layers, {args.heads} heads, FFN {args.intermediate}, vocab "
          f"{args.vocab}, random weights, fp32; transformers attention: {hf.config._attn_implementation}, "
          f"bertkit attention: {ours.config.attn_implementation}")
    unpad = not args.no_unpad and "unpad" in inspect.signature(ours.forward).parameters
    if not args.no_unpad and not unpad:
        print("bertkit.BertModel.forward takes no `unpad` argument: no unpad=True row")

    names = ["bertkit", *(["bertkit unpad=True"] if unpad else []), "transformers"]
    per_batch_budget = args.budget / len(args.batches)
    summary, rates = [], []
    for position, batch in enumerate(args.batches):
        generator = torch.Generator().manual_seed(batch)
        ids = torch.randint(0, args.vocab, (batch, args.seq), generator=generator)
        mask = torch.ones_like(ids)
        every = make_runners(ours, hf, ids, mask)
        runners = {name: every[name] for name in names}
        with torch.inference_mode():
            outputs = {}
            round_time = 0.0
            for step in range(args.warmup):
                start = time.perf_counter()
                for name, run in runners.items():
                    out = run()
                    if step == 0:
                        outputs[name] = out
                round_time = time.perf_counter() - start  # the last warm-up round estimates a timed one
            diffs = {name: (outputs[name] - outputs["transformers"]).abs().max().item()
                     for name in names if name != "transformers"}
            del outputs, out
            if args.runs is not None:
                runs = args.runs[0] if len(args.runs) == 1 else args.runs[position]
            else:
                runs = int(per_batch_budget // max(round_time, 1e-9))
                runs = max(args.min_runs, min(args.max_runs, runs))
            times: dict[str, list[float]] = {name: [] for name in names}
            for r in range(runs):
                order = names[r % len(names):] + names[:r % len(names)]
                for name in order:
                    start = time.perf_counter()
                    runners[name]()
                    times[name].append(time.perf_counter() - start)

        tokens = batch * args.seq
        flops = model_flops(batch, args.seq, args.hidden, args.intermediate, args.layers)
        print(f"\nbatch {batch} x {args.seq} tokens ({tokens} tokens, {flops / 1e9:.1f} GFLOP per forward), "
              f"{runs} timed round(s) after {args.warmup} warm-up; load average now {_load()}")
        header = (f"  {'library':<20}{'median ms':>11}{'best ms':>10}{'tokens/s':>10}{'GFLOP/s':>9}{'of GEMM':>9}"
                  f"{'max ms':>9}  max |diff| vs transformers")
        print(header)
        medians = {}
        for name in names:
            median, best = statistics.median(times[name]), min(times[name])
            medians[name] = median
            rate = flops / median / 1e9
            diff = f"{diffs[name]:.2e}" if name in diffs else "-"
            print(f"  {name:<20}{median * 1e3:>11.1f}{best * 1e3:>10.1f}{tokens / median:>10.0f}{rate:>9.1f}"
                  f"{rate / gemm_start[1]:>9.0%}{max(times[name]) * 1e3:>9.1f}  {diff}")
        for name in names[:-1]:
            ratio = medians["transformers"] / medians[name]
            best_ratio = min(times["transformers"]) / min(times[name])
            # Ratio within each round, then the median: the machine's speed drifts between rounds.
            paired = statistics.median(a / b for a, b in zip(times["transformers"], times[name], strict=True))
            print(f"  transformers / {name}: {ratio:.3f}x (median), {best_ratio:.3f}x (best), {paired:.3f}x "
                  "(median of per-round ratios)  (>1: bertkit faster)")
            summary.append((batch, name, ratio))
        for name in names:
            rates.append((batch, name, flops / medians[name] / 1e9))

    gemm_end = gemm_rate()
    peak = max(gemm_start[1], gemm_end[1])
    print(f"\nfp32 GEMM at the end: {gemm_end[0]:.1f} GFLOP/s median, {gemm_end[1]:.1f} best (start: "
          f"{gemm_start[0]:.1f} median, {gemm_start[1]:.1f} best); 'of GEMM' above is against the start best")
    print(f"model GFLOP/s (medians) as a fraction of the better best GEMM rate, {peak:.1f} GFLOP/s: "
          + "; ".join(f"batch {b} {name}: {rate:.1f} = {rate / peak:.0%}" for b, name, rate in rates))
    print(f"load average (1, 5, 15 min) after: {_load()}")
    print("summary (transformers / bertkit, medians): "
          + "; ".join(f"batch {b} {name}: {ratio:.3f}x" for b, name, ratio in summary))


if __name__ == "__main__":
    main()
