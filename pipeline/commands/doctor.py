"""`mdeploy doctor`: versions, and what can and cannot run on this machine."""
from __future__ import annotations

import argparse


def add_parser(sub, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("doctor", parents=[common], help="what is installed and what can run here")
    p.set_defaults(func=run)


def run(args: argparse.Namespace, ui) -> int:
    import platform

    from rich.table import Table

    from device_tests.environment import probe
    checks = probe()
    if args.json:
        import dataclasses
        ui.emit_json({"platform": f"{platform.system()} {platform.machine()}",
                      "python": platform.python_version(),
                      "checks": [dataclasses.asdict(c) for c in checks]})
        return 0
    table = Table(title=f"mdeploy doctor: {platform.system()} {platform.machine()}, "
                        f"Python {platform.python_version()}")
    table.add_column("")
    table.add_column("check")
    table.add_column("found")
    table.add_column("to fix")
    for c in checks:
        table.add_row("[green]ok[/green]" if c.ok else "[yellow]--[/yellow]", c.name, c.detail, c.fix)
    ui.table(table)
    return 0
