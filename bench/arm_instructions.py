"""Instruction counts per inference on emulated Cortex-A53 and Cortex-A76, fp32 vs int8.

    python -m bench.arm_instructions                      # three small zoo models
    python -m bench.arm_instructions mobilenet_v2_035 --cpus cortex-a76

Each model is exported once (ONNX fp32, TFLite fp32 and full-integer int8, 1x32x32 MNIST
input) and run by the real aarch64 ONNX Runtime / LiteRT under qemu-aarch64 with the
instruction-count plugin (1 thread). Counts are deterministic, so one process per
artifact and three inferences suffice. The table shows counts and their ratios; an
instruction is not a cycle (NEON/dotprod instructions do more work each, and the A53 is
in-order), so compare ratios within a CPU, not absolute counts across CPUs.
Needs `make arm-env`.
"""
from __future__ import annotations

import argparse

from rich.console import Console
from rich.table import Table

from bench._zoo_exports import DEFAULT_MODELS, artifact, zoo_export
from models.util import first_line

KEYS = ("onnx/fp32", "tflite/fp32", "tflite/int8")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="*", default=list(DEFAULT_MODELS))
    ap.add_argument("--cpus", default="cortex-a53,cortex-a76")
    args = ap.parse_args(argv)
    from device_tests.devices.base import DeviceError
    from device_tests.devices.qemu import QemuDevice
    from models import create_model
    from models.complexity import count_complexity
    from exporters.artifact import Manifest
    console = Console()
    table = Table(title="instructions per inference under qemu-aarch64 (1 thread; deterministic)")
    for c in ("model", "input", "MMACs", "cpu", *KEYS, "int8/fp32 (tflite)", "tflite/onnx fp32",
              "insns per MAC (tflite int8)"):
        table.add_column(c, justify="left" if c in ("model", "cpu") else "right")
    for name in args.models:
        folder = zoo_export(name)
        pre = Manifest.load(folder).preprocessing
        macs = count_complexity(create_model(name, num_classes=10, in_chans=1), tuple(pre.input_size)).macs
        for cpu in args.cpus.split(","):
            dev = QemuDevice(cpu.strip())
            counts: dict[str, float | None] = {}
            for key in KEYS:
                try:
                    p = dev.profile(artifact(folder, key), folder, runs=2)
                    counts[key] = p.instructions.mean
                    console.print(f"[dim]{name} {key} on {cpu}: {counts[key]:,.0f} instructions[/dim]")
                except DeviceError as exc:         # e.g. a delegate that refuses the model
                    counts[key] = None
                    console.print(f"[yellow]{name} {key} on {cpu} failed:[/yellow] "
                                  f"{first_line(exc)}")

            def ratio(a: str, b: str) -> str:
                return f"{counts[a] / counts[b]:.2f}x" if counts[a] and counts[b] else "n/a"
            table.add_row(name, "x".join(map(str, pre.input_size)), f"{macs / 1e6:.2f}", cpu,
                          *(f"{counts[k]:,.0f}" if counts[k] else "failed" for k in KEYS),
                          ratio("tflite/int8", "tflite/fp32"), ratio("tflite/fp32", "onnx/fp32"),
                          f"{counts['tflite/int8'] / macs:.2f}" if counts["tflite/int8"] else "n/a")
    console.print(table)


if __name__ == "__main__":
    main()
