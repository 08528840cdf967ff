"""Region datasets: the shared record schema (docs/data.md)."""

from .._deprecation import moved_module
from .schema import ATTRIBUTE_IGNORE, RegionVocabulary, region_features, validate_region_record

__all__ = ["ATTRIBUTE_IGNORE", "RegionVocabulary", "region_features", "validate_region_record"]

# The shapes scenes moved to `dynrefer_hf.shapes`.
__getattr__ = moved_module(__name__, "dynrefer_hf.shapes")
