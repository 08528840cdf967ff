"""Running a model over a region dataset and scoring it; the paper's benchmark protocols (``dynrefer eval``)."""

from .benchmark import BenchmarkRun, rescore_result_file, run_benchmark
from .protocols import BENCHMARK_TASKS, BenchmarkTask, ResultFileError, format_metrics_table, score_result
from .regions import RegionEvaluation, evaluate_regions, predict_regions

__all__ = [
    "BENCHMARK_TASKS",
    "BenchmarkRun",
    "BenchmarkTask",
    "RegionEvaluation",
    "ResultFileError",
    "evaluate_regions",
    "format_metrics_table",
    "predict_regions",
    "rescore_result_file",
    "run_benchmark",
    "score_result",
]
