"""Megatron-BERT forward: bertkit (SDPA) vs transformers' MegatronBertModel (eager), one process.

Both models hold the same random weights: transformers builds and saves a MegatronBertModel, bertkit
loads that folder (``norm_placement="pre"`` comes from its config.json). Each runs the same batch of
token ids under ``torch.inference_mode`` with the same thread count; after warm-up the two are timed
in alternation (so load changes on the machine hit both alike) and the median of the runs counts.
The script also checks that the two last hidden states agree.

    python benchmarks/megatron_forward.py --threads 2
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--runs", type=int, default=15, help="timed runs per library; the median counts")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    import transformers

    import bertkit

    config = transformers.MegatronBertConfig(
        vocab_size=30592, hidden_size=args.hidden, num_hidden_layers=args.layers, num_attention_heads=args.heads,
        intermediate_size=4 * args.hidden, max_position_embeddings=512, layer_norm_eps=1e-5)
    hf = transformers.MegatronBertModel(config).eval()  # transformers implements Megatron-BERT with eager attention only
    with tempfile.TemporaryDirectory() as folder:
        hf.save_pretrained(folder)
        ours = bertkit.BertModel.from_pretrained(folder).eval()  # SDPA by default
    ids = torch.randint(0, config.vocab_size, (args.batch, args.seq))
    mask = torch.ones_like(ids)

    runners = {"bertkit (sdpa)": lambda: ours(input_ids=ids, attention_mask=mask).last_hidden_state,
               "transformers MegatronBertModel (eager)": lambda: hf(input_ids=ids, attention_mask=mask).last_hidden_state}
    with torch.inference_mode():
        outputs = {name: run() for name, run in runners.items()}
        diff = (outputs["bertkit (sdpa)"] - outputs["transformers MegatronBertModel (eager)"]).abs().max().item()
        for _ in range(args.warmup):
            for run in runners.values():
                run()
        times: dict[str, list[float]] = {name: [] for name in runners}
        for _ in range(args.runs):
            for name, run in runners.items():
                start = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - start)

    tokens = args.batch * args.seq
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {platform.processor() or platform.machine()}, "
          f"{args.threads} thread(s)")
    print(f"config: hidden {args.hidden}, {args.layers} layers, {args.heads} heads, ffn {4 * args.hidden}; "
          f"batch {args.batch} x {args.seq} tokens; median of {args.runs} runs after {args.warmup} warm-up")
    medians = {name: statistics.median(ts) for name, ts in times.items()}
    for name, median in medians.items():
        spread = f"min {min(times[name]) * 1e3:.1f} / max {max(times[name]) * 1e3:.1f} ms"
        print(f"  {name:<40} {median * 1e3:8.1f} ms  ({tokens / median:8.0f} tokens/s; {spread})")
    ours_t, ref_t = medians.values()
    print(f"  speed-up of bertkit: {ref_t / ours_t:.2f}x; max |difference| of last_hidden_state: {diff:.2e}")


if __name__ == "__main__":
    main()
