"""Where CPU time goes in a MiniLM-sized layer: the kernels bertkit could use, side by side, as rates.

At the shapes of the bundled all-MiniLM-L6-v2 (hidden 384, FFN 1536, 12 heads of 32) and a batch of
--tokens packed tokens (32 texts of about 140 tokens by default), one process, the candidates take turns
and the best of --rounds counts:

* one layer's Linear work (q, k, v, output, FFN in + GELU, FFN out) as ATen ``F.linear`` (what bertkit
  runs), with the q/k/v weights stacked (``config.fused_qkv``), as oneDNN ``_linear_pointwise`` with the
  GELU fused into the GEMM (fused bias + activation), and as fbgemm int8 (dynamic and static
  activation quantization, ``torch.ao``) — printed as GFLOP/s and as a ratio to the ATen run;
* attention over the padded batch: SDPA's CPU flash kernel (what bertkit runs), the same without a
  mask, SDPA's math backend, and batched matmul + softmax in chunks of 1 and 4 sequences;
* a plain fp32 ``torch.mm`` at the same shapes, the machine's GEMM rate.

    .venv/bin/python benchmarks/cpu_kernels.py [--threads 2] [--tokens 4480] [--rounds 8]
"""

from __future__ import annotations

import argparse
import os
import platform
import time
import warnings

import torch
import torch.nn.functional as F


def best_time(fns: dict, rounds: int) -> dict:
    for fn in fns.values():
        fn()
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(rounds):  # interleaved: a slow spell of the machine hits every candidate alike
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def report(title: str, fns: dict, flops: float, rounds: int, base: str) -> None:
    best = best_time(fns, rounds)
    print(f"\n{title} ({flops / 1e9:.2f} GFLOP per call, best of {rounds})")
    for name, t in best.items():
        print(f"  {name:<44} {t * 1e3:8.2f} ms {flops / t / 1e9:7.1f} GFLOP/s  {best[base] / t:5.2f}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=4480, help="packed tokens per batch (default 4480 = 32 x 140)")
    ap.add_argument("--seq", type=int, default=140, help="sequence length for the attention runs")
    ap.add_argument("--hidden", type=int, default=384)
    ap.add_argument("--intermediate", type=int, default=1536)
    ap.add_argument("--head-dim", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=8)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    t, h, i = args.tokens, args.hidden, args.intermediate
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f}")

    x, y = torch.randn(t, h), torch.randn(t, i)
    shapes = {"q": (h, h), "k": (h, h), "v": (h, h), "o": (h, h), "in": (h, i), "out": (i, h)}
    w = {n: (torch.randn(o, k) * 0.05, torch.randn(o) * 0.05) for n, (k, o) in shapes.items()}
    w_qkv = torch.cat([w[n][0] for n in "qkv"])
    b_qkv = torch.cat([w[n][1] for n in "qkv"])
    layer_flops = 2 * t * (4 * h * h + 2 * h * i)
    pointwise = torch.ops.mkldnn._linear_pointwise

    def aten():
        for n in "qkvo":
            F.linear(x, *w[n])
        F.gelu(F.linear(x, *w["in"]))
        F.linear(y, *w["out"])

    def aten_fused_qkv():
        F.linear(x, w_qkv, b_qkv)
        F.linear(x, *w["o"])
        F.gelu(F.linear(x, *w["in"]))
        F.linear(y, *w["out"])

    def onednn_fused_gelu():
        pointwise(x, w_qkv, b_qkv, "none", [], "")
        pointwise(x, *w["o"], "none", [], "")
        pointwise(x, *w["in"], "gelu", [], "none")
        pointwise(y, *w["out"], "none", [], "")

    def plain_mm():
        for n in "qkvo":
            torch.mm(x, w[n][0].t())
        torch.mm(x, w["in"][0].t())
        torch.mm(y, w["out"][0].t())

    fns = {"ATen F.linear (bertkit)": aten, "ATen, fused q/k/v": aten_fused_qkv,
           "oneDNN, fused q/k/v, GELU fused into the GEMM": onednn_fused_gelu, "torch.mm, no bias (GEMM rate)": plain_mm}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao deprecation notices
        import torch.ao.nn.quantized as nnq
        import torch.ao.nn.quantized.dynamic as nnqd

        dyn, static = {}, {}
        for n, (k, o) in shapes.items():
            qw = torch.quantize_per_tensor(w[n][0], float(w[n][0].abs().max()) / 127, 0, torch.qint8)
            dyn[n] = nnqd.Linear(k, o)
            dyn[n].set_weight_bias(qw, w[n][1])
            static[n] = nnq.Linear(k, o)
            static[n].set_weight_bias(qw, w[n][1])
            static[n].scale, static[n].zero_point = 0.05, 128
        xq = torch.quantize_per_tensor(x, 0.05, 128, torch.quint8)
        yq = torch.quantize_per_tensor(y, 0.05, 128, torch.quint8)

        def int8_dynamic():
            for n in ("q", "k", "v", "o", "in"):
                dyn[n](x)
            dyn["out"](y)

        def int8_static():
            for n in ("q", "k", "v", "o", "in"):
                static[n](xq)
            static["out"](yq)

        fns["fbgemm int8, dynamic activations"] = int8_dynamic
        fns["fbgemm int8, static activations (GEMM only)"] = int8_static
        report(f"one layer's Linear work at {t} tokens", fns, layer_flops, args.rounds, "ATen F.linear (bertkit)")

    heads, d, seq = h // args.head_dim, args.head_dim, args.seq
    batch = max(1, t // seq)
    qkv = torch.randn(batch, seq, 3, heads, d)
    q, k, v = (qkv[:, :, n].transpose(1, 2) for n in range(3))  # the strided layout bertkit hands to SDPA
    qc, kc, vc = q.contiguous(), k.contiguous(), v.contiguous()
    mask = torch.zeros(batch, 1, 1, seq)

    def chunked(size: int):
        def run():
            for s in range(0, batch, size):
                n = min(size, batch - s)
                scores = torch.baddbmm(mask[s:s + n].expand(-1, heads, seq, seq).reshape(-1, seq, seq),
                                       qc[s:s + n].reshape(-1, seq, d), kc[s:s + n].reshape(-1, seq, d).transpose(1, 2),
                                       alpha=d ** -0.5)
                torch.bmm(scores.softmax(-1), vc[s:s + n].reshape(-1, seq, d))
        return run

    def math_backend():
        with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
            F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    attention = {"SDPA flash, additive mask (bertkit)": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask),
                 "SDPA flash, no mask": lambda: F.scaled_dot_product_attention(q, k, v),
                 "SDPA math backend": math_backend, "bmm + softmax, 1 sequence at a time": chunked(1),
                 "bmm + softmax, 4 sequences at a time": chunked(4)}
    report(f"attention, {batch} x {heads} heads x {seq} tokens x {d}", attention, 4 * batch * heads * seq * seq * d,
           args.rounds, "SDPA flash, additive mask (bertkit)")


if __name__ == "__main__":
    main()
