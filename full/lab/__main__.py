"""`python -m full.lab --out runs/lab` (`make lab`): every objective trains the lab's tiny text-to-image model.

Each method's LoRA is compared with the base model on the rater's reward (win rate, CI over captions, one training
seed): whether it moved the reward, not whether it beats another method (that is `python -m full.lab.replicate`,
docs/replication.md). Not every objective moves it (docs/lab.md, Results).

    python -m full.lab --out runs/lab            # the full lab: pretraining cached in runs/lab/model
    python -m full.lab --out runs/lab-quick --quick
    python -m full.lab --out runs/lab --methods dpo,sft,dpo_swapped
    python -m full.lab --out runs/lab --methods all,sft_seed1     # every method, and SFT again with --seed 1
    python -m full.lab --out runs/lab-sd3 --family sd3            # a tiny SD3 pretrained with flow matching

See full/lab/run.py for what it writes and docs/lab.md for the results.
"""

from __future__ import annotations

import sys
from dataclasses import replace

from full.cli import Parser
from full.lab.methods import all_methods, method_named
from full.lab.presets import FLOW_FULL, FLOW_QUICK, FULL, QUICK


def is_method(name: str) -> bool:
    try:
        method_named(name)
    except KeyError:
        return False
    return True


def main(argv=None) -> int:
    parser = Parser(prog="python -m full.lab", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/lab", help="output directory (the pretrained model is cached there)")
    parser.add_argument("--quick", action="store_true", help="the test-sized lab (minutes, weaker model)")
    parser.add_argument("--methods", default=None,
                        help="comma-separated method names (default: all); 'all' = every method; NAME_seed<N> = "
                             "NAME trained with --seed N (a second training seed)")
    parser.add_argument("--guidance", type=float, default=None,
                        help="classifier-free guidance scale of every sample the lab draws (default: the preset's, "
                             "3); new data, LoRAs and evaluation in --out")
    parser.add_argument("--family", choices=("sd15", "sd3"), default="sd15",
                        help="sd15: the UNet lab (docs/lab.md); sd3: the same world on a tiny SD3-shaped transformer "
                             "pretrained with flow matching, arms dpo, kto_kahneman_tversky, sft, dpo_swapped by "
                             "default (docs/lab_flow.md)")
    parser.add_argument("--launcher", choices=("accelerate", "inprocess"), default="accelerate",
                        help="accelerate: each trainer as `accelerate launch -m ...`; inprocess: its main(argv)")
    args = parser.parse_args(argv)
    lab = {"sd15": (FULL, QUICK), "sd3": (FLOW_FULL, FLOW_QUICK)}[args.family][args.quick]
    if args.guidance is not None:
        if not args.guidance >= 1.0:
            parser.error(f"--guidance must be at least 1 (1 = no guidance), got {args.guidance}")
        lab = replace(lab, guidance=args.guidance)
    if args.methods:
        known = [m.name for m in all_methods()]
        names = [n.strip() for n in args.methods.split(",") if n.strip()]
        names = list(dict.fromkeys(n for name in names for n in (known if name == "all" else [name])))
        unknown = [n for n in names if not is_method(n)]
        if unknown:
            parser.error(f"--methods: unknown {unknown}; choose from {','.join(known)} (or all, or NAME_seed<N>)")
        lab = replace(lab, methods=tuple(names))
    from full.lab.run import run_lab

    results = run_lab(args.out, lab, launcher=args.launcher)
    print(f"\n{'method':24s} {'win rate':>8s} {'95% CI':>15s} {'Wilcoxon p':>10s} {'fidelity':>8s}")
    print(f"{'base':24s} {'':8s} {'':15s} {'':10s} {results['base']['fidelity']:8.2f}")
    for name, r in results["methods"].items():
        print(f"{name:24s} {r['win_rate']:8.2f} [{r['ci'][0]:5.2f}, {r['ci'][1]:5.2f}] {r['wilcoxon_p']:10.2g} "
              f"{r['fidelity']:8.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
