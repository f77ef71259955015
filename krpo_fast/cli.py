"""Command line: ``krpo-fast train``, ``eval``, ``bench`` and ``study``.

Every failure of ``train`` and ``eval`` ends with one line ``error: <message>`` naming
the setting or the file at fault: exit status 2 when nothing was trained (a bad value,
a missing or damaged model, dataset or checkpoint, a run directory in use or not
writable), 1 when training had started (the run directory keeps its checkpoints:
continue with ``--resume``). ``--debug`` also prints the traceback. Unknown flags get
argparse's usual one-line error.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from pathlib import Path

from krpo_fast.config import EvalConfig, TrainConfig, parse_config

USAGE = """usage: krpo-fast {train,eval,bench,study} [flags]

  train   KRPO/GRPO training (krpo-fast train --help lists every flag)
  eval    greedy held-out accuracy of a model (krpo-fast eval --help)
  bench   benchmark the ops against the paper, eager torch, torch.compile and Liger
          (krpo-fast bench --help)
  study   GRPO-vs-KRPO study over seeds, task difficulties and reward noise, with a
          report checking the paper's claims (krpo-fast study --help)
"""


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE, end="")
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in ("train", "eval", "bench", "study"):
        print(USAGE + f"krpo-fast: error: unknown command {command!r}", file=sys.stderr)
        return 2
    if command == "bench":
        return _bench(rest)
    if command == "study":
        from krpo_fast.study import main as study_main

        return study_main(rest)
    from huggingface_hub.utils import logging as hub_logging
    from transformers.utils import logging as hf_logging

    from krpo_fast.trainer import TrainingFailed, error_line, evaluate, train

    hf_logging.disable_progress_bar()  # weight loading/saving bars; ours is the step bar
    hub_logging.set_verbosity_error()  # its retry warnings would precede our one-line error

    cfg: TrainConfig | EvalConfig | None = None
    try:
        if command == "train":
            cfg = parse_config(TrainConfig, rest, "krpo-fast train", "Train with KRPO or GRPO.")
            summary = train(cfg)
            before, after = summary["accuracy_before"], summary["accuracy_after"]
            if os.environ.get("RANK", "0") == "0":  # one line per torchrun job, not per rank
                print(
                    f"held-out accuracy: before {before:.3f}  after {after:.3f}  "
                    f"({summary['wall_time_s']:.0f} s, {cfg.output_dir})"
                )
        else:
            cfg = parse_config(EvalConfig, rest, "krpo-fast eval", "Greedy held-out accuracy.")
            print(json.dumps(evaluate(cfg)))
    except KeyboardInterrupt:
        print("error: interrupted (a training run continues with --resume)", file=sys.stderr)
        return 130
    except Exception as e:  # the one error path: a line for the user, a traceback on request
        if cfg.debug if cfg is not None else "--debug" in rest:
            traceback.print_exc()
        cause = e.__cause__ if isinstance(e, TrainingFailed) else e
        expected = isinstance(cause, (ValueError, OSError))
        hint = "" if expected else " (an internal error: run with --debug for the traceback)"
        print(f"error: {error_line(e)}{hint}", file=sys.stderr)
        return 1 if isinstance(e, TrainingFailed) else 2
    return 0


def _bench(argv: list[str]) -> int:
    """Run the benchmark harness of the checkout krpo_fast was installed from (an
    editable install); an installed wheel has no ``bench/`` folder."""
    bench_dir = Path(__file__).resolve().parent.parent / "bench"
    if not (bench_dir / "harness.py").is_file():
        print(
            f"error: krpo-fast bench needs the bench/ folder of a krpo-fast checkout "
            f"({bench_dir} not found): git clone the repository and pip install -e it",
            file=sys.stderr,
        )
        return 2
    sys.path.insert(0, str(bench_dir))
    from harness import main as bench_main

    return bench_main(argv)


if __name__ == "__main__":
    sys.exit(main())
