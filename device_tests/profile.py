"""Profiles: what one artifact costs on one device, and what produced the figures.

A ``Profile`` is a plain, JSON-serialisable record: latency percentiles over N timed
runs after a warm-up, the first inference and the initialisation apart (they are what
an app's cold start pays), peak memory, artifact size, per-operator time where the
runtime reports it, and, under emulation, instruction counts instead of wall time.
``measured_on`` says in words what produced the numbers, so a figure from an emulator
or an estimate is never mistaken for a device measurement.

This module is also copied to remote devices (ssh) and into the emulated aarch64
Python (``device_tests/devices/bundle.py``): it imports only the standard library and
numpy at module level, and the runtimes lazily.

Each profiler belongs to a runner kind (``Runner.profile`` of the runner that loads
the format calls it), but talks to the runtime directly rather than through ``infer``: the
timed region is the runtime's own ``run``/``invoke`` on inputs already in the model's
dtype and layout (as ``benchmark_model`` times it), so layout transposes and
quantization at the runner's edge do not pollute the latency.
"""
from __future__ import annotations

import dataclasses
import json
import os
import platform
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from models.util import one_line

# Marker codes the instruction-count plugin records (see devices/insn_count.c).
MARK_INIT_BEGIN, MARK_INIT_END, MARK_RUN_BEGIN, MARK_RUN_END = 1, 2, 3, 4
Marker = Callable[[int], None]


class NotProfilable(Exception):
    """This artifact cannot be profiled here (format without a local runtime, ...)."""


class ProfileError(RuntimeError):
    """The runtime refused the model (e.g. a delegate failed to prepare): said, not hidden."""


def _prepare_error(runtime: str, path: str, exc: Exception) -> ProfileError:
    return ProfileError(f"{runtime} could not prepare {Path(path).name}: {one_line(exc)}")


@dataclass
class LatencyStats:
    """Per-inference wall time in milliseconds; ``std`` is the population standard deviation
    (as ``benchmark_model`` prints it)."""

    count: int
    min_ms: float
    p50_ms: float | None
    p90_ms: float | None
    p99_ms: float | None
    mean_ms: float
    std_ms: float | None
    max_ms: float | None = None

    @classmethod
    def from_times(cls, times_ms: list[float]) -> "LatencyStats":
        if not times_ms:
            raise ValueError("no timed runs")
        t = np.asarray(times_ms, dtype=np.float64)
        p50, p90, p99 = (float(v) for v in np.percentile(t, [50, 90, 99]))
        return cls(count=len(t), min_ms=float(t.min()), p50_ms=p50, p90_ms=p90, p99_ms=p99,
                   mean_ms=float(t.mean()), std_ms=float(t.std()), max_ms=float(t.max()))


@dataclass
class OpTime:
    """Time of one op type or one node, averaged per inference."""

    name: str
    op_type: str
    ms: float                 # mean time per inference
    percent: float            # share of the summed op time
    calls: int = 1            # times it ran per inference (nodes of that type, for by-type rows)


@dataclass
class InstructionCounts:
    """Guest instructions executed (qemu TCG plugin), which is deterministic under emulation."""

    cpu: str
    init: int | None
    first_inference: int | None
    per_inference: list[int]              # every inference after the first
    plugin: str = "mdeploy insn_count (qemu TCG plugin, inline per-block counter)"

    @property
    def mean(self) -> float | None:
        return float(np.mean(self.per_inference)) if self.per_inference else None


@dataclass
class Profile:
    artifact: str                          # artifact key, e.g. "tflite/int8"
    path: str
    format: str
    precision: str
    runtime: str                           # "onnxruntime 1.32.0 (CPUExecutionProvider)"
    device: str                            # device spec, e.g. "local", "qemu-aarch64:cortex-a76"
    measured_on: str                       # what produced the numbers, in words
    runs: int
    warmup: int
    threads: int | None                    # None: the runtime's default
    latency: LatencyStats | None = None
    first_inference_ms: float | None = None
    init_ms: float | None = None
    peak_memory_bytes: int | None = None
    memory_note: str = ""
    artifact_size_bytes: int | None = None
    ops_by_type: list[OpTime] = field(default_factory=list)
    ops_by_node: list[OpTime] = field(default_factory=list)
    op_profile_note: str = ""
    instructions: InstructionCounts | None = None
    device_info: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        if self.instructions is not None:
            d["instructions"]["mean"] = self.instructions.mean
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Profile":
        d = dict(d)
        if d.get("latency"):
            d["latency"] = LatencyStats(**d["latency"])
        d["ops_by_type"] = [OpTime(**o) for o in d.get("ops_by_type", [])]
        d["ops_by_node"] = [OpTime(**o) for o in d.get("ops_by_node", [])]
        if d.get("instructions"):
            ins = dict(d["instructions"])
            ins.pop("mean", None)
            d["instructions"] = InstructionCounts(**ins)
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


# -- memory -------------------------------------------------------------------

class PeakMemory:
    """Peak resident-set growth of this process over a ``with`` block.

    On Linux the kernel's high-water mark (``VmHWM``) is reset through
    ``/proc/self/clear_refs`` (value 5, Linux >= 4.0), so the peak is exact; elsewhere a
    background thread samples RSS every 2 ms (a peak shorter than that can be missed).
    """

    def __init__(self) -> None:
        self.baseline = 0
        self.peak = 0
        self.method = ""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> "PeakMemory":
        self.baseline = _rss_bytes()
        if _reset_hwm():
            self.method = "kernel peak RSS (VmHWM) reset at start"
        else:
            self.method = "RSS sampled every 2 ms"
            self.peak = self.baseline
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, _rss_bytes())

    def __exit__(self, *exc: object) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, _rss_bytes())
        else:
            self.peak = _status_kb("VmHWM") * 1024

    @property
    def delta(self) -> int:
        return max(0, self.peak - self.baseline)


def _status_kb(key: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def _rss_bytes() -> int:
    try:
        return _status_kb("VmRSS") * 1024
    except (OSError, KeyError):
        try:
            import psutil
            return int(psutil.Process().memory_info().rss)
        except ImportError:
            import resource
            return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        _status_kb("VmHWM")
        return True
    except (OSError, KeyError):
        return False


# -- inputs -------------------------------------------------------------------

def random_input(shape: list[Any], dtype: Any, seed: int = 0) -> np.ndarray:
    """A fixed pseudo-random tensor in the model's own dtype (dynamic dims -> 1)."""
    shape = [int(d) if isinstance(d, (int, np.integer)) and d > 0 else 1 for d in shape]
    rng = np.random.default_rng(seed)
    dt = np.dtype(dtype)
    if np.issubdtype(dt, np.integer):
        info = np.iinfo(dt)
        return rng.integers(info.min, int(info.max) + 1, size=shape, dtype=dt)
    return rng.standard_normal(shape).astype(dt)


# -- the timing loop shared by every runtime ------------------------------------

def _timed_runs(run: Callable[[], Any], runs: int, warmup: int, marker: Marker | None
                ) -> tuple[float, list[float]]:
    """First inference time and the timed runs after ``warmup`` more (all in ms)."""
    mark = marker or (lambda code: None)
    times = []
    first = 0.0
    for i in range(1 + warmup + runs):
        mark(MARK_RUN_BEGIN)
        t0 = time.perf_counter()
        run()
        dt = (time.perf_counter() - t0) * 1e3
        mark(MARK_RUN_END)
        if i == 0:
            first = dt
        elif i > warmup:
            times.append(dt)
    return first, times


def host_description() -> dict[str, Any]:
    info: dict[str, Any] = {"machine": platform.machine(), "system": platform.system(),
                            "python": platform.python_version(), "cpus": os.cpu_count()}
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                key = line.split(":")[0].strip()
                if key in ("model name", "Hardware", "Model"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        info["board"] = Path("/proc/device-tree/model").read_text().strip("\x00\n ")
    except OSError:
        pass
    return info


# -- ONNX Runtime ---------------------------------------------------------------

def _ort_session(path: str, threads: int | None, profile_prefix: str | None = None) -> Any:
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.inter_op_num_threads = 1
    so.intra_op_num_threads = threads or 0
    if threads == 1:
        # No pool threads; spinning would only add (non-deterministic) busy-wait work.
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if profile_prefix:
        so.enable_profiling = True
        so.profile_file_prefix = profile_prefix
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def _ort_feed(session: Any) -> dict[str, np.ndarray]:
    types = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int8)": np.int8,
             "tensor(uint8)": np.uint8, "tensor(int16)": np.int16, "tensor(uint16)": np.uint16,
             "tensor(int32)": np.int32, "tensor(int64)": np.int64, "tensor(double)": np.float64}
    return {i.name: random_input(list(i.shape), types.get(i.type, np.float32), seed=n)
            for n, i in enumerate(session.get_inputs())}


def parse_ort_profile(events: list[dict[str, Any]], skip_runs: int = 0
                      ) -> tuple[list[OpTime], list[OpTime], int]:
    """Aggregate ORT's profiling JSON by op type and by node, per inference.

    Node events are ``<node>_kernel_time`` (category ``Node``) with ``args.op_name``; runs
    are the ``model_run`` session events, and the first ``skip_runs`` (warm-up) are
    dropped. A node's time is the *median* over runs of its time in each run: on a shared
    machine one preempted kernel would otherwise dominate a mean. Returns (by type, by
    node, number of runs counted).
    """
    import bisect
    runs = sorted((e["ts"], e["ts"] + e["dur"]) for e in events
                  if e.get("cat") == "Session" and e.get("name") == "model_run")[skip_runs:]
    if not runs:
        return [], [], 0
    starts = [r[0] for r in runs]
    per_run: dict[str, list[Any]] = {}          # node -> [op type, [ms per run], [calls per run]]
    for e in events:
        if e.get("cat") != "Node" or not str(e.get("name", "")).endswith("_kernel_time"):
            continue
        i = bisect.bisect_right(starts, e["ts"]) - 1
        if i < 0 or e["ts"] > runs[i][1]:
            continue
        node = e["name"][: -len("_kernel_time")]
        rec = per_run.setdefault(node, [e.get("args", {}).get("op_name", "?"),
                                        [0.0] * len(runs), [0] * len(runs)])
        rec[1][i] += e["dur"] / 1e3
        rec[2][i] += 1
    nodes = {k: (t, float(np.median(ms)), max(1, int(np.median(calls))))
             for k, (t, ms, calls) in per_run.items()}
    by_type, by_node = _op_tables(nodes)
    return by_type, by_node, len(runs)


def _op_tables(nodes: dict[str, tuple[str, float, int]]) -> tuple[list[OpTime], list[OpTime]]:
    """(by type, by node) from {node: (op type, ms per inference, calls per inference)}."""
    total = sum(ms for _, ms, _ in nodes.values()) or 1.0
    by_node = sorted((OpTime(name, t, ms, 100 * ms / total, calls) for name, (t, ms, calls) in nodes.items()),
                     key=lambda o: -o.ms)
    agg: dict[str, list[float]] = {}
    for t, ms, _ in nodes.values():
        a = agg.setdefault(t, [0.0, 0])
        a[0] += ms
        a[1] += 1
    by_type = sorted((OpTime(t, t, ms, 100 * ms / total, int(c)) for t, (ms, c) in agg.items()),
                     key=lambda o: -o.ms)
    return by_type, by_node


def profile_onnxruntime(path: str, *, runs: int, warmup: int, threads: int | None,
                        op_profile: bool = True, marker: Marker | None = None) -> dict[str, Any]:
    import onnxruntime as ort
    mark = marker or (lambda code: None)
    if marker is not None:
        # ORT's telemetry thread would add instructions that drift run to run.
        ort.disable_telemetry_events()
    with PeakMemory() as mem:
        mark(MARK_INIT_BEGIN)
        t0 = time.perf_counter()
        try:
            session = _ort_session(path, threads)
        except Exception as exc:   # ORT raises its own Fail/InvalidGraph/... types
            raise _prepare_error("onnxruntime", path, exc) from None
        init_ms = (time.perf_counter() - t0) * 1e3
        mark(MARK_INIT_END)
        feed = _ort_feed(session)
        names = [o.name for o in session.get_outputs()]
        first, times = _timed_runs(lambda: session.run(names, feed), runs, warmup, marker)
    out: dict[str, Any] = {"runtime": f"onnxruntime {ort.__version__} (CPUExecutionProvider)",
                           "init_ms": init_ms, "first_inference_ms": first, "times_ms": times,
                           "peak_memory_bytes": mem.delta, "memory_note": f"RSS growth; {mem.method}"}
    del session
    if op_profile:
        # A separate session: profiling adds overhead that must not reach the timed runs.
        n_prof = max(1, min(runs, 10))
        with tempfile.TemporaryDirectory() as tmp:
            s = _ort_session(path, threads, profile_prefix=str(Path(tmp) / "ort"))
            for _ in range(1 + n_prof):
                s.run(names, feed)
            prof_file = s.end_profiling()
            events = json.loads(Path(prof_file).read_text())
        by_type, by_node, n = parse_ort_profile(events, skip_runs=1)
        out["ops_by_type"], out["ops_by_node"] = by_type, by_node
        out["op_profile_note"] = (f"ONNX Runtime profiler (enable_profiling): median kernel time over {n} "
                                  "runs after 1 warm-up, in a separate session")
    return out


# -- LiteRT ---------------------------------------------------------------------

def _litert_interpreter_class() -> tuple[Any, str]:
    try:
        from ai_edge_litert.interpreter import Interpreter
        from importlib import metadata
        try:
            version = metadata.version("ai-edge-litert")
        except metadata.PackageNotFoundError:
            version = "?"
        return Interpreter, f"LiteRT (ai-edge-litert {version}) interpreter"
    except ImportError:
        from tflite_runtime.interpreter import Interpreter  # optional fallback
        return Interpreter, "tflite-runtime interpreter"


def profile_litert(path: str, *, runs: int, warmup: int, threads: int | None,
                   op_profile: bool = True, marker: Marker | None = None) -> dict[str, Any]:
    Interpreter, label = _litert_interpreter_class()
    mark = marker or (lambda code: None)
    with PeakMemory() as mem:
        mark(MARK_INIT_BEGIN)
        t0 = time.perf_counter()
        try:
            interp = Interpreter(model_path=path, num_threads=threads if threads else None)
            interp.allocate_tensors()
        except (RuntimeError, ValueError) as exc:
            # XNNPACK can refuse a model the builtin kernels run (see LiteRTRunner._make);
            # benchmark_model falls back the same way.
            try:
                from ai_edge_litert.interpreter import OpResolverType
                interp = Interpreter(model_path=path, num_threads=threads if threads else None,
                                     experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
                interp.allocate_tensors()
            except (ImportError, RuntimeError, ValueError):
                raise _prepare_error(label, path, exc) from None
            label += " (XNNPACK refused the model: builtin kernels)"
        init_ms = (time.perf_counter() - t0) * 1e3
        mark(MARK_INIT_END)
        for n, d in enumerate(interp.get_input_details()):
            interp.set_tensor(d["index"], random_input(list(d["shape"]), d["dtype"], seed=n))
        first, times = _timed_runs(interp.invoke, runs, warmup, marker)
    return {"runtime": label, "init_ms": init_ms, "first_inference_ms": first, "times_ms": times,
            "peak_memory_bytes": mem.delta, "memory_note": f"RSS growth; {mem.method}",
            "ops_by_type": [], "ops_by_node": [],
            "op_profile_note": ("per-op time is not available from the LiteRT Python interpreter; "
                                "run benchmark_model --enable_op_profiling=true (adb:// devices do)")}


# -- ExecuTorch -------------------------------------------------------------------

# ExecuTorch's ScalarType codes (c10) of the dtypes a .pte input can have here.
EXECUTORCH_DTYPES = {0: np.uint8, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.int64, 5: np.float16,
                     6: np.float32, 7: np.float64, 11: np.bool_}
_executorch_default_threads: list[int] = []
_executorch_pool_resets = [0]      # see executorch_pool_generation


def executorch_threads(threads: int | None) -> int:
    """Size ExecuTorch's thread pool (the one XNNPACK runs on) and return it.

    The pool is process-wide and its Python binding can only *reset* it
    (``_unsafe_reset_threadpool``, marked experimental); ``None`` restores the size it had
    when first seen here (the runtime's default: one thread per core), so one runner's
    ``--threads`` does not leak into the next profile. Resetting prints (from C++, through
    pybind11's redirection to Python's ``sys.stderr``); captured.
    """
    from exporters.native_output import quiet
    # all of it captured: the import loads torchao (which prints the CUDA kernels it lacks),
    # the first pool query runs cpuinfo (which prints what it cannot read, from C++), and a
    # reset prints its "Resetting threadpool" line through Python's sys.stderr
    with quiet():
        import executorch.extension.pybindings.portable_lib as pl
        if not _executorch_default_threads:
            _executorch_default_threads.append(int(pl._threadpool_get_thread_count()))
        want = int(threads) if threads else _executorch_default_threads[0]
        if pl._threadpool_get_thread_count() != want:
            pl._unsafe_reset_threadpool(want)
            _executorch_pool_resets[0] += 1
        return int(pl._threadpool_get_thread_count())


def executorch_pool_generation() -> int:
    """How many times ``executorch_threads`` has reset the pool. A method loaded before a
    reset keeps XNNPACK's pointer to the old pool, and executing it then aborts or segfaults
    the process (seen in CI when the free cores changed between two runners' loads): a
    holder of a loaded method compares this with the value at its load and reloads."""
    return _executorch_pool_resets[0]


def profile_executorch(path: str, *, runs: int, warmup: int, threads: int | None,
                       op_profile: bool = True, marker: Marker | None = None) -> dict[str, Any]:
    """Latency of a ``.pte`` through ``executorch.runtime``: init is program load plus
    method load (XNNPACK builds its delegate there), then the timed ``execute`` calls on a
    fixed random input in the program's own dtype and shape."""
    import torch

    from exporters.executorch import METHOD, executorch_version, runtime_call
    from exporters.native_output import quiet
    from models.errors import InputError
    mark = marker or (lambda code: None)
    with quiet():
        from executorch.runtime import Runtime
        runtime = Runtime.get()
        used = executorch_threads(threads)
    with PeakMemory() as mem:
        mark(MARK_INIT_BEGIN)
        t0 = time.perf_counter()
        try:
            method = runtime_call(lambda: runtime.load_program(path).load_method(METHOD), path,
                                  "a program the ExecuTorch runtime loads")
        except InputError as exc:     # check_file refuses a broken file before any profile
            raise _prepare_error("ExecuTorch", path, RuntimeError(exc.found)) from None
        init_ms = (time.perf_counter() - t0) * 1e3
        mark(MARK_INIT_END)
        meta = method.metadata
        feed = []
        for n in range(meta.num_inputs()):
            info = meta.input_tensor_meta(n)
            x = random_input(list(info.sizes()), EXECUTORCH_DTYPES.get(info.dtype(), np.float32), seed=n)
            feed.append(torch.from_numpy(x))
        first, times = _timed_runs(lambda: method.execute(feed), runs, warmup, marker)
    return {"runtime": f"ExecuTorch {executorch_version()} (XNNPACK delegate, threads={used}"
                       f"{'' if threads else ', runtime default'})",
            "init_ms": init_ms, "first_inference_ms": first, "times_ms": times,
            "peak_memory_bytes": mem.delta, "memory_note": f"RSS growth; {mem.method}",
            "ops_by_type": [], "ops_by_node": [],
            "op_profile_note": ("per-op time is not collected for .pte files: it needs an ETDump "
                                "(load_program(enable_etdump=True)) read by executorch.devtools' Inspector, "
                                "not wired in")}


def measure(fmt: str, path: str, *, runs: int, warmup: int, threads: int | None,
            op_profile: bool = True, marker: Marker | None = None) -> dict[str, Any]:
    """Raw measurements of one model file (the part that runs where the model runs), by
    the profiler of the runner that loads ``fmt`` (``Runner.profile``)."""
    from device_tests.runners.base import runner_for_format
    try:
        runner = runner_for_format(fmt)
    except KeyError:
        raise NotProfilable(f"no local profiler for format {fmt!r}") from None
    if runs < 1 or warmup < 0:
        raise ValueError("runs must be >= 1 and warmup >= 0")
    return runner.profile(path, runs=runs, warmup=warmup, threads=threads,
                          op_profile=op_profile, marker=marker)


def build_profile(artifact: Any, raw: dict[str, Any], *, device: str, measured_on: str,
                  runs: int, warmup: int, threads: int | None, size_bytes: int | None,
                  device_info: dict[str, Any] | None = None) -> Profile:
    times = raw.get("times_ms") or []
    return Profile(
        artifact=artifact.key, path=artifact.path, format=artifact.format, precision=artifact.precision,
        runtime=raw.get("runtime", ""), device=device, measured_on=measured_on, runs=runs,
        warmup=warmup, threads=threads,
        latency=LatencyStats.from_times(times) if times else None,
        first_inference_ms=raw.get("first_inference_ms"), init_ms=raw.get("init_ms"),
        peak_memory_bytes=raw.get("peak_memory_bytes"), memory_note=raw.get("memory_note", ""),
        artifact_size_bytes=size_bytes,
        ops_by_type=[o if isinstance(o, OpTime) else OpTime(**o) for o in raw.get("ops_by_type", [])],
        ops_by_node=[o if isinstance(o, OpTime) else OpTime(**o) for o in raw.get("ops_by_node", [])],
        op_profile_note=raw.get("op_profile_note", ""), device_info=device_info or {})


def profile_local(artifact: Any, root: str | Path, *, runs: int = 50, warmup: int = 5,
                  threads: int | None = None, op_profile: bool = True) -> Profile:
    """Profile ``artifact`` (relative to the export folder ``root``) in this process."""
    from exporters.artifact import size_of
    path = artifact.resolve(root)
    raw = measure(artifact.format, str(path), runs=runs, warmup=warmup, threads=threads,
                  op_profile=op_profile)
    info = host_description()
    return build_profile(artifact, raw, device="local", measured_on=f"local {info['machine']}",
                         runs=runs, warmup=warmup, threads=threads, size_bytes=size_of(path),
                         device_info=info)
