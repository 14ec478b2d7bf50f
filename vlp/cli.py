"""The ``vlp`` command: data, train, eval, export, caption, cluster, bench.

Each subcommand lives in ``vlp/commands/``; only the module of the command being run is
imported (``vlp --help`` and ``vlp data`` do not load the model code). Every subcommand
turns bad input (a bad option, ValueError, FileNotFoundError or another unusable path, a
damaged checkpoint) into one line on stderr and exit code 2, without a traceback; a run that
ends for another known reason (diverged, a dead peer, a checkpoint it could not write, another
OSError) is one line and exit code 1. The list: docs/errors.md.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import sys
from typing import List, Optional

from vlp.errors import CheckpointWriteFailed, PeerFailure, TrainingDiverged

# OSErrors that mean a path given is unusable: bad input (FileNotFoundError is one too)
BAD_PATH = (PermissionError, IsADirectoryError, NotADirectoryError, FileExistsError)

# name -> (module, its parser builder, one-line help shown by `vlp --help`)
COMMANDS = {
    "data": ("vlp.commands.data", "add_data_parser", "write, import and verify WebDataset shards"),
    "train": ("vlp.commands.train", "add_train_parser", "train from a YAML recipe plus dotted key=value overrides"),
    "eval": ("vlp.commands.eval", "add_eval_parser", "evaluate a checkpoint (one subcommand per evaluator)"),
    "export": ("vlp.commands.export", "add_export_parser", "write a run's weights for open_clip, timm, transformers"),
    "caption": ("vlp.commands.caption", "add_caption_parser", "caption images with a CoCa checkpoint"),
    "cluster": ("vlp.commands.cluster", "add_cluster_parser", "spherical k-means of image embeddings (MLCD)"),
    "bench": ("vlp.commands.bench", "add_bench_parser", "benchmarks next to open_clip's reference"),
}


class Parser(argparse.ArgumentParser):
    """argparse's parser, but a usage error is one line on stderr (exit code 2), not the usage
    block: ``vlp eval zeroshot: error: argument --batch-size: invalid int value: 'x'``. Subcommand
    parsers are of the same class (argparse makes them of their parent's)."""

    def error(self, message: str):
        print(f"{self.prog}: error: {message} (see {self.prog} --help)", file=sys.stderr)
        self.exit(2)


def build_parser(command: Optional[str] = None) -> argparse.ArgumentParser:
    """The parser with every subcommand complete, or (``command`` given) only that one; the
    others are listed with their help but not loaded."""
    parser = Parser(prog="vlp", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="{" + ",".join(COMMANDS) + "}")
    for name, (module, builder, text) in COMMANDS.items():
        if command is None or name == command:
            with contextlib.redirect_stdout(sys.stderr):  # libraries' import-time notices; stdout is the result
                loaded = importlib.import_module(module)
            getattr(loaded, builder)(sub)
        else:
            sub.add_parser(name, help=text)
    return parser


def _one_line(e: BaseException) -> str:
    return str(e).splitlines()[0] if str(e) else type(e).__name__


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    command = next((a for a in argv if not a.startswith("-")), "")
    try:
        args = build_parser(command if command in COMMANDS else "").parse_args(argv)
    except SystemExit as e:  # --help (0) or a usage error (2, one line printed)
        return 0 if e.code is None else e.code if isinstance(e.code, int) else 2
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, *BAD_PATH) as e:
        print(f"vlp {args.command}: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except (TrainingDiverged, PeerFailure, CheckpointWriteFailed, OSError) as e:
        print(f"vlp {args.command}: error: {_one_line(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
