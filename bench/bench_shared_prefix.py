"""Forward+backward time and peak memory of ``sequence_logprobs``: shared prefix vs per-sequence.

    OMP_NUM_THREADS=1 python bench/bench_shared_prefix.py [--repeats 5] [--output PATH]

Each shape (prompt length, completion length, G) is one group of G completions of one
prompt (every completion full length). Both modes run side by side in one process on
one thread; the time is the median of ``--repeats`` forward+backward passes after one
warm-up (loss: the sum of the log-probs). Peak memory is measured in a separate pass
under ``torch.profiler(profile_memory=True)``: the highest net sum of bytes allocated
minus freed through torch's CPU allocator during one forward+backward, counted from its
start (activations kept for backward, temporaries, gradients; the weights and anything
allocated before are excluded).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from krpo_fast.logits_ops import selective_log_softmax
from krpo_fast.shared_prefix import sequence_logprobs

BUNDLED = Path(__file__).resolve().parents[1] / "krpo_fast" / "assets" / "tiny_llama"
MODES = {
    "per_sequence": "per-sequence, one call (`shared_prefix=False`)",
    "per_sequence_each": "per-sequence, one forward per sequence (`micro_batch_tokens=p+c`)",
    "padded": "padded batch [G, p+c], plain HF forward",
    "shared": "shared prefix (`shared_prefix=True`)",
}
# Above this many prompt tokens in one call, the per-sequence packed row's dense mask
# (N^2 booleans built by transformers for packed SDPA) and its attention over N keys
# take gigabytes: that mode is skipped there.
ONE_CALL_LIMIT = 16_384
SHAPES = [(80, 34, 8), (256, 64, 8), (1024, 128, 8), (2048, 256, 16)]
# The random model used beyond the bundled task's shape.
RANDOM_LLAMA = dict(
    vocab_size=4096,
    hidden_size=256,
    intermediate_size=688,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,
    max_position_embeddings=4096,
)


def bundled_model() -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(str(BUNDLED), attn_implementation="sdpa")


def random_llama() -> torch.nn.Module:
    torch.manual_seed(0)
    config = LlamaConfig(**RANDOM_LLAMA)
    config._attn_implementation = "sdpa"
    return LlamaForCausalLM(config)


def make_group(prompt: int, completion: int, group: int, vocab: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    prompt_ids = torch.randint(3, vocab, (prompt,), generator=g).tolist()
    completions = [
        torch.randint(3, vocab, (completion,), generator=g).tolist() for _ in range(group)
    ]
    return [prompt_ids] * group, completions


def forward_backward(model, prompts, completions, mode: str) -> None:
    if mode == "padded":
        logp = padded_batch_logprobs(model, prompts, completions)
    else:
        one_each = len(prompts[0]) + len(completions[0]) if mode == "per_sequence_each" else None
        logp, mask = sequence_logprobs(
            model,
            prompts,
            completions,
            shared_prefix=mode == "shared",
            micro_batch_tokens=one_each,
        )
        logp = logp[mask]
    logp.sum().backward()
    model.zero_grad(set_to_none=True)


def padded_batch_logprobs(model, prompts, completions) -> torch.Tensor:
    """The G sequences as one [G, p + c] batch (equal lengths here: no padding needed)."""
    ids = torch.tensor([p + c for p, c in zip(prompts, completions, strict=True)])
    p = len(prompts[0])
    hidden = model.get_decoder()(input_ids=ids, use_cache=False).last_hidden_state
    logits = hidden[:, p - 1 : -1] @ model.get_output_embeddings().weight.T
    return selective_log_softmax(logits, torch.tensor(completions))


def peak_bytes(model, prompts, completions, mode: str) -> int:
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        forward_backward(model, prompts, completions, mode)
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    live = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        live += event.nbytes()
        peak = max(peak, live)
    return peak


def measure(model, shape, repeats: int) -> list[dict]:
    prompt, completion, group = shape
    prompts, completions = make_group(prompt, completion, group, model.config.vocab_size)
    modes = [m for m in MODES if not (m == "per_sequence" and prompt * group > ONE_CALL_LIMIT)]
    times: dict[str, list[float]] = {mode: [] for mode in modes}
    for mode in modes:
        forward_backward(model, prompts, completions, mode)  # warm-up
    for _ in range(repeats):
        for mode in modes:  # interleaved: load changes hit every mode alike
            start = time.perf_counter()
            forward_backward(model, prompts, completions, mode)
            times[mode].append(time.perf_counter() - start)
    model_name = "bundled tiny_llama" if model.config.name_or_path else "random Llama"
    peaks = {mode: peak_bytes(model, prompts, completions, mode) for mode in modes}
    seconds = {mode: statistics.median(times[mode]) for mode in modes}
    tokens = group * (prompt + completion)
    return [
        {
            "shape": shape,
            "model": model_name,
            "mode": mode,
            "tokens": prompt + group * completion if mode == "shared" else tokens,
            "seconds": seconds[mode],
            "speedup": seconds[mode] / seconds["shared"],
            "peak": peaks[mode],
            "memory_ratio": peaks[mode] / peaks["shared"],
        }
        for mode in modes
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--shapes", type=str, default=None, help="e.g. 80,34,8;256,64,8")
    parser.add_argument("--output", type=Path, default=None, help="write the Markdown table here")
    args = parser.parse_args()
    shapes = SHAPES
    if args.shapes:
        shapes = [tuple(int(x) for x in s.split(",")) for s in args.shapes.split(";")]
    torch.set_num_threads(1)
    bundled, random = bundled_model().eval(), random_llama().eval()
    rows = []
    for shape in shapes:
        model = bundled if shape == (80, 34, 8) else random
        for row in measure(model, shape, args.repeats):
            rows.append(row)
            print(format_row(row), flush=True)
    table = "\n".join([HEADER, *map(format_row, rows)])
    print(table)
    if args.output:
        args.output.write_text(report(table, args.repeats))


HEADER = (
    "| (prompt, completion, G) | model | forward | packed tokens | fwd+bwd | shared is faster by"
    " | peak memory | shared needs less by |\n|---|---|---|---|---|---|---|---|"
)


def format_row(row: dict) -> str:
    return (
        f"| {row['shape']} | {row['model']} | {MODES[row['mode']]} | {row['tokens']} "
        f"| {row['seconds'] * 1e3:.0f} ms | {row['speedup']:.2f}x "
        f"| {row['peak'] / 2**20:.1f} MiB | {row['memory_ratio']:.2f}x |"
    )


def report(table: str, repeats: int) -> str:
    config = ", ".join(f"{k}={v}" for k, v in RANDOM_LLAMA.items())
    return f"""# Shared-prefix forward+backward (CPU)

`OMP_NUM_THREADS=1 python bench/bench_shared_prefix.py --output bench/results/cpu/shared_prefix.md`

Machine: shared 2-core x86_64 CPU (other jobs running), one thread (`OMP_NUM_THREADS=1`),
torch {torch.__version__}. All forwards of a shape are measured side by side in one run,
interleaved, so load changes hit them alike. Time: median of {repeats} forward+backward
passes (loss = sum of the completion log-probs). Peak: the highest net bytes allocated
through torch's CPU allocator during one forward+backward (torch.profiler memory events):
activations, temporaries and gradients, not the weights. One group of G full-length
completions of one prompt per shape.

Forwards: `krpo_fast.sequence_logprobs` with `shared_prefix=False` in one call (all G
sequences packed in one row: what the trainer does per micro-batch), the same with
`micro_batch_tokens=p+c` (one forward per sequence), a plain Hugging Face forward of the
G sequences as one `[G, p+c]` batch, and `shared_prefix=True`. The one-call row is left
out above {ONE_CALL_LIMIT} prompt tokens per call: transformers builds a dense [N, N]
mask for a packed row on SDPA and attends over all N keys, which takes gigabytes there.

Models: the bundled `krpo_fast/assets/tiny_llama` (0.65M parameters, 3 layers, hidden
128) at (80, 34, 8), the bundled task's shape; a randomly initialised Llama ({config})
for the others.

{table}
"""


if __name__ == "__main__":
    main()
