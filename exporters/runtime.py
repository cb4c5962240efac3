"""ONNX Runtime sessions, created the same way for verification, benchmarks and prediction."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}


def available_providers() -> list[str]:
    """Short names (``cpu``, ``cuda``) of the execution providers this onnxruntime build offers."""
    have = set(ort.get_available_providers())
    return [k for k, v in PROVIDERS.items() if v in have]


def timed_providers() -> list[str]:
    """The providers the benchmarks (``best``, ``rungs``) time by default: ``cpu``, and ``cuda`` where this onnxruntime
    build offers it and a GPU is there (PyTorch sees one)."""
    import torch  # here, not at the top: ``bench predict`` runs sessions without importing PyTorch

    return [p for p in available_providers() if p == "cpu" or torch.cuda.is_available()]


def session(path: str | Path, provider: str = "cpu", threads: int | None = None, spinning: bool = False) -> Any:
    """An ``onnxruntime.InferenceSession`` with all graph optimizations.

    ``threads``: intra-op threads (None: onnxruntime's default, one per physical core);
    inter-op threads are 1 (the graphs are sequential).  ``spinning=False`` lets idle pool
    threads sleep instead of busy-waiting: slower by a few microseconds per call on an idle
    machine, much faster on a shared one.
    """
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.inter_op_num_threads = 1
    if threads:
        so.intra_op_num_threads = int(threads)
    so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    so.log_severity_level = 3  # errors only
    providers = [PROVIDERS[provider]] + (["CPUExecutionProvider"] if provider != "cpu" else [])
    return ort.InferenceSession(str(path), so, providers=providers)


def provider_session(path: str | Path, provider: str, threads: int | None = None) -> Any:
    """:func:`session` on exactly ``provider``: RuntimeError when onnxruntime fell back to another one (a timing of
    the CPU provider must not be reported as CUDA's)."""
    sess = session(path, provider, threads)
    if sess.get_providers()[0] != PROVIDERS[provider]:
        raise RuntimeError(f"onnxruntime fell back from {provider} to {sess.get_providers()[0]}")
    return sess


def run_batched(sess: Any, x: np.ndarray, batch: int) -> np.ndarray:
    """The session's first output for all of ``x`` (N, ...), ``batch`` images per call; float32."""
    name = sess.get_inputs()[0].name
    outs = [sess.run(None, {name: np.ascontiguousarray(x[i : i + batch])})[0] for i in range(0, len(x), batch)]
    return np.concatenate(outs).astype(np.float32, copy=False)
