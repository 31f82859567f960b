"""Promote the `candidate` version of a registered model to `champion` if it is better.

Both versions are evaluated on the same evaluation set (Ray Data batch inference); the
candidate is promoted when its top-1 is higher by --margin and McNemar's test on the
per-image outcomes says so at --alpha. The first model for a name is promoted. The
former champion keeps the alias `previous`; `--rollback` swaps them back. Every
decision is recorded on the versions (tag promotion.candidate / promotion.champion).

    python pipelines/promote.py --model vit-digits --data data/digits/v1 --split val
    python pipelines/promote.py --model vit-digits --rollback
    ray job submit --working-dir . -- python pipelines/promote.py --model vit-b16-cifar10 \\
        --data s3://vit/datasets/cifar10/v1 --split test --margin 0.002
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # `python pipelines/x.py` puts only pipelines/ on the path

from vit_core.cli import outcome_record, report_result, report_user_errors  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", required=True, help="registered model name")
    parser.add_argument("--data", help="shard set to evaluate on (local or s3://)")
    parser.add_argument("--split", default="val", help="split of --data (default: %(default)s)")
    parser.add_argument("--margin", type=float, default=0.0,
                        help="top-1 gain required, as a fraction (default: %(default)s)")
    parser.add_argument("--alpha", type=float, default=0.05,
                        help="McNemar's test level (default: %(default)s)")
    parser.add_argument("--rollback", action="store_true",
                        help="make `previous` the champion again")  # fmt: skip
    args = parser.parse_args(argv)
    if not args.rollback and not args.data:
        parser.error("--data is required unless --rollback")
    with report_user_errors():
        from vit_core.eval.promote import promote, rollback

        if args.rollback:
            rollback(args.model)
            report_result({"model": args.model, "rollback": True})
        else:
            decision = promote(args.model, args.data, args.split, args.margin, args.alpha)
            report_result({"model": args.model, "decision": decision and outcome_record(decision)})
        return 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
