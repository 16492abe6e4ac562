"""Device catalogue for *estimates*: published peak throughput and memory bandwidth, cited.

Every figure carries its source. Where a vendor does not publish a figure (Qualcomm has
given no TOPS for the Hexagon NPU since the 888, nor FLOPS for Adreno; Apple gives none
for its GPUs), the figure is ``None`` with "not published", never a guess. Derived
figures say how they were derived (e.g. bandwidth = transfer rate x bus width, with the
bus width marked "assumed" where the source does not state it).

``roofline()`` turns a model's multiply-accumulates and the bytes it must move into a
*lower bound* on latency: ``max(2*MACs / peak_ops, bytes / bandwidth)``. It ignores
everything that makes real latency higher (kernel efficiency, cache misses, dispatch,
delegate partitioning), so it is labelled an estimate wherever it is shown and can
only say "no faster than this", never "this fast".
"""
from __future__ import annotations

from dataclasses import dataclass, field

ESTIMATE_LABEL = "roofline lower bound (estimate, not a measurement)"
NOT_PUBLISHED = "not published"

# Sources (stored public copies found with the project's search tool).
SRC = {
    "sd865_cpu_mem": "goodgearguide.com.au/article/669418 (Qualcomm briefing: Kryo 585 1x2.84 + 3x2.4 GHz "
                     "Cortex-A77, 4x1.8 GHz A55; LPDDR5 2750 MHz)",
    "sd865_bus": "medium.com/0xmachina (AnandTech table: memory 4x16bit LPDDR5 @ 2750 MHz)",
    "sd865_hexagon": "extremetech.com/mobile/303015 (Qualcomm claims the Hexagon 698 supports 15 TOPS)",
    "sd8g1": "tipsclear.com Snapdragon 8 Gen 1 deep dive (1x3.0 GHz X2, 3x2.5 GHz A710, 4x1.8 GHz A510; "
             "LPDDR5 @ 3,200 MHz)",
    "sd8g2": "wccftech.com/qualcomm-snapdragon-8-gen-2-goes-official (X3 3.2 GHz, 4x2.8 GHz, 3x2.0 GHz; "
             "LPDDR5X up to 4,200 MHz)",
    "sd8g3": "droidholic.com/snapdragon-8-gen-3-launched (X4 3.3 GHz, 3x3.2 + 2x3.0 GHz, 2x2.3 GHz; "
             "LPDDR5X up to 4800 MHz)",
    "a15": "pocketnow.com (Apple event 2021-09-14: A15 16-core Neural Engine, 15.8 trillion ops/s)",
    "a16": "thecekodok.com 2022/09 (Apple: A16 Bionic 17 trillion operations per second)",
    "a17": "techfirstnow.com A17 Pro vs A16 (A17 Pro 16-core Neural Engine, 35 TOPS)",
    "a16_a17_bw": "top2gadget.com A17 Pro vs A16 (third-party spec table: max bandwidth 51.2 GB/s)",
    "rpi5": "docs.zephyrproject.org rpi_5 (Raspberry Pi 5 product brief: BCM2712 2.4 GHz quad Cortex-A76, "
            "LPDDR4X-4267)",
    "rpi4": "github.com/gitluis/pi-cluster wiki (BCM2711 quad Cortex-A72 @ 1.5 GHz, LPDDR4-3200)",
    "rpi3": "raspberrypi/documentation bcm2837 (quad Cortex-A53, cores at 1.2 GHz)",
    "a76_neon": "anandtech.com/show/12785 (Cortex-A76: two ASIMD/FP pipelines); techarx.com (two 128-bit "
                "NEON pipes, INT8 dot product)",
}


@dataclass(frozen=True)
class Figure:
    value: float | None          # ops/s or bytes/s; None = not published
    source: str
    note: str = ""

    @property
    def known(self) -> bool:
        return self.value is not None


def _np(what: str) -> Figure:
    return Figure(None, NOT_PUBLISHED, what)


@dataclass(frozen=True)
class Component:
    name: str                    # "CPU", "GPU", "NPU"
    description: str
    peak_ops: dict[str, Figure]  # precision ("fp32", "fp16", "int8") -> ops/s (1 MAC = 2 ops)


@dataclass(frozen=True)
class DeviceSpec:
    key: str
    name: str
    components: tuple[Component, ...]
    memory_bandwidth: Figure     # bytes/s


def _bw(mts: float, bus_bits: int) -> float:
    return mts * 1e6 * bus_bits / 8


_A76_FP32_PER_CYCLE = 2 * 4 * 2      # two 128-bit pipes x 4 fp32 lanes x FMA (2 ops)
_A76_INT8_PER_CYCLE = 2 * 16 * 2     # two pipes x SDOT (16 int8 MACs per 128-bit op) x 2 ops

CATALOG: dict[str, DeviceSpec] = {d.key: d for d in (
    DeviceSpec("snapdragon-865", "Qualcomm Snapdragon 865", (
        Component("CPU", "Kryo 585: 1x Cortex-A77 2.84 GHz + 3x A77 2.4 GHz + 4x A55 1.8 GHz",
                  {"fp32": _np("per-cycle throughput of A77 not cited here"),
                   "int8": _np("per-cycle throughput of A77 not cited here")}),
        Component("GPU", "Adreno 650", {"fp32": _np("Qualcomm does not publish Adreno FLOPS"),
                                         "fp16": _np("Qualcomm does not publish Adreno FLOPS")}),
        Component("NPU", "Hexagon 698", {"int8": Figure(15e12, SRC["sd865_hexagon"],
                                                         "marketed TOPS; precision as marketed (int8)")}),
    ), Figure(_bw(5500, 64), f"{SRC['sd865_cpu_mem']}; {SRC['sd865_bus']}",
              "derived: LPDDR5 2750 MHz (5500 MT/s) x 64-bit (4x16) bus = 44.0 GB/s")),
    DeviceSpec("snapdragon-8-gen-1", "Qualcomm Snapdragon 8 Gen 1", (
        Component("CPU", "1x Cortex-X2 3.0 GHz + 3x A710 2.5 GHz + 4x A510 1.8 GHz",
                  {"fp32": _np("per-cycle throughput not cited here"), "int8": _np("not cited here")}),
        Component("GPU", "Adreno 730", {"fp32": _np("Qualcomm does not publish Adreno FLOPS")}),
        Component("NPU", "Hexagon", {"int8": _np("Qualcomm gives only '4x the 888' for the AI engine")}),
    ), Figure(_bw(6400, 64), SRC["sd8g1"], "derived: LPDDR5 3200 MHz (6400 MT/s) x 64-bit bus "
              "(bus width assumed, as on the 865) = 51.2 GB/s")),
    DeviceSpec("snapdragon-8-gen-2", "Qualcomm Snapdragon 8 Gen 2", (
        Component("CPU", "1x Cortex-X3 3.2 GHz + 4x 2.8 GHz (A715/A710) + 3x A510 2.0 GHz",
                  {"fp32": _np("per-cycle throughput not cited here"), "int8": _np("not cited here")}),
        Component("GPU", "Adreno 740", {"fp32": _np("Qualcomm does not publish Adreno FLOPS")}),
        Component("NPU", "Hexagon", {"int8": _np("Qualcomm gives only relative AI gains")}),
    ), Figure(_bw(8400, 64), SRC["sd8g2"], "derived: LPDDR5X 4200 MHz (8400 MT/s) x 64-bit bus "
              "(bus width assumed) = 67.2 GB/s")),
    DeviceSpec("snapdragon-8-gen-3", "Qualcomm Snapdragon 8 Gen 3", (
        Component("CPU", "1x Cortex-X4 3.3 GHz + 3x A720 3.2 GHz + 2x A720 3.0 GHz + 2x A520 2.3 GHz",
                  {"fp32": _np("per-cycle throughput not cited here"), "int8": _np("not cited here")}),
        Component("GPU", "Adreno 750", {"fp32": _np("Qualcomm does not publish Adreno FLOPS")}),
        Component("NPU", "Hexagon", {"int8": _np("Qualcomm gives only '98% faster' than Gen 2")}),
    ), Figure(_bw(9600, 64), SRC["sd8g3"], "derived: LPDDR5X 4800 MHz (9600 MT/s) x 64-bit bus "
              "(bus width assumed) = 76.8 GB/s")),
    DeviceSpec("apple-a15", "Apple A15 Bionic", (
        Component("GPU", "Apple 4/5-core GPU", {"fp32": _np("Apple does not publish GPU FLOPS")}),
        Component("NPU", "16-core Neural Engine", {"int8": Figure(15.8e12, SRC["a15"],
                  "Apple's TOPS figure; Apple does not state its precision")}),
    ), _np("Apple does not publish A15 memory bandwidth")),
    DeviceSpec("apple-a16", "Apple A16 Bionic", (
        Component("GPU", "Apple 5-core GPU", {"fp32": _np("Apple does not publish GPU FLOPS")}),
        Component("NPU", "16-core Neural Engine", {"int8": Figure(17e12, SRC["a16"],
                  "Apple's TOPS figure; Apple does not state its precision")}),
    ), Figure(51.2e9, SRC["a16_a17_bw"], "third-party figure (LPDDR5, 64-bit); Apple publishes none")),
    DeviceSpec("apple-a17-pro", "Apple A17 Pro", (
        Component("GPU", "Apple 6-core GPU", {"fp32": _np("Apple does not publish GPU FLOPS")}),
        Component("NPU", "16-core Neural Engine", {"int8": Figure(35e12, SRC["a17"],
                  "Apple's TOPS figure; Apple does not state its precision")}),
    ), Figure(51.2e9, SRC["a16_a17_bw"], "third-party figure; Apple publishes none")),
    DeviceSpec("raspberry-pi-5", "Raspberry Pi 5 (BCM2712, 4x Cortex-A76)", (
        Component("CPU", "4x Cortex-A76 2.4 GHz", {
            "fp32": Figure(4 * 2.4e9 * _A76_FP32_PER_CYCLE, f"{SRC['rpi5']}; {SRC['a76_neon']}",
                           "derived: 4 cores x 2.4 GHz x 16 fp32 ops/cycle (2x128-bit FMA pipes)"),
            "int8": Figure(4 * 2.4e9 * _A76_INT8_PER_CYCLE, f"{SRC['rpi5']}; {SRC['a76_neon']}",
                           "derived: 4 cores x 2.4 GHz x 64 int8 ops/cycle (2 pipes x SDOT)")}),
    ), Figure(_bw(4267, 32), SRC["rpi5"], "derived: LPDDR4X-4267 x 32-bit bus (bus width assumed) "
              "= 17.1 GB/s")),
    DeviceSpec("raspberry-pi-4", "Raspberry Pi 4 (BCM2711, 4x Cortex-A72)", (
        Component("CPU", "4x Cortex-A72 1.5 GHz", {"fp32": _np("per-cycle throughput not cited here")}),
    ), Figure(_bw(3200, 32), SRC["rpi4"], "derived: LPDDR4-3200 x 32-bit bus (bus width assumed) "
              "= 12.8 GB/s")),
    DeviceSpec("raspberry-pi-3", "Raspberry Pi 3 (BCM2837, 4x Cortex-A53)", (
        Component("CPU", "4x Cortex-A53 1.2 GHz (" + SRC["rpi3"] + ")",
                  {"fp32": _np("per-cycle throughput not cited here")}),
    ), _np("memory speed not given in the cited source")),
)}


@dataclass
class Estimate:
    device: str
    component: str
    precision: str
    compute_ms: float | None       # 2*MACs / peak
    memory_ms: float | None        # bytes / bandwidth
    lower_bound_ms: float | None
    bound: str                     # "compute", "memory", or why there is no estimate
    label: str = ESTIMATE_LABEL
    sources: list[str] = field(default_factory=list)


BYTES = {"fp32": 4, "fp16": 2, "int8": 1}


def min_bytes(params: int, input_elems: int, output_elems: int, precision: str) -> int:
    """The least a run must move: every weight once, the input once, the output once."""
    return (params + input_elems + output_elems) * BYTES[precision]


def roofline(spec: DeviceSpec, macs: int, bytes_moved: int, precision: str) -> list[Estimate]:
    out = []
    bw = spec.memory_bandwidth
    mem_ms = bytes_moved / bw.value * 1e3 if bw.known else None
    for comp in spec.components:
        peak = comp.peak_ops.get(precision)
        if peak is None:
            continue
        comp_ms = 2 * macs / peak.value * 1e3 if peak.known else None
        known = [v for v in (comp_ms, mem_ms) if v is not None]
        if not known:
            bound = "no estimate: neither peak nor bandwidth published"
        elif comp_ms is None:
            bound = "memory (compute peak not published: memory term only)"
        elif mem_ms is None:
            bound = "compute (bandwidth not published: compute term only)"
        else:
            bound = "compute" if comp_ms >= mem_ms else "memory"
        out.append(Estimate(spec.key, comp.name, precision, comp_ms, mem_ms, max(known) if known else None,
                            bound, sources=sorted({peak.source, bw.source} - {NOT_PUBLISHED})))
    return out


def estimate_model(macs: int, params: int, input_elems: int, output_elems: int,
                   precision: str, devices: list[str] | None = None) -> list[Estimate]:
    """Roofline lower bounds for every catalogued device (or ``devices``) at ``precision``."""
    if precision not in BYTES:
        raise ValueError(f"precision must be one of {sorted(BYTES)}")
    keys = devices or list(CATALOG)
    unknown = [k for k in keys if k not in CATALOG]
    if unknown:
        from models.errors import InputError
        raise InputError("--estimate", f"devices among {', '.join(CATALOG)}", ", ".join(unknown))
    nbytes = min_bytes(params, input_elems, output_elems, precision)
    return [e for k in keys for e in roofline(CATALOG[k], macs, nbytes, precision)]
