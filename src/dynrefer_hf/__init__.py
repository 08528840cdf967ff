"""dynrefer_hf: DynRefer region-level vision-language models as native Hugging Face Transformers models.

Importing this package registers the ``dynrefer`` model type with the Auto classes and the
``region-captioning`` pipeline task, so no ``trust_remote_code`` is needed.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
