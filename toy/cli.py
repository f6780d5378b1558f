"""``python -m toy``: the command line of the 2D preference lab.

    python -m toy --out runs/toy                        # every method, seed 0 (docs/toy.md, Speed: the time)
    python -m toy --out runs/toy-quick --quick          # the same pipeline, a quarter of the steps
    python -m toy --out runs/toy --methods dpo,kto_kahneman_tversky --beta 2000
    python -m toy --out runs/toy_seeds --seeds 0,1,2    # one run per seed + summary.md (mean +- std)
    python -m toy --out runs/toy_flow --flow            # the same comparison on a rectified-flow model (toy/flow.py)

Flags are snake_case, as in the diffusers training scripts (``--spin_iterations``, ``--no_progress``); the older
kebab-case spellings (``--spin-iterations``) still work and are not shown in ``--help``. Bad input (an unknown
method, a malformed list, a non-positive number, an output path that is a file) exits with a one-line message from
argparse before anything is trained. From a notebook, call ``main(["--out", "runs/toy", "--quick"])``: ``main()``
without a list reads ``sys.argv`` only outside a Jupyter kernel (a kernel's ``-f kernel.json`` is not ours).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

import torch

from .methods import METHODS


def method_list(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise argparse.ArgumentTypeError("expected a comma-separated list of methods")
    unknown = [n for n in names if n not in METHODS]
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown method(s) {', '.join(map(repr, unknown))}; valid: {', '.join(METHODS)}"
        )
    if len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"a method is listed twice in {text!r}")
    return names


def seed_list(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not seeds or any(s < 0 for s in seeds) or len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"expected distinct non-negative integers, got {text!r}")
    return seeds


def positive(kind):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {kind.__name__}, got {text!r}") from None
        if not value > 0 or value != value:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value

    return parse


def non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m toy",
        description="The 2D preference lab (Diffusion-KTO Sec. 7): pretrain a tiny diffusion model, fine-tune one "
        "copy per objective, and compare where their samples land.",
    )
    parser.add_argument("--out", type=Path, required=True, help="output directory (created if missing)")
    parser.add_argument("--quick", action="store_true", help="a quarter of the steps, fewer samples: a smoke run")
    seeds = parser.add_mutually_exclusive_group()
    seeds.add_argument("--seed", type=non_negative_int, default=0, help="random seed (default 0)")
    seeds.add_argument("--seeds", type=seed_list, help="several seeds, e.g. 0,1,2: one run each plus summary.md")
    parser.add_argument("--methods", type=method_list, help=f"comma-separated subset of: {', '.join(METHODS)}")
    parser.add_argument("--steps", type=positive(int), help="fine-tuning steps for every method (default: per method)")
    parser.add_argument("--beta", type=positive(float), help="beta for every method that has one (default: per method)")
    parser.add_argument("--lr", type=positive(float), help="learning rate for every method (default: per method)")
    parser.add_argument("--tau", type=positive(float), help="Diff-contrast temperature (default 0.5)")
    parser.add_argument("--spin_iterations", type=positive(int), help="SPIN self-play iterations (default 2)")
    parser.add_argument("--spo_oracle", action="store_true",
                        help="SPO scores candidates with the exact log-density ratio instead of a learned model")
    parser.add_argument("--samples", type=positive(int), default=3500, help="samples per method (default 3500)")
    parser.add_argument("--threads", type=positive(int), default=1,
                        help="torch CPU threads (default 1: fastest for these tiny MLPs, and robust on a busy machine)")
    parser.add_argument("--workers", type=positive(int),
                        help="processes for the methods' fine-tunings (default: 2 on a machine with 2+ cores; 1: no "
                        "worker processes). Any count gives the same numbers")
    parser.add_argument("--no_progress", action="store_true", help="no progress bars")
    parser.add_argument("--flow", action="store_true",
                        help="a rectified-flow model instead of the diffusion model (toy/flow.py): same data, methods "
                        "(SPO skipped), figures and metrics; use its own --out")
    # The kebab-case spellings of earlier versions, kept working but hidden from --help.
    parser.add_argument("--spin-iterations", dest="spin_iterations", type=positive(int), help=argparse.SUPPRESS)
    parser.add_argument("--spo-oracle", dest="spo_oracle", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--no-progress", dest="no_progress", action="store_true", help=argparse.SUPPRESS)
    return parser


def in_jupyter_kernel() -> bool:
    """True inside an IPython/Jupyter kernel, whose ``sys.argv`` (``-f kernel.json``) belongs to the kernel."""
    return "ipykernel" in sys.modules


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse ``argv``, or the command line when ``argv`` is None (but never a Jupyter kernel's arguments)."""
    parser = build_parser()
    if argv is None:
        argv = [] if in_jupyter_kernel() else sys.argv[1:]
    args = parser.parse_args(argv)
    if args.samples < 2:
        parser.error("argument --samples: need at least 2 samples (the energy distance compares pairs)")
    if args.flow and args.methods is not None:
        from .flow import flow_method_names

        try:
            flow_method_names(args.methods)
        except ValueError as error:
            parser.error(f"argument --methods: {error}")
    if args.out.exists() and not args.out.is_dir():
        parser.error(f"argument --out: {args.out} exists and is not a directory")
    try:
        args.out.mkdir(parents=True, exist_ok=True)  # now, rather than after a minute of training
    except OSError as error:
        parser.error(f"argument --out: cannot create {args.out}: {error.strerror}")
    return args


def main(argv: list[str] | None = None) -> dict:
    """``python -m toy``; from Python or a notebook, ``main(["--out", "runs/toy", "--quick"])``."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    from .run import RunConfig, run, run_seeds  # after parsing, so --help and bad flags answer fast

    config = RunConfig(
        out=args.out, seed=args.seed, methods=args.methods, quick=args.quick, steps=args.steps, beta=args.beta, lr=args.lr,
        tau=args.tau, spin_iterations=args.spin_iterations, spo_oracle=args.spo_oracle, n_samples=args.samples,
        progress=not args.no_progress, workers=args.workers, flow=args.flow,
    )
    if args.flow:
        from .flow import skipped

        for name, why in skipped(args.methods).items():
            print(f"{name}: skipped on the flow toy: {why}", file=sys.stderr)
    if args.seeds is not None:
        summary = run_seeds(config, args.seeds)
        print((args.out / "summary.md").read_text())
        return summary
    output = run(config)
    print((args.out / "metrics.md").read_text())
    print(f"wrote {args.out}/samples.png, samples_all.png, curves.png, metrics.json, metrics.md", file=sys.stderr)
    return output


def leave() -> None:
    """End the process now that everything is written: Python's own clean-up of torch's thousands of modules takes
    ~0.4 s at exit (5% of ``--quick``), and nothing is left to clean up (the worker pools are closed, the files
    written, the progress bars closed); logging and the standard streams are flushed first."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def console() -> None:
    """`minipref-toy`: `python -m toy` as a console script; it ends the process itself (exit status 0, `leave`)."""
    main()
    leave()
