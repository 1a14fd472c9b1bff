"""GPU validation and speed: bertkit vs transformers on one CUDA device, in one process.

Checks (printed as a table, also written as JSON to --json):
  * parity fp32 and bf16 against transformers' BertModel (SDPA) on the same random BERT-base weights;
  * padding-free (varlen flash attention) vs padded outputs at real tokens, bf16;
  * a training step in bf16 autocast gives finite gradients that match the padded path;
  * throughput on mixed-length batches: transformers padded, bertkit padded, bertkit unpadded (also
    with ``fused_qkv``), and
    bertkit padded under torch.compile, with ratios against transformers and the fraction of the measured
    bf16 GEMM rate that the model FLOPs reach.

Usage (on a CUDA machine, from the repository root):
    PYTHONPATH=. python benchmarks/gpu_validate.py --json out.json
"""

from __future__ import annotations

import argparse
import json
import time

import torch

import bertkit


def timed(fn, warmup=3, iters=10):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    return sorted(times)[len(times) // 2]


def gemm_rate(dtype=torch.bfloat16, n=8192):
    a, b = torch.randn(n, n, device="cuda", dtype=dtype), torch.randn(n, n, device="cuda", dtype=dtype)
    t = timed(lambda: a @ b)
    return 2 * n ** 3 / t


def model_flops(cfg, tokens_per_seq: list[int]) -> float:
    # Forward FLOPs of the real tokens only: 2 * params-per-token matmuls + attention scores and context.
    h, i, n = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    per_token = 2 * (4 * h * h + 2 * h * i) * n
    attn = sum(4 * length * length * h * n for length in tokens_per_seq)
    return per_token * sum(tokens_per_seq) + attn


def rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--max-len", type=int, default=512)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    import transformers

    torch.manual_seed(0)
    dev = "cuda"
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
               "transformers": transformers.__version__}
    hf_cfg = transformers.BertConfig(attn_implementation="sdpa")
    ref = transformers.BertModel(hf_cfg).eval().to(dev)
    path = "/tmp/bert_base_random"
    ref.save_pretrained(path)
    ours = bertkit.BertModel.from_pretrained(path, device=dev)

    # Mixed lengths: uniform in [16, max_len], right-padded to the longest.
    lengths = torch.randint(16, args.max_len + 1, (args.batch,)).tolist()
    ids = torch.randint(1000, 30000, (args.batch, max(lengths)), device=dev)
    mask = torch.zeros_like(ids)
    for r, n in enumerate(lengths):
        mask[r, :n] = 1
    keep = mask.bool()

    with torch.no_grad():
        a32 = ours(ids, mask).last_hidden_state
        b32 = ref(ids, mask).last_hidden_state
        results["parity_fp32_max_abs"] = float((a32 - b32)[keep].abs().max())
        ours_bf, ref_bf = ours.to(torch.bfloat16), ref.to(torch.bfloat16)
        a16 = ours_bf(ids, mask).last_hidden_state
        b16 = ref_bf(ids, mask).last_hidden_state
        u16 = ours_bf(ids, mask, unpad=True).last_hidden_state
        results["bf16_rel_err_vs_fp32_bertkit"] = rel(a16[keep], a32[keep])
        results["bf16_rel_err_vs_fp32_transformers"] = rel(b16[keep], b32[keep])
        results["bf16_unpadded_vs_padded_rel"] = rel(u16[keep], a16[keep])
        results["bf16_unpadded_nan"] = bool(torch.isnan(u16).any())

    # Training step, bf16 autocast, padded vs unpadded gradients.
    train = bertkit.BertForSequenceClassification.from_pretrained(path, device=dev, hidden_dropout_prob=0.0,
                                                                  attention_probs_dropout_prob=0.0).train()
    labels = torch.randint(0, 2, (args.batch,), device=dev)
    grads = {}
    for flag in (False, True):
        train.zero_grad()
        train.config.unpad_inputs = flag
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = train(ids[:16], mask[:16], labels=labels[:16]).loss
        loss.backward()
        grads[flag] = torch.cat([p.grad.flatten().float() for p in train.parameters() if p.grad is not None])
    results["train_bf16_grad_finite"] = bool(torch.isfinite(grads[True]).all())
    results["train_bf16_grad_rel_unpadded_vs_padded"] = rel(grads[True], grads[False])
    del train

    # Throughput.
    peak = gemm_rate()
    results["bf16_gemm_tflops"] = peak / 1e12
    flops = model_flops(ours.config, lengths)
    speeds = {}
    with torch.inference_mode():
        speeds["transformers_padded"] = timed(lambda: ref_bf(ids, mask))
        speeds["bertkit_padded"] = timed(lambda: ours_bf(ids, mask))
        speeds["bertkit_unpadded"] = timed(lambda: ours_bf(ids, mask, unpad=True))
        ours_bf.config.fused_qkv = True
        speeds["bertkit_unpadded_fused_qkv"] = timed(lambda: ours_bf(ids, mask, unpad=True))
        results["fused_qkv_unpadded_max_abs_vs_unfused"] = float((ours_bf(ids, mask, unpad=True).last_hidden_state
                                                                  - u16)[keep].abs().max())
        ours_bf.config.fused_qkv = False
        try:
            compiled = torch.compile(ours_bf)
            speeds["bertkit_padded_compiled"] = timed(lambda: compiled(ids, mask), warmup=3)
            results["compile_max_abs_vs_eager"] = float((compiled(ids, mask).last_hidden_state
                                                         - a16)[keep].abs().max())
        except Exception as exc:  # report, do not hide
            results["compile_error"] = repr(exc)[:300]
    for name, t in speeds.items():
        results[f"time_s_{name}"] = t
        results[f"seqs_per_s_{name}"] = args.batch / t
        results[f"ratio_vs_transformers_{name}"] = speeds["transformers_padded"] / t
        results[f"gemm_fraction_{name}"] = flops / t / peak
    results["real_token_fraction"] = sum(lengths) / ids.numel()
    print(json.dumps(results, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
