"""Running a model over a region dataset and scoring it."""

from .regions import RegionEvaluation, evaluate_regions, predict_regions

__all__ = ["RegionEvaluation", "evaluate_regions", "predict_regions"]
