"""`python -m hf_batch_entropy.diagnosis`: the diagnosis from the command line."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Any

from .clone import CLONE_HINT, experiment_models, flush_subnormals
from .loading import ProbeInputsError
from .report import DEFAULT_THRESHOLD, diagnose

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m hf_batch_entropy.diagnosis",
        description="Trainability diagnosis: per-layer batch-entropy at initialization, and the layers where it is ~0 "
        "(information flow broken; Peer et al., TMLR 2022), with suggested LBE settings.",
        epilog="Examples:\n  python -m hf_batch_entropy.diagnosis --vanilla mlp --depth 500 --width 64\n"
        "  python -m hf_batch_entropy.diagnosis bert-base-uncased\n"
        "  python -m hf_batch_entropy.diagnosis ./my_model --pretrained\n"
        "  python -m hf_batch_entropy.diagnosis runs/quickstart --tokenizer bert-base-uncased\n\n"
        "A text model saved without a tokenizer is probed with random token ids from its vocabulary (the report says "
        "so);\n--tokenizer gives it real sentences. --vanilla, and folders of the vanilla and autoencoder models, need "
        "a clone\nof the repository (run from its root): those models are research code in experiments/models.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("model", nargs="?", help="Hub model name or local folder (omit with --vanilla).")
    parser.add_argument("--vanilla", choices=["mlp", "cnn"],
                        help="Diagnose a fresh vanilla network instead (from the root of a clone of the repository).")
    parser.add_argument("--depth", type=int, default=500, help="Vanilla network depth (default 500).")
    parser.add_argument("--width", type=int, default=64, help="Vanilla MLP width / CNN channels (default 64).")
    parser.add_argument("--activation", default="relu", help="Vanilla network activation (default relu).")
    parser.add_argument("--image_size", type=int, default=8, help="Vanilla network input size (default 8, digits).")
    parser.add_argument("--pretrained", action="store_true", help="Load the trained weights instead of a fresh init.")
    parser.add_argument("--tokenizer", metavar="NAME_OR_PATH", default=None,
                        help="Tokenizer for a text model (Hub name or folder; default: the model folder's own, and "
                        "random token ids from the config's vocabulary where it has none).")
    parser.add_argument("--trust_remote_code", action="store_true", help="Allow custom modeling code from the Hub.")
    parser.add_argument("--threshold", type=float, default=None,
                        help=f"Flag layers with batch-entropy below this, in nats (default {DEFAULT_THRESHOLD:g} for "
                        "float32 activations, scaled by the squared machine epsilon for half precision).")
    parser.add_argument("--target_modules", nargs="+", default=None,
                        help="Measure these modules' outputs (names, suffixes or re:<regex>) instead of hidden_states.")
    parser.add_argument("--num_batches", type=int, default=4, help="Batches to average over (default 4).")
    parser.add_argument("--batch_size", type=int, default=64, help="Examples per batch (default 64; text models: one batch of at most 16 fixed sentences).")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the initialization and of the batches.")
    parser.add_argument("--device", default=None, help="Device, e.g. cuda (default: cpu).")
    parser.add_argument("--max_rows", type=int, default=40, help="Rows of the table (0: all layers).")
    parser.add_argument("--json", action="store_true", help="Print the diagnosis as JSON instead of a table.")
    return parser


def _looks_local(name: str) -> bool:
    """A path rather than a Hub name (`name` or `namespace/name`)."""
    return os.path.isabs(name) or name.startswith((".", "~")) or name.count("/") > 1 or (os.sep != "/" and os.sep in name)


def _usage_error(parser: argparse.ArgumentParser, message: str) -> int:
    print(f"{parser.prog}: error: {' '.join(message.split())}", file=sys.stderr)  # one line
    return 2


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point. Exit status: 0 when every layer passes, 1 when some layer is flagged, 2 on bad usage."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if (args.model is None) == (args.vanilla is None):
        parser.error("give either a model name/path or --vanilla mlp|cnn")
    if args.vanilla is not None:
        models = experiment_models()
        if models is None:
            return _usage_error(parser, f"--vanilla: {CLONE_HINT}")
        common = dict(depth=args.depth, activation=args.activation, image_size=args.image_size)
        try:
            config = (
                models.VanillaMLPConfig(width=args.width, **common)
                if args.vanilla == "mlp"
                else models.VanillaCNNConfig(channels=args.width, **common)
            )
        except ValueError as err:  # a depth, width or activation out of range: the config says which
            return _usage_error(parser, str(err))
        target: Any = config
    else:
        target = args.model
        if _looks_local(target) and not os.path.exists(target):
            return _usage_error(parser, f"{target}: no such file or directory (give a local model folder or a Hub "
                                "name such as bert-base-uncased).")
    if args.tokenizer is not None and _looks_local(args.tokenizer) and not os.path.exists(args.tokenizer):
        return _usage_error(parser, f"--tokenizer {args.tokenizer}: no such file or directory (give a tokenizer folder "
                            "or a Hub name such as bert-base-uncased).")
    if (args.device or "cpu") == "cpu":
        # Transformers imports DeepSpeed where it is installed, and DeepSpeed, left to guess, warns that it falls back
        # to the CPU: the diagnosis runs there, so say so.
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    # Subnormal floats in deep dead networks slow CPU arithmetic down (experiments/frontier/vanilla.md); they are ~0 anyway.
    flush_subnormals()
    try:
        report = diagnose(
            target,
            threshold=args.threshold,
            target_modules=args.target_modules,
            tokenizer=args.tokenizer,
            num_batches=args.num_batches,
            batch_size=args.batch_size,
            seed=args.seed,
            trust_remote_code=args.trust_remote_code,
            pretrained=args.pretrained,
            device=args.device,
        )
    except ProbeInputsError as err:
        return _usage_error(parser, err.cli_message)
    except (OSError, ValueError) as err:
        return _usage_error(parser, str(err))
    if args.json:
        import json

        print(json.dumps(report.to_dict(), indent=1))
    else:
        print(report.format(max_rows=args.max_rows or None))
    return 0 if report.trainable else 1
