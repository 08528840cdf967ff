"""The model card (README.md) written next to a converted model."""

from __future__ import annotations

__all__ = ["PAPER_SCORES", "render_model_card"]

# Upstream README / docs/upstream/evaluation.md §7: (benchmark, released checkpoint, metric).
PAPER_SCORES = (
    ("VG v1.2 dense captioning (GT boxes)", "vg1.2_5e", "mAP 47.6"),
    ("VG region captioning", "vg1.2_5e", "METEOR 21.2, CIDEr 190.5"),
    ("RefCOCOg region captioning", "refcocog_ft", "METEOR 18.1, CIDEr 115.3"),
    ("OVAD attribute detection (box oracle)", "vg1.2_5e", "mAP 29.2"),
    ("COCO region recognition (box inputs)", "vg1.2_5e", "accuracy 91.8"),
)

LICENCES = (
    ("DynRefer code and trained weights (Q-Former, projection, alignment, fusion, heads)", "Apache-2.0"),
    ("BLIP-2 / LAVIS (`ln_vision`, `query_tokens`)", "BSD-3-Clause"),
    ("EVA ViT-g and EVA-CLIP text tower", "MIT"),
    ("Flan-T5-XL", "Apache-2.0"),
    ("RAM tag list (`clip_embeds` rows, `config.tag_names`)", "Apache-2.0"),
    ("COCO class names (`ov_embeds` rows)", "CC BY 4.0"),
    ("OVAD attribute prompts (`att_embeds` rows, `config.attribute_*`)", "CC BY-NC-SA 4.0 (non-commercial)"),
)

CITATION = """@inproceedings{zhao2025dynrefer,
  title     = {DynRefer: Delving into Region-level Multimodal Tasks via Dynamic Resolution},
  author    = {Zhao, Yuzhong and Liu, Feng and Liu, Yue and Liao, Mingxiang and Gong, Chen and Ye, Qixiang
               and Wan, Fang},
  booktitle = {Proceedings of the IEEE/CVF Conference on Computer Vision and Pattern Recognition (CVPR)},
  year      = {2025},
  note      = {arXiv:2405.16071}
}"""


def render_model_card(
    repo_id: str, checkpoint_name: str, language_model_dtype: str, report_summary: str, has_text_encoder: bool
) -> str:
    """Markdown of the model card, with Hub metadata front matter."""
    scores = "\n".join(
        f"| {task} | `{ckpt}.pth` | {metric} |{' **this checkpoint**' if ckpt == checkpoint_name else ''}"
        for task, ckpt, metric in PAPER_SCORES
    )
    licences = "\n".join(f"| {part} | {licence} |" for part, licence in LICENCES)
    vocabulary = (
        "The EVA-CLIP text tower is included (`model.text_encoder`), with its tokenizer in `clip_tokenizer/`, so\n"
        "vocabularies can be replaced:\n\n"
        "```python\nfrom transformers import AutoTokenizer\n\n"
        f'clip_tokenizer = AutoTokenizer.from_pretrained("{repo_id}", subfolder="clip_tokenizer")\n'
        'model.set_vocabulary(tags=["dog", "frisbee"], tokenizer=clip_tokenizer)\n```\n'
        if has_text_encoder
        else "The label tables are stored precomputed; this folder holds no text tower, so vocabularies are fixed\n"
        "(convert with `--keep-text-encoder` to be able to change them).\n"
    )
    return f"""---
library_name: transformers
license: other
license_name: mixed
pipeline_tag: image-text-to-text
tags:
- dynrefer
- region-captioning
- dense-captioning
- blip-2
---

# DynRefer (Flan-T5-XL), `{checkpoint_name}`

DynRefer (CVPR 2025, [arXiv:2405.16071](https://arxiv.org/abs/2405.16071)) describes image regions: a caption
with its score, tags, attribute scores and an open-vocabulary class for every box. Each region is seen
through several nested views around it; an EVA ViT-g encodes them, a deformable alignment module and an MLP
fuse them, a BLIP-2 Q-Former summarises the region and Flan-T5-XL writes the caption, steered by the
predicted tags.

These weights were converted from the authors' released `{checkpoint_name}.pth` with `dynrefer convert`
(package `dynrefer_hf`); the frozen parts come from LAVIS's BLIP-2 Flan-T5-XL and EVA ViT-g, `google/flan-t5-xl`
and BAAI's EVA-CLIP. The language model is stored in {language_model_dtype}, everything else in float32.

## Usage

```python
import dynrefer_hf  # registers the model type and the "region-captioning" task
from transformers import pipeline

describe = pipeline("region-captioning", model="{repo_id}")
describe("photo.jpg", boxes=[[48, 120, 310, 400]])
# [{{"box": [...], "caption": "...", "score": ..., "tags": [...], "attributes": [...], "label": {{...}}}}]
```

or with the model and processor directly:

```python
from transformers import AutoModel, AutoProcessor

model = AutoModel.from_pretrained("{repo_id}")
processor = AutoProcessor.from_pretrained("{repo_id}")
inputs = processor(images=image, boxes=[[48, 120, 310, 400]])
records = processor.post_process_region_captioning(model.generate(**inputs), inputs, model.config)[0]
```

From the shell: `dynrefer caption photo.jpg --box 48,120,310,400 --model {repo_id}`.

{vocabulary}
Transformers loads every weight in one dtype (float32 by default). On a GPU the model runs the ViT under fp16
and the heads under bf16 autocast as upstream; call `model.to_upstream_precision()` after loading to put
Flan-T5 back in bfloat16 too (the stored values are exactly upstream's). On CPU everything runs in float32,
so captions can differ slightly. Upstream orders the tags in the control prompt by Python `set`
iteration (hash-seed dependent); this port uses tag-list order, so captions are reproducible but can
differ from any single upstream run.

## Reported results (upstream README, released checkpoints)

| benchmark | checkpoint | score |
|---|---|---|
{scores}

## Conversion

```
{report_summary}
```

## Licences

| part | licence |
|---|---|
{licences}

The attribute table derives from OVAD (CC BY-NC-SA 4.0): attribute outputs are for non-commercial use.

## Citation

```bibtex
{CITATION}
```
"""
