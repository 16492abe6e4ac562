"""`mdeploy doctor`: versions, and what can and cannot run on this machine."""
from __future__ import annotations

import argparse


def add_parser(sub, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("doctor", parents=[common], help="what is installed and what can run here")
    p.add_argument("--fix", choices=["arm"], default=None,
                   help="arm: build the emulated aarch64 environment (Debian arm64 Python, the "
                        "runtimes' aarch64 wheels incl. torch + executorch, the qemu "
                        "instruction-count plugin) in the cache")
    p.set_defaults(func=run)


def run(args: argparse.Namespace, ui) -> int:
    import platform

    from rich.table import Table
    from pipeline.ui import Markup

    from device_tests.environment import probe
    if getattr(args, "fix", None) == "arm":
        return _fix_arm(ui)
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
        table.add_row(Markup("[green]ok[/green]" if c.ok else "[yellow]--[/yellow]"), c.name, c.detail, c.fix)
    ui.table(table)
    return 0


def _fix_arm(ui) -> int:
    """Provision the aarch64 environment; system packages must be there already."""
    from device_tests.devices import aarch64_env as env
    st = env.status()
    if st.missing_tools:
        ui.error(f"missing system packages ({', '.join(st.missing_tools)}): run "
                 f"`apt-get install -y {' '.join(env.SYSTEM_PACKAGES)}` (as root), or `make arm-env`")
        return 1
    with ui.status("provisioning the aarch64 environment (about 3 minutes and 5 GB on a fresh machine)"):
        try:
            st = env.provision(log=ui.info)
        except RuntimeError as exc:
            ui.error(f"provisioning failed: {exc}")
            return 1
    wheels = ", ".join(f"{k} {v}" for k, v in st.wheels.items())
    ui.result(f"aarch64 environment ready: Python {st.python}, {wheels}, counter plugin, in {st.cache}")
    return 0
