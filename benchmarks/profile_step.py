"""Where a decode step's time goes: the lean decoder's step on the embedded SmolLM2 (and the full-size ChatGLM3-6B with
--fullsize), at 1 and more running requests, with catdog's ops and without them (torch's SDPA per request and the
modules' own norms, rotary and SiLU: what runs where the kernels cannot be built). Prints the median step time, the
time inside the quantized matrix products (catdog::q4_linear) and everything else, per step and per request, and the
aten ops per step.

    python benchmarks/profile_step.py [--quantize 4] [--batches 1,16] [--context 200] [--fullsize DIR]

The step is called directly (no scheduler, no sampling), from a thread that is not the main one: the serving engine
steps from its own thread too, and the main thread must not lead an OpenMP team (see chat/loading.py).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def profile(model_dir: str | None, quantize: int, batches: list[int], context: int, steps: int) -> list[dict]:
    import torch

    import catdog_glm.chat.decoder as decoder_module
    from catdog_glm.chat.decoder import lean_decoder
    from catdog_glm.chat.kernels import status
    from catdog_glm.chat.loading import load_chat_model
    from catdog_glm.chat.scheduler import SequenceKV

    chat = load_chat_model(model_dir, quantize=quantize)
    decoder = lean_decoder(chat.model)
    layers = chat.model.config.num_hidden_layers
    prompt = list(range(100, 100 + context))
    rows = []
    for own_ops in (True, False):
        decoder_module.kernels_available = (lambda: True) if own_ops else (lambda: False)
        for batch in batches:
            caches = [SequenceKV(context + 2 * steps + 16, layers) for _ in range(batch)]
            with torch.inference_mode():
                for kv in caches:  # each request's prompt, one prefill each
                    decoder(
                        torch.tensor(prompt), torch.arange(context), [(0, context, kv)], torch.tensor([context - 1])
                    )
                    kv.advance(context)

                def step(caches=caches, batch=batch):
                    positions = torch.tensor([kv.length for kv in caches])
                    segments = [(i, 1, kv) for i, kv in enumerate(caches)]
                    decoder(torch.full((batch,), 42), positions, segments, torch.arange(batch))
                    for kv in caches:
                        kv.advance(1)

                for _ in range(3):
                    step()
                times = []
                for _ in range(steps):
                    started = time.perf_counter()
                    step()
                    times.append(time.perf_counter() - started)
                with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                    for _ in range(steps):
                        step()
            events = prof.key_averages()
            if os.environ.get("PROFILE_TABLE"):
                print(f"-- {'catdog' if own_ops else 'torch'} ops, batch {batch}, {steps} steps")
                print(events.table(sort_by="count", row_limit=int(os.environ["PROFILE_TABLE"])))
            total_us = sum(e.self_cpu_time_total for e in events) / steps
            matmul_us = sum(
                e.self_cpu_time_total for e in events if e.key in ("catdog::q4_linear", "catdog::q8_linear")
            )
            attention_us = sum(
                e.self_cpu_time_total
                for e in events
                if e.key in ("catdog::decode_attention", "aten::_scaled_dot_product_flash_attention_for_cpu")
            )
            ops = sum(e.count for e in events if e.key.startswith(("aten::", "catdog::"))) / steps
            median_ms = statistics.median(times) * 1e3
            share = (matmul_us / steps) / total_us if total_us else 0.0
            rows.append(
                {
                    "model": chat.name,
                    "ops": "catdog" if own_ops else "torch",
                    "batch": batch,
                    "step_ms": median_ms,
                    "tok_s": batch / (median_ms / 1e3),
                    "matmul_ms": median_ms * share,
                    "other_ms": median_ms * (1 - share),
                    "attention_ms": median_ms * (attention_us / steps) / total_us if total_us else 0.0,
                    "aten_ops": ops,
                    "kernels": status()["path"],
                }
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quantize", type=int, default=4, choices=[4, 8])
    parser.add_argument("--batches", default="1,16")
    parser.add_argument("--context", type=int, default=200, help="tokens already in each request's cache")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--fullsize", type=Path, default=os.environ.get("CATDOG_FULLSIZE_DIR") or None)
    args = parser.parse_args()
    from catdog_glm.device import cpu_flags, cpu_name

    batches = [int(b) for b in args.batches.split(",")]
    print(f"CPU: {cpu_name()}; threads {os.environ.get('OMP_NUM_THREADS') or os.cpu_count()}")
    print(
        "flags: "
        + " ".join(f for f in ("avx2", "avx_vnni", "avx512_vnni", "avx512_bf16", "amx_tile") if f in cpu_flags())
    )
    models = [None] + ([str(args.fullsize)] if args.fullsize else [])
    rows: list[dict] = []
    for model in models:
        result: list = []
        sizes = batches if model is None else [1, 8]
        # a thread of its own: the main thread never leads an OpenMP team (chat/loading.py says why)
        worker = threading.Thread(
            target=lambda m=model, out=result, b=sizes: out.extend(
                profile(m, args.quantize, b, args.context, args.steps)
            )
        )
        worker.start()
        worker.join()
        rows += result
    print(
        f"\n{'model':28} {'ops':7} {'batch':>5} {'step ms':>8} {'tok/s':>7} {'matmul ms':>10} {'other ms':>9} "
        f"{'attn ms':>8} {'aten ops':>9}"
    )
    for r in rows:
        print(
            f"{r['model'][:28]:28} {r['ops']:7} {r['batch']:5d} {r['step_ms']:8.2f} {r['tok_s']:7.1f} "
            f"{r['matmul_ms']:10.2f} {r['other_ms']:9.2f} {r['attention_ms']:8.2f} {r['aten_ops']:9.0f}"
        )
    by = {(r["model"], r["ops"], r["batch"]): r for r in rows}
    for (model, ops, batch), r in by.items():
        torch_row = by.get((model, "torch", batch))
        if ops == "catdog" and torch_row:
            print(
                f"{model[:28]} batch {batch}: catdog's ops {torch_row['step_ms'] / r['step_ms']:.2f}x the step speed "
                f"of torch's; non-matmul time {r['other_ms']:.2f} ms = {r['other_ms'] / r['step_ms']:.0%} of the step"
            )
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
