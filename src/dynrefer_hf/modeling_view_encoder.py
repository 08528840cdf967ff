"""The view encoder (docs/upstream/model.md §2-§5): every view of every region through the BLIP-2 vision tower
(identical views once), the target box RoI-aligned in every view, views 1..V-1 aligned to view 0 by a
DCNv4-style module, and the V views fused by an MLP into one token sequence per region.

`DynReferViewEncoderMixin` holds the parameters on the model itself (`vision_model`, `cvem_align`, `cvem_mlp`:
the checkpoint's key names) and the methods that use them.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from transformers import initialization as init
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.blip_2.modeling_blip_2 import Blip2VisionModel

from .configuration_dynrefer import DynReferConfig
from .modeling_common import torch_default_init
from .ops import offset_resample, roi_align

__all__ = ["DynReferRegionAlign", "DynReferViewEncoderMixin", "unique_views"]


class DynReferRegionAlign(nn.Module):
    """Cross-view alignment with DCNv4 semantics (upstream `CustomDCNv4`, docs/upstream/model.md §4).

    The moving view's values are resampled at offsets and with raw modulation masks predicted, per position,
    from a grouped depthwise conv over `[moving | reference]` channels. `offset_mask` starts at zero, so the
    output is exactly zero at initialisation.
    """

    def __init__(
        self,
        channels: int,
        group: int = 4,
        kernel_size: int = 3,
        offset_scale: float = 1.0,
        dw_kernel_size: int = 3,
    ):
        super().__init__()
        if channels % group:
            raise ValueError(f"channels ({channels}) must be divisible by group ({group})")
        self.channels = channels
        self.group = group
        self.kernel_size = kernel_size
        self.offset_scale = offset_scale
        # groups=channels: output channel c reads input channels 2c and 2c+1 of the concatenation (§4.3).
        self.offset_mask_dw = nn.Conv2d(
            2 * channels,
            channels,
            dw_kernel_size,
            stride=1,
            padding=(dw_kernel_size - 1) // 2,
            groups=channels,
        )
        self.offset_mask = nn.Linear(channels, math.ceil(group * kernel_size**2 * 3 / 8) * 8)
        self.value_proj = nn.Linear(channels, channels)
        self.output_proj = nn.Linear(channels, channels)

    def forward(self, moving: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
        """Align `moving` `[N, C, H, W]` to `reference` `[N, C, H, W]`; returns `[N, C, H, W]`."""
        value = self.value_proj(moving.permute(0, 2, 3, 1))  # [N, H, W, C]
        guide = self.offset_mask_dw(torch.cat([moving, reference], dim=1))  # moving first (§4.3)
        offset_mask = self.offset_mask(guide.permute(0, 2, 3, 1))  # [N, H, W, 112]
        sampled = offset_resample(
            value,
            offset_mask.to(value.dtype),
            kernel_size=self.kernel_size,
            stride=1,
            padding=(self.kernel_size - 1) // 2,
            dilation=1,
            group=self.group,
            offset_scale=self.offset_scale,
        )
        return self.output_proj(sampled).permute(0, 3, 1, 2)



def unique_views(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The distinct images of ``images`` ``[N, 3, S, S]``: ``(first_index [U], inverse [N])`` with
    ``images[first_index][inverse]`` equal to ``images``, or ``None`` when all N differ.

    Equal views are bit-identical (the image processor writes one crop into every slot that shares it), so they
    are found exactly: candidates by a strided sample of their pixels, confirmed by comparing every pixel.
    """
    flat = images.flatten(1)
    stride = max(flat.shape[1] // 1024, 1)
    sample = flat[:, ::stride].detach().contiguous().cpu().view(torch.uint8).numpy()  # raw bytes: any dtype
    groups: dict[bytes, list[int]] = {}
    first_index, inverse = [], []
    for index in range(flat.shape[0]):
        candidates = groups.setdefault(sample[index].tobytes(), [])
        match = next((u for u in candidates if torch.equal(flat[first_index[u]], flat[index])), None)
        if match is None:
            match = len(first_index)
            first_index.append(index)
            candidates.append(match)
        inverse.append(match)
    if len(first_index) == flat.shape[0]:
        return None
    device = images.device
    return torch.tensor(first_index, device=device), torch.tensor(inverse, device=device)


def _expand_rows(outputs: BaseModelOutputWithPooling, inverse: torch.Tensor) -> BaseModelOutputWithPooling:
    """The vision tower's outputs over the distinct views, given back for every view (row ``inverse[i]``)."""
    expanded = {}
    for key, value in outputs.items():
        if isinstance(value, tuple):
            expanded[key] = tuple(item[inverse] for item in value)
        else:
            expanded[key] = value[inverse]
    return BaseModelOutputWithPooling(**expanded)


class DynReferViewEncoderMixin:
    """Views -> fused visual tokens, for `DynReferForRegionCaptioning`."""

    def _build_vision_tower(self, config: DynReferConfig) -> None:
        self.vision_model = Blip2VisionModel._from_config(config.vision_config)
        # upstream's ln_vision uses PyTorch's default eps 1e-5, not the ViT blocks' 1e-6 (docs/upstream/model.md §2)
        self.vision_model.post_layernorm.eps = config.ln_vision_eps

    def _build_view_fusion(self, config: DynReferConfig) -> None:
        vision_width = config.vision_config.hidden_size
        self.cvem_align = DynReferRegionAlign(
            vision_width,
            group=config.align_group,
            kernel_size=config.align_kernel_size,
            offset_scale=config.align_offset_scale,
            dw_kernel_size=config.align_dw_kernel_size,
        )
        self.cvem_mlp = nn.Sequential(
            nn.Linear(vision_width * config.num_views, vision_width),
            nn.ReLU(),
            nn.Linear(vision_width, vision_width),
        )

    def _init_view_alignment(self) -> None:
        align = self.cvem_align
        # upstream CustomDCNv4._reset_parameters; the depthwise conv keeps PyTorch's default init
        init.zeros_(align.offset_mask.weight)
        init.zeros_(align.offset_mask.bias)
        for linear in (align.value_proj, align.output_proj):
            init.xavier_uniform_(linear.weight)
            init.zeros_(linear.bias)
        torch_default_init(align.offset_mask_dw)

    def _init_view_fusion(self) -> None:
        # upstream builds the fusion MLP of plain nn.Linear: PyTorch's default init
        torch_default_init(self.cvem_mlp[0])
        torch_default_init(self.cvem_mlp[2])

    def _check_views(self, pixel_values: torch.Tensor, view_boxes: torch.Tensor) -> None:
        if not isinstance(pixel_values, torch.Tensor) or pixel_values.dim() != 5:
            shape = (
                list(pixel_values.shape)
                if isinstance(pixel_values, torch.Tensor)
                else type(pixel_values).__name__
            )
            raise ValueError(
                f"pixel_values must be [R, V, 3, H, W] (regions, views, channels, height, width), got {shape}"
            )
        regions, views, channels, height, width = pixel_values.shape
        size = self.config.vision_config.image_size
        if views != self.config.num_views:
            raise ValueError(
                f"pixel_values has {views} views per region but config.num_views is {self.config.num_views}"
            )
        if channels != 3 or height != size or width != size:
            raise ValueError(f"each view must be [3, {size}, {size}], got {[channels, height, width]}")
        if regions == 0:
            raise ValueError("pixel_values holds no regions (R = 0)")
        # value checks read the tensors (a host sync): eager only, skipped inside torch.compile/export
        checking_values = not torch.compiler.is_compiling()
        if not pixel_values.is_floating_point() or (
            checking_values and not bool(torch.isfinite(pixel_values).all())
        ):
            raise ValueError("pixel_values must be floating point and free of NaN/inf")
        if not isinstance(view_boxes, torch.Tensor) or tuple(view_boxes.shape) != (regions, views, 4):
            shape = (
                list(view_boxes.shape) if isinstance(view_boxes, torch.Tensor) else type(view_boxes).__name__
            )
            raise ValueError(
                f"view_boxes must be [R, V, 4] = [{regions}, {views}, 4] (x1, y1, x2, y2), got {shape}"
            )
        if not view_boxes.is_floating_point() or (
            checking_values and not bool(torch.isfinite(view_boxes).all())
        ):
            raise ValueError("view_boxes must be floating point and free of NaN/inf")
        if checking_values and bool((view_boxes[..., 2:] < view_boxes[..., :2]).any()):
            raise ValueError("view_boxes must be (x1, y1, x2, y2) with x2 >= x1 and y2 >= y1")


    def fuse_views(self, embeds: torch.Tensor, view_boxes: torch.Tensor) -> torch.Tensor:
        """RoI-Align, cross-view alignment and fusion (docs/upstream/model.md §3-§5).

        Args:
            embeds: `[R*V, 1 + P*P, D]` ViT tokens after `ln_vision`, index `r*V + v`.
            view_boxes: `[R, V, 4]` target box in every view's pixels.
        Returns:
            `[R, 1 + S*S, D]` fused visual tokens, `S = config.roi_output_size`.
        """
        regions, views = view_boxes.shape[:2]
        cls_tokens, patches = embeds[:, :1], embeds[:, 1:]
        grid = math.isqrt(patches.shape[1])
        if grid * grid != patches.shape[1]:
            raise ValueError(f"the vision tower gave {patches.shape[1]} patch tokens, not a square grid")
        width = embeds.shape[-1]
        maps = patches.transpose(1, 2).reshape(regions * views, width, grid, grid)
        # box k is applied to image k (each view has its own box)
        image_index = torch.arange(regions * views, device=maps.device, dtype=maps.dtype)
        rois = torch.cat([image_index[:, None], view_boxes.reshape(-1, 4).to(maps.dtype)], dim=1)
        roi_maps = roi_align(
            maps,
            rois,
            self.config.roi_output_size,
            spatial_scale=self.config.roi_spatial_scale,
            sampling_ratio=self.config.roi_sampling_ratio,
            aligned=self.config.roi_aligned,
            check_values=False,  # batch indices built above; box values checked once in _check_views
        )
        size = roi_maps.shape[-1]
        roi_maps = roi_maps.view(regions, views, width, size, size)
        if views > 1:
            # view-major: all regions of view 1, then of view 2, ...; each aligned to view 0 of its region
            moving = roi_maps[:, 1:].transpose(0, 1).reshape(-1, width, size, size)
            reference = roi_maps[:, 0].repeat(views - 1, 1, 1, 1)
            aligned = self.cvem_align(moving, reference).to(roi_maps.dtype)
            aligned = aligned.view(views - 1, regions, width, size, size).transpose(0, 1)
            roi_maps = torch.cat([roi_maps[:, :1], aligned], dim=1)
        tokens = roi_maps.flatten(3).transpose(2, 3)  # [R, V, S*S, D], row-major cells
        sequences = torch.cat([cls_tokens.reshape(regions, views, 1, width).to(tokens.dtype), tokens], dim=2)
        fused = sequences.permute(0, 2, 1, 3).reshape(
            regions, 1 + size * size, views * width
        )  # [v0 | v1 | v2]
        return self.cvem_mlp(fused)

    def encode_views(
        self,
        pixel_values: torch.Tensor,
        view_boxes: torch.Tensor,
        output_attentions: bool = False,
        output_hidden_states: bool = False,
    ) -> tuple[BaseModelOutputWithPooling, torch.Tensor]:
        """The vision tower's outputs over the `R * V` views (row `r * V + v`) and the fused tokens
        `[R, 1 + S*S, D]` (`fuse_views`).

        Identical views (the whole image, t = 1, is the same view for every region of an image; a selection can
        pick the same t twice) go through the vision tower once (`config.deduplicate_views`); the outputs are
        those of running every view."""
        images = pixel_values.flatten(0, 1)  # index r*V + v
        distinct = None
        if self.config.deduplicate_views and not torch.compiler.is_compiling():
            distinct = unique_views(images)
        if distinct is not None:
            images = images[distinct[0]]
        # the frozen ViT needs no graph
        vision_trainable = any(p.requires_grad for p in self.vision_model.parameters())
        with (
            torch.set_grad_enabled(torch.is_grad_enabled() and vision_trainable),
            self._autocast(images.device, torch.float16),
        ):
            vision_outputs = self.vision_model(
                pixel_values=images,
                output_attentions=output_attentions,
                output_hidden_states=output_hidden_states,
                return_dict=True,
            )
        if distinct is not None:
            vision_outputs = _expand_rows(vision_outputs, distinct[1])
        embeds = vision_outputs.last_hidden_state.to(self.cvem_mlp[0].weight.dtype)
        return vision_outputs, self.fuse_views(embeds, view_boxes)
