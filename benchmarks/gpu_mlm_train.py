"""MLM training step on a GPU: bertkit vs transformers ``BertForMaskedLM``, one process, same weights and data.

A bert-base-shaped model with random weights (built and saved by transformers, loaded by bertkit),
fixed length 128 (no padding), 15% of positions labelled, bf16 autocast with fp32 master weights,
``torch.optim.AdamW(fused=True)`` for every variant. One step = zero_grad, forward with labels,
backward, optimizer step. The variants take turns; the median step time counts.

Variants: transformers (SDPA); bertkit as transformers computes it (dense logits); bertkit with
``sparse_prediction`` (vocabulary logits only where labels != -100); that plus ``fused_qkv``; that plus
``torch.compile``. Printed: ms per step, tokens/s, ratio against transformers, and the model FLOPs
utilisation against the bf16 GEMM rate measured at start (training FLOPs = 3 x the forward FLOPs of
the encoder on every token and of the MLM head at the labelled positions, the same numerator for all).

    PYTHONPATH=. python benchmarks/gpu_mlm_train.py [--batch 32] [--steps 20] [--json out.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import tempfile
import time

import torch

import bertkit


def gemm_rate(n: int = 8192) -> float:
    a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(20):
        a @ b
    torch.cuda.synchronize()
    return 20 * 2 * n ** 3 / (time.perf_counter() - start)


def train_flops(cfg, batch: int, length: int, predicted: int) -> float:
    h, inter, layers, vocab = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, cfg.vocab_size
    encoder = batch * length * 2 * (4 * h * h + 2 * h * inter) * layers + batch * 4 * length * length * h * layers
    head = predicted * 2 * (h * h + h * vocab)
    return 3 * (encoder + head)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--length", type=int, default=128)
    ap.add_argument("--steps", type=int, default=20, help="timed steps per variant (after 3 warm-up steps)")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    import transformers

    torch.manual_seed(0)
    dev = "cuda"
    torch.backends.cuda.matmul.allow_tf32 = False
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
               "transformers": transformers.__version__, "batch": args.batch, "length": args.length}
    hf_cfg = transformers.BertConfig(attn_implementation="sdpa")
    ref = transformers.BertForMaskedLM(hf_cfg)
    path = tempfile.mkdtemp(prefix="bertkit-mlm-")
    ref.save_pretrained(path)
    ref = ref.to(dev).train()

    ids = torch.randint(1000, 30000, (args.batch, args.length), device=dev)
    mask = torch.ones_like(ids)
    labels = torch.full_like(ids, -100)
    picked = torch.rand(ids.shape, device=dev) < 0.15
    labels[picked] = ids[picked]
    predicted = int(picked.sum())

    def make(**options):
        model = bertkit.BertForMaskedLM.from_pretrained(path, device=dev, **options).train()
        return model

    variants = {"transformers": ref,
                "bertkit (dense logits)": make(),
                "bertkit sparse_prediction": make(sparse_prediction=True),
                "bertkit sparse + fused_qkv": make(sparse_prediction=True, fused_qkv=True)}
    if not args.no_compile:
        variants["bertkit sparse + fused_qkv + compile"] = torch.compile(make(sparse_prediction=True, fused_qkv=True))

    # Same starting loss (dropout off, fp32) as a sanity check of the comparison.
    with torch.no_grad():
        check = {name: copy.deepcopy(m).eval() for name, m in list(variants.items())[:3]}
        losses = {name: float(m(ids, mask, labels=labels).loss) for name, m in check.items()}
        del check
    results["fp32_eval_loss"] = losses

    optims = {name: torch.optim.AdamW(m.parameters(), lr=1e-4, fused=True) for name, m in variants.items()}

    def step(name):
        model, opt = variants[name], optims[name]
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(ids, mask, labels=labels).loss
        loss.backward()
        opt.step()

    for name in variants:
        for _ in range(3):
            step(name)
    torch.cuda.synchronize()
    times = {name: [] for name in variants}
    for _ in range(args.steps):  # interleaved, so clock changes hit every variant alike
        for name in variants:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step(name)
            end.record()
            torch.cuda.synchronize()
            times[name].append(start.elapsed_time(end) / 1000)
    peak = gemm_rate()
    flops = train_flops(variants["bertkit (dense logits)"].config, args.batch, args.length, predicted)
    results["bf16_gemm_tflops"] = peak / 1e12
    base = statistics.median(times["transformers"])
    print(f"{results['device']}, torch {torch.__version__}, transformers {transformers.__version__}; batch "
          f"{args.batch} x {args.length}, {predicted} labelled tokens; bf16 GEMM rate {peak / 1e12:.0f} TFLOP/s")
    print(f"fp32 starting loss: {losses}")
    print(f"{'variant':<38} {'ms/step':>8} {'tokens/s':>10} {'vs transformers':>16} {'MFU':>6}")
    for name, ts in times.items():
        t = statistics.median(ts)
        results[name] = {"ms_per_step": t * 1e3, "tokens_per_s": args.batch * args.length / t,
                         "ratio_vs_transformers": base / t, "mfu": flops / t / peak}
        r = results[name]
        print(f"{name:<38} {r['ms_per_step']:8.2f} {r['tokens_per_s']:10.0f} {r['ratio_vs_transformers']:15.2f}x "
              f"{r['mfu']:6.1%}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
