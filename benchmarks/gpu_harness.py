"""Guards and measurements for benchmarks/gpu_check.py: a part that fails or cannot run on this
host is reported, not raised, and each part has a hard time limit; timings synchronise the GPU."""

from __future__ import annotations

import contextlib
import gc
import resource
import signal
import statistics
import time
import traceback

import torch


class Unavailable(Exception):
    """The part cannot run here; the message is its status ("not available: ...")."""


class OverBudget(Exception):
    """A part ran past its hard time limit."""


@contextlib.contextmanager
def time_box(seconds: float):
    """Raise OverBudget in the main thread after ``seconds`` (a hard stop for a stuck part)."""
    def on_alarm(_sig, _frame):
        raise OverBudget(f"over its {seconds:.0f} s budget")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def run_part(summary: dict, name: str, budget: float, fn) -> dict:
    t0 = time.perf_counter()
    try:
        with time_box(budget):
            entry = {"status": "ok", **fn(time.perf_counter() + budget)}
    except Unavailable as e:
        entry = {"status": str(e)}
    except BaseException as e:  # noqa: BLE001 - a part's failure must not stop the others
        if isinstance(e, KeyboardInterrupt):
            raise
        entry = {"status": f"failed: {type(e).__name__}: {e}",
                 "traceback": traceback.format_exc(limit=8)}
    entry["seconds"] = round(time.perf_counter() - t0, 2)
    summary["parts"][name] = entry
    print(f"[gpu_check] {name}: {entry['status']} ({entry['seconds']} s)", flush=True)
    free_memory()
    return entry


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def cpu_only(what: str) -> None:
    if not torch.cuda.is_available():
        raise Unavailable(f"not applicable on CPU: {what}")


def te_import_error() -> str | None:
    """Why Transformer Engine's PyTorch layer cannot be used here (None when it can)."""
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception as e:  # noqa: BLE001 - ImportError, or OSError from a missing library
        return f"transformer_engine.pytorch does not import ({type(e).__name__}: {e})"
    return None


def need_te(what: str, fp8: bool = False) -> None:
    cpu_only(f"{what} needs Transformer Engine on a CUDA GPU")
    err = te_import_error()
    if err:
        raise Unavailable(f"not available: {err}")
    if fp8 and torch.cuda.get_device_capability() < (8, 9):
        raise Unavailable(f"not available: {torch.cuda.get_device_name()} has no FP8 tensor cores "
                          "(compute capability < 8.9)")


# ------------------------------------------------------------------ measuring
def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def median_time(fn, reps: int) -> float:
    fn()  # warm-up: kernels chosen, workspaces allocated
    sync()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        sync()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def matmul_tflops(n: int, fp8: bool = False, reps: int = 30) -> float:
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator(device=dev).manual_seed(0)  # random data: zeros run faster than real data
    a = torch.randn(n, n, device=dev, generator=g, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=dev, generator=g, dtype=torch.bfloat16)
    if fp8:
        a8, b8 = a.to(torch.float8_e4m3fn), b.to(torch.float8_e4m3fn).t()  # column-major B
        one = torch.ones((), device=dev)
        fn = lambda: torch._scaled_mm(a8, b8, scale_a=one, scale_b=one, out_dtype=torch.bfloat16)
    else:
        fn = lambda: a @ b
    return 2 * n ** 3 / median_time(fn, reps) / 1e12


def peak_memory(reset: bool = False) -> dict:
    if torch.cuda.is_available():
        if reset:
            torch.cuda.reset_peak_memory_stats()
        return {"peak_mem_gib": torch.cuda.max_memory_allocated() / 2 ** 30,
                "peak_mem_kind": "torch.cuda.max_memory_allocated"}
    return {"peak_mem_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20,
            "peak_mem_kind": "process RSS high-water mark (CPU)"}
