"""dynrefer_hf: DynRefer region-level vision-language models as native Hugging Face Transformers models.

Importing this package registers the ``dynrefer`` model type with the Auto classes and the
``region-captioning`` pipeline task, so no ``trust_remote_code`` is needed.
"""

from transformers import AutoConfig, AutoImageProcessor, AutoModel, AutoModelForImageTextToText, AutoProcessor

from .configuration_dynrefer import DynReferConfig
from .image_processing_dynrefer import DynReferImageProcessor
from .modeling_dynrefer import DynReferForRegionCaptioning, DynReferOutput, DynReferPreTrainedModel
from .pipelines import RegionCaptioningPipeline, register_pipeline
from .processing_dynrefer import DynReferProcessor
from .visualize import draw_regions, draw_views

__version__ = "0.1.0"

__all__ = [
    "DynReferConfig",
    "DynReferForRegionCaptioning",
    "DynReferImageProcessor",
    "DynReferOutput",
    "DynReferPreTrainedModel",
    "DynReferProcessor",
    "RegionCaptioningPipeline",
    "__version__",
    "draw_regions",
    "draw_views",
]

AutoConfig.register(DynReferConfig.model_type, DynReferConfig, exist_ok=True)
AutoModel.register(DynReferConfig, DynReferForRegionCaptioning, exist_ok=True)
AutoModelForImageTextToText.register(DynReferConfig, DynReferForRegionCaptioning, exist_ok=True)
AutoImageProcessor.register(DynReferConfig, image_processor_classes={"pil": DynReferImageProcessor}, exist_ok=True)
AutoProcessor.register(DynReferConfig, DynReferProcessor, exist_ok=True)
register_pipeline()
