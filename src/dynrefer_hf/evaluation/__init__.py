"""Running a model over a region dataset and scoring it; the paper's benchmark protocols (``dynrefer eval``).

Names are imported on first use, so that ``dynrefer eval --help`` (which needs only `BENCHMARK_TASKS`) answers
without importing torch and the metrics (docs/reliability.md, startup).
"""

import importlib

# public name -> the submodule that defines it
_EXPORTS = {
    "BENCHMARK_TASKS": "tasks",
    "BenchmarkTask": "tasks",
    "Scoring": "tasks",
    "get_task": "tasks",
    "register_task": "tasks",
    "BenchmarkRun": "benchmark",
    "OutputFolderError": "benchmark",
    "rescore_result_file": "benchmark",
    "run_benchmark": "benchmark",
    "ResultFileError": "protocols",
    "format_metrics_table": "protocols",
    "score_result": "protocols",
    "RegionEvaluation": "regions",
    "evaluate_regions": "regions",
    "predict_regions": "regions",
}

__all__ = sorted(_EXPORTS)  # noqa: PLE0605 (the lazily imported names, listed once in _EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
