"""`gemma-keras` command line. Today: `presets` and `inspect`; generation, chat, fine-tuning
and export commands arrive with their issues."""

from __future__ import annotations

import argparse
import os
import sys


def _presets(args):
    from gemma_keras.presets import get_preset_card, list_presets

    print(f"{'preset':32} {'params':>15}  {'kaggle handle':52} hf repo")
    for name in list_presets():
        card = get_preset_card(name)
        print(f"{name:32} {card.parameter_count:>15,}  {card.kaggle_handle:52} "
              f"{card.hf_repo or '-'}")


def _inspect(args):
    from gemma_keras.checkpoints.loading import read_preset_config
    from gemma_keras.checkpoints.resolve import resolve_preset

    directory = resolve_preset(args.preset)
    config, dtype, fmt = read_preset_config(directory)
    print(f"{directory}: {fmt} checkpoint, saved as {dtype}")
    print(config.describe())
    for key, value in config.to_dict().items():
        print(f"  {key:30} {value}")


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="gemma-keras", description="Gemma models for Keras 3 (JAX, TensorFlow, PyTorch).")
    parser.add_argument("--backend", choices=["jax", "tensorflow", "torch"],
                        help="Keras backend (default: $KERAS_BACKEND, else the one in "
                             "~/.keras/keras.json)")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("presets", help="table of the built-in presets").set_defaults(run=_presets)
    inspect = commands.add_parser(
        "inspect", help="show the config of a preset, handle or checkpoint directory")
    inspect.add_argument("preset")
    inspect.set_defaults(run=_inspect)
    args = parser.parse_args(argv)
    if args.backend:
        os.environ["KERAS_BACKEND"] = args.backend
    from gemma_keras.errors import GemmaError

    try:
        args.run(args)
    except GemmaError as e:  # user mistakes: a message, not a traceback
        print(f"gemma-keras: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
