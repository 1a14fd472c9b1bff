"""BLIP-style caption generation: bertkit.generation.generate vs transformers BlipTextLMHeadModel.generate.

Both decoders hold the same random weights: transformers builds and saves a BLIP-base-sized
``BlipTextLMHeadModel`` (hidden 768, 12 layers, vocab 30524, cross-attention to ``--encoder-width``
image features), bertkit loads that folder. Both caption the same batch of random "image embeddings"
(577 tokens = ViT-B/16 at 384 px, plus CLS) from BLIP's prompt "a picture of" with BLIP's beam-search
settings (3 beams, max_length 30, min_length 10, EOS = [SEP]). Same process, same thread count; after a
warm-up the two are timed in alternation, so load changes on the machine hit both alike, and the median
counts. The script also checks that both produce the same tokens.

    python benchmarks/caption_generation.py --threads 2            # ~6 min on an idle 2-core CPU
    python benchmarks/caption_generation.py --layers 2 --runs 1    # a quick look
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
import warnings

import torch

PROMPT = [30522, 1037, 3861, 1997]  # BLIP: [DEC] (bos) + "a picture of"
SEP, PAD = 102, 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--encoder-width", type=int, default=768, help="768 = BLIP base (ViT-B), 1024 = large")
    parser.add_argument("--image-tokens", type=int, default=577)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--beams", type=int, default=3)
    parser.add_argument("--max-length", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--runs", type=int, default=2, help="timed runs per library; the median counts")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    import transformers

    import bertkit
    from bertkit.generation import generate

    transformers.logging.set_verbosity_error()
    warnings.filterwarnings("ignore")
    config = transformers.BlipTextConfig(
        vocab_size=30524, hidden_size=768, num_hidden_layers=args.layers, num_attention_heads=12,
        intermediate_size=3072, encoder_hidden_size=args.encoder_width, max_position_embeddings=512,
        bos_token_id=PROMPT[0], eos_token_id=SEP, sep_token_id=SEP, pad_token_id=PAD)
    hf = transformers.BlipTextLMHeadModel(config).eval()
    with tempfile.TemporaryDirectory() as folder:
        hf.save_pretrained(folder)
        ours = bertkit.BertLMHeadModel.from_pretrained(folder).eval().to(args.device)
    hf = hf.to(args.device)
    prompt = torch.tensor([PROMPT] * args.batch, device=args.device)
    images = torch.randn(args.batch, args.image_tokens, args.encoder_width).to(args.device)
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    kw = dict(num_beams=args.beams, max_length=args.max_length, min_length=10, eos_token_id=SEP, pad_token_id=PAD,
              encoder_hidden_states=images)
    runners = {"bertkit generate": lambda: generate(ours, prompt, **kw),
               "transformers BlipTextLMHeadModel.generate": lambda: hf.generate(prompt, **kw)}

    with torch.inference_mode():
        outputs = {name: run() for name, run in runners.items()}  # also the first warm-up
        for _ in range(args.warmup - 1):
            for run in runners.values():
                run()
        times: dict[str, list[float]] = {name: [] for name in runners}
        cpu: dict[str, list[float]] = {name: [] for name in runners}  # process CPU s: steadier on a busy machine
        for _ in range(args.runs):
            for name, run in runners.items():
                sync()
                start, start_cpu = time.perf_counter(), time.process_time()
                run()
                sync()
                times[name].append(time.perf_counter() - start)
                cpu[name].append(time.process_time() - start_cpu)

    a, b = outputs.values()
    # transformers fills finished beams with EOS when pad_token_id is 0 (`pad or eos`); bertkit with pad.
    same = a.shape == b.shape and torch.equal(a, torch.where((b == SEP).cumsum(1) > 1, PAD, b))
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, "
          f"{platform.processor() or platform.machine()}, {args.threads} thread(s), load average {load:.1f}"
          + (f", {torch.cuda.get_device_name()}" if args.device.startswith("cuda") else ""))
    print(f"decoder: hidden 768, {args.layers} layers, vocab 30524, encoder width {args.encoder_width}; "
          f"batch {args.batch} x {args.image_tokens} image tokens, {args.beams} beams, max_length {args.max_length}; "
          f"median of {args.runs} runs after {args.warmup} warm-up")
    medians = {name: statistics.median(ts) for name, ts in times.items()}
    for name, median in medians.items():
        spread = f"min {min(times[name]):.2f} / max {max(times[name]):.2f} s"
        print(f"  {name:<44} {median:7.2f} s wall, {statistics.median(cpu[name]):7.2f} s CPU  "
              f"({args.batch / median:5.2f} captions/s; {spread})")
    ours_t, ref_t = medians.values()
    ours_c, ref_c = (statistics.median(c) for c in cpu.values())
    print(f"  speed-up of bertkit: {ref_t / ours_t:.2f}x wall, {ref_c / ours_c:.2f}x CPU; "
          f"output shape {tuple(a.shape)}; same tokens: {same}")


if __name__ == "__main__":
    main()
