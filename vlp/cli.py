"""The ``vlp`` command: data, train, eval, export, caption, cluster, bench.

Every subcommand turns bad input (ValueError, FileNotFoundError) into one line on
stderr and exit code 2, without a traceback.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import List, Optional


def _train(args) -> int:
    from vlp.config import load_config
    from vlp.train import train

    cfg = load_config(args.config, args.overrides)
    result = train(cfg)
    from vlp.engine import dist

    if dist.rank() == 0:
        print(json.dumps(result))
    return 0


def _add_train_parser(sub) -> None:
    p = sub.add_parser("train", help="train from a YAML recipe plus dotted key=value overrides")
    p.add_argument("config", help="YAML recipe, e.g. configs/quickstart/clip_digits.yaml")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=1e-3 engine.zero_stage=2")
    p.set_defaults(func=_train)


def build_parser() -> argparse.ArgumentParser:
    from vlp.bench import add_bench_parser
    from vlp.caption import add_caption_parser
    from vlp.cluster import add_cluster_parser
    from vlp.data.cli import add_data_parser
    from vlp.eval.cli import add_eval_parser
    from vlp.export import add_export_parser

    parser = argparse.ArgumentParser(prog="vlp", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="{data,train,eval,export,caption,cluster,bench}")
    add_data_parser(sub)
    _add_train_parser(sub)
    add_eval_parser(sub)
    add_export_parser(sub)
    add_caption_parser(sub)
    add_cluster_parser(sub)
    add_bench_parser(sub)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"vlp {args.command}: error: {msg}", file=sys.stderr)
        return 2
    except RuntimeError as e:
        from vlp.train import PeerFailure, TrainingDiverged

        if isinstance(e, (TrainingDiverged, PeerFailure)):
            print(f"vlp {args.command}: error: {str(e).splitlines()[0]}", file=sys.stderr)
            return 1
        raise
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
