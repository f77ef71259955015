"""Peak memory of the chunked LM-head KRPO loss against the eager path, V = 151,936.

    python bench/bench_lm_head_memory.py [--tokens N] [--hidden H] [--chunks 64 256]

Both paths take the last hidden states [N, H] and the LM-head weight [V, H] and
produce the loss and the gradients of both:

- eager: logits = hidden @ W.T, log_softmax(logits.float() / T).gather, the eager
  policy loss (``krpo_fast.reference.policy_loss_reference``), backward;
- fused: ``krpo_fast.logits_ops.policy_loss_from_hidden`` (per chunk of tokens:
  matmul, fused log-softmax/loss/gradient, gradient accumulation).

Measured: the peak of bytes allocated above the level at the start of the
forward, through the end of the backward (gradients included).
- CPU: torch.profiler with ``profile_memory=True`` records every allocation and
  free of the CPU allocator; the peak is the running maximum of their sum in time
  order. Written to bench/results/cpu/lm_head_memory.md.
- CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``.
Timings printed beside are single runs, for orientation only.
"""

import argparse
import itertools
import platform
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from krpo_fast.logits_ops import policy_loss_from_hidden
from krpo_fast.reference import group_advantages_reference, policy_loss_reference

VOCAB = 151_936
RESULTS = Path(__file__).parent / "results" / "cpu" / "lm_head_memory.md"


def peak_bytes(fn: Callable[[], None], device: torch.device) -> tuple[int, float]:
    """(peak bytes allocated above the starting level while fn runs, seconds)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - start, time.perf_counter() - t0
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        t0 = time.perf_counter()
        fn()
        seconds = time.perf_counter() - t0
    events = prof.profiler.kineto_results.events()
    deltas = sorted((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]")
    return max(itertools.accumulate((n for _, n in deltas), initial=0)), seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cuda = torch.cuda.is_available()
    parser.add_argument("--tokens", type=int, default=8192 if cuda else 512)
    parser.add_argument("--seq-len", type=int, default=1024 if cuda else 128)
    parser.add_argument("--hidden", type=int, default=896)  # Qwen2.5-0.5B: V = 151,936
    parser.add_argument(
        "--chunks", type=int, nargs="+", default=[1024, 4096] if cuda else [64, 256]
    )
    parser.add_argument("--temperature", type=float, default=1.0)
    args = parser.parse_args()

    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    gen = torch.Generator().manual_seed(0)
    B, T = args.tokens // args.seq_len, args.seq_len
    hidden = (torch.randn(B * T, args.hidden, generator=gen)).to(device, dtype)
    weight = (torch.randn(VOCAB, args.hidden, generator=gen) / args.hidden**0.5).to(device, dtype)
    hidden.requires_grad_()
    weight.requires_grad_()
    ids = torch.randint(0, VOCAB, (B, T), generator=gen).to(device)
    mask = (torch.rand(B, T, generator=gen) > 0.1).to(device)
    with torch.no_grad():
        logp = torch.log_softmax((hidden.float() @ weight.float().T) / args.temperature, -1)
        logp = logp.gather(-1, ids.reshape(-1, 1)).view(B, T)
    old = logp + 0.05 * torch.randn(B, T, generator=gen).to(device)
    ref = logp + 0.05 * torch.randn(B, T, generator=gen).to(device)
    del logp
    advantages = group_advantages_reference(torch.rand(B, generator=gen), group_size=B).to(device)
    losses = {}

    def eager() -> None:
        logits = hidden @ weight.T
        logp = torch.log_softmax(logits.float() / args.temperature, dim=-1)
        token_logp = logp.gather(-1, ids.reshape(-1, 1)).view(B, T)
        loss, _ = policy_loss_reference(token_logp, old, ref, advantages, mask)
        loss.backward()
        losses["eager"] = loss.item()

    def fused(chunk: int) -> Callable[[], None]:
        def run() -> None:
            loss, _ = policy_loss_from_hidden(
                hidden,
                weight,
                ids,
                old,
                ref,
                advantages,
                mask,
                temperature=args.temperature,
                chunk_size=chunk,
            )
            loss.backward()
            losses[f"fused, chunk {chunk}"] = loss.item()

        return run

    rows = []
    for name, fn in [("eager", eager)] + [(f"fused, chunk {c}", fused(c)) for c in args.chunks]:
        hidden.grad = weight.grad = None
        peak, seconds = peak_bytes(fn, device)
        rows.append((name, peak, seconds))
    eager_peak = rows[0][1]

    elem = torch.finfo(dtype).bits // 8
    method = (
        "torch.cuda.max_memory_allocated"
        if cuda
        else "torch.profiler profile_memory (CPU allocator events, running sum)"
    )
    lines = [
        "# LM-head KRPO loss: peak memory, chunked (fused) vs eager",
        "",
        f"Device: {torch.cuda.get_device_name() if cuda else platform.processor() or 'CPU'}; "
        f"torch {torch.__version__}; measured with {method}.",
        f"N = {B * T} tokens ({B} x {T}), H = {args.hidden}, V = {VOCAB}, {dtype}; "
        f"one [N, V] buffer in {dtype} = {B * T * VOCAB * elem:,} bytes; "
        f"the weight gradient [V, H] = {VOCAB * args.hidden * elem:,} bytes (both paths).",
        "Peak = bytes allocated above the starting level, forward through backward.",
        "",
        "| path | peak bytes | peak MiB | vs eager | seconds (single run) | loss |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, peak, seconds in rows:
        lines.append(
            f"| {name} | {peak:,} | {peak / 2**20:.1f} | {peak / eager_peak:.3f} | "
            f"{seconds:.2f} | {losses[name]:.6f} |"
        )
    report = "\n".join(lines) + "\n"
    print(report)
    if not cuda:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(report)
        print(f"written to {RESULTS}")


if __name__ == "__main__":
    main()
