"""Command line: ``python -m onediff_sd_webui_extensions bench [options]``."""

import argparse
import os
import sys

# Run from a checkout (or from the webui's extensions/ folder), the top-level ``compile`` package sits beside us.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None) -> int:
    from onediff_sd_webui_extensions import bench

    parser = argparse.ArgumentParser(prog="python -m onediff_sd_webui_extensions")
    commands = parser.add_subparsers(dest="command", required=True)
    bench.add_arguments(commands.add_parser("bench", help="eager vs compiled UNet, checkpoint switch, LoRA"))
    args = parser.parse_args(argv)
    return bench.main(args)


if __name__ == "__main__":
    sys.exit(main())
