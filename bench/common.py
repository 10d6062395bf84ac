"""What the benchmarks share: loading a script, timing on the GPU, and the ops a script runs."""
import importlib.util
import os
import sys
import types

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # the scripts import fast_ops.py from beside themselves


def load_script(path: str, name: str = "script"):
    """A training script (a path from the repository root, or absolute) as a module, with the fast_ops.py beside
    it: another version's, for a script of another checkout."""
    path = os.path.join(ROOT, path)
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # compiled code looks its functions up by module name
    ours = sys.modules.pop("fast_ops", None)
    sys.path.insert(0, os.path.dirname(os.path.abspath(path)))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.pop(0)
        if ours is not None:
            sys.modules["fast_ops"] = ours
    return module


def kernels_of(script):
    """Where a script's drop-ins and kernels live: the fast_ops.py it imported, or, for a version from before
    fast_ops.py, the script itself (its own fast-ops section)."""
    return script.fast_ops if isinstance(getattr(script, "fast_ops", None), types.ModuleType) else script


def gpu_tool(tool: str, script_path: str):
    """The start of a GPU-only benchmark: refused without CUDA; returns the script, its default configuration, the
    device and a seeded generator on it."""
    if not torch.cuda.is_available():
        sys.exit(f"bench/{tool} needs a CUDA GPU (it times kernels at the model's full size)")
    script = load_script(script_path)
    device = torch.device("cuda")
    return script, script.Config(), device, torch.Generator(device=device).manual_seed(0)


def chosen_op(script, name: str, device: torch.device):
    """Op `name` as the script runs it on `device` (select_ops), or for a version from before fast_ops.py (its
    kernels in a fast-ops section of its own), as that version ran it."""
    if hasattr(script, "select_ops"):
        return script.select_ops(script.Config(), device)[0][name]
    return script.gram if name == "gram" else getattr(script.fast_ops(script.Config()), name)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative difference of two tensors (Frobenius norms, float32)."""
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def median_ms(fn, reps: int) -> float:
    """Median of CUDA-event timings of `fn`, after three warm-up calls."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return float(np.median(times))


def gpu_ms(fn, reps: int = 20) -> float:
    """GPU time per call, the sum of its kernels' durations from the profiler. median_ms of a single short
    kernel also times the host's launch (the start event runs while the host is still launching): a Triton
    launch is 0.03-0.1 ms. After a profiler has run, the process's later launches are slower: time with
    median_ms first."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    return sum(e.self_device_time_total for e in events) / 1000 / reps
