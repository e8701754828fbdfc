"""The `hsm` command. `hsm distributed ...` (sources in hsm_config.yaml) grows here."""

from __future__ import annotations

import argparse
import sys

from hsm_core import __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hsm", description="hsm-distributed: Hydra sweeps on many machines")
    parser.add_argument("--version", action="version", version=f"hsm-distributed {__version__}")
    return parser


def main(argv: list[str] | None = None) -> int:
    build_parser().parse_args(argv)
    print("Run a sweep with: python train.py -m hydra/launcher=hsm_distributed ...", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
