"""`mdeploy verify` (placeholder until its module is written)."""
from __future__ import annotations

import argparse


def add_parser(sub, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("verify", parents=[common], help="(not yet available)")
    p.set_defaults(func=lambda args, ui: (ui.error("verify is not implemented yet"), 1)[1])
