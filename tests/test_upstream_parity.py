"""Independent audit of DynReferForRegionCaptioning against docs/upstream/model.md.

Every DynRefer-specific step is re-implemented here from the spec text alone, in float64 with explicit
loops, using only the model's weights; the HF ViT, Q-Former and T5 are called directly as black boxes.
The model's outputs must match these references (docs/upstream/model.md §2-§16). Nothing from ``dynrefer_hf.ops`` or
the model's helpers is reused.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from tiny import make_tiny_model, make_tiny_tokenizer

from dynrefer_hf.image_processing_dynrefer import DynReferImageProcessor
from dynrefer_hf.modeling_dynrefer import asymmetric_loss
from dynrefer_hf.processing_dynrefer import DynReferProcessor

REGIONS, VIEWS, IMAGE, PATCH = 3, 3, 56, 14
# integer-valued target boxes in each view's pixels (views.md); region 0 view 2 is narrower than one patch
# (roi_w clamps to 1 cell), region 1 view 0 ends at 55 (edge case of docs/upstream/views.md §6), region 2 touches the border
VIEW_BOXES = [
    [[0, 0, 56, 56], [14, 7, 42, 49], [20, 18, 27, 30]],
    [[0, 0, 55, 55], [5, 9, 36, 30], [22, 21, 34, 33]],
    [[0, 0, 56, 56], [0, 28, 56, 56], [40, 40, 56, 56]],
]
PROMPTS = ["person,dog,grass|", "|", "car|"]  # different lengths: padding positions exist
CAPTIONS = ["a white dog lying on green grass", "the man riding a horse", "a parked car"]


# ------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def tokenizer():
    return make_tiny_tokenizer()


@pytest.fixture(scope="module")
def model():
    """Tiny model with every DynRefer-specific parameter non-trivial (the align module would be 0 at init)."""
    model = make_tiny_model(seed=3)
    generator = torch.Generator().manual_seed(11)
    align = model.cvem_align
    with torch.no_grad():
        offset_mask = align.offset_mask
        # offsets of about +-1.5 cells (some samples leave the 4x4 map), masks of about +-1
        offset_mask.weight.copy_(torch.randn(offset_mask.weight.shape, generator=generator) * 0.5)
        offset_mask.bias.copy_(torch.randn(offset_mask.bias.shape, generator=generator))
        # the padding channels 108..111 must never be read: make them huge
        offset_mask.weight[108:] = 1e4
        offset_mask.bias[108:] = 1e4
        for linear in (align.value_proj, align.output_proj):
            linear.bias.copy_(torch.randn(linear.bias.shape, generator=generator) * 0.1)
        model.cem_memory.copy_(torch.randn(model.cem_memory.shape, generator=generator))
        model.query_tokens.copy_(torch.randn(model.query_tokens.shape, generator=generator))
        for name in ("tag_fc", "attr_fc"):
            fc = getattr(model, name)
            fc.weight.copy_(torch.randn(fc.weight.shape, generator=generator) * 2)
        for table in (model.clip_embeds, model.att_embeds, model.ov_embeds):
            table.copy_(torch.randn(table.shape, generator=generator))
    return model


@pytest.fixture(scope="module")
def inputs():
    generator = torch.Generator().manual_seed(5)
    pixel_values = torch.randn(REGIONS, VIEWS, 3, IMAGE, IMAGE, generator=generator)
    return pixel_values, torch.tensor(VIEW_BOXES, dtype=torch.float32)


@pytest.fixture(scope="module")
def vit_tokens(model, inputs):
    """Black-box ViT on the flattened views (index r*V + v): `[R*V, 1 + P*P, D]` after ln_vision."""
    pixel_values, _ = inputs
    with torch.no_grad():
        return model.vision_model(pixel_values=pixel_values.flatten(0, 1)).last_hidden_state


@pytest.fixture(scope="module")
def reference_visual(model, inputs, vit_tokens):
    return reference_fuse_views(model, vit_tokens.double(), inputs[1].double())


@pytest.fixture(scope="module")
def region_queries(model, inputs):
    with torch.no_grad():
        return model.get_region_queries(*inputs)


def weights(module):
    return {name: p.detach().double() for name, p in module.named_parameters()}


# ---------------------------------------------------------------------------- §3 RoI-Align, written out


def roi_bilinear(feature, y, x):
    """torchvision's legacy bilinear sample of `feature [C, H, W]` at (y, x) (docs/upstream/model.md §3)."""
    _, height, width = feature.shape
    if y < -1.0 or y > height or x < -1.0 or x > width:
        return feature.new_zeros(feature.shape[0])
    y, x = max(y, 0.0), max(x, 0.0)
    if math.floor(y) >= height - 1:
        y_low = y_high = height - 1
        y = float(y_low)
    else:
        y_low = math.floor(y)
        y_high = y_low + 1
    if math.floor(x) >= width - 1:
        x_low = x_high = width - 1
        x = float(x_low)
    else:
        x_low = math.floor(x)
        x_high = x_low + 1
    ly, lx = y - y_low, x - x_low
    hy, hx = 1 - ly, 1 - lx
    return (
        hy * hx * feature[:, y_low, x_low]
        + hy * lx * feature[:, y_low, x_high]
        + ly * hx * feature[:, y_high, x_low]
        + ly * lx * feature[:, y_high, x_high]
    )


def reference_roi_align(feature, box, output_size, spatial_scale, sampling_ratio=2):
    """RoIAlign of one map `[C, H, W]` with one box, aligned=False: `[C, S, S]`."""
    x1, y1, x2, y2 = (float(c) * spatial_scale for c in box)  # no -0.5 shift (aligned=False)
    roi_w, roi_h = max(x2 - x1, 1.0), max(y2 - y1, 1.0)
    bin_w, bin_h = roi_w / output_size, roi_h / output_size
    out = feature.new_zeros(feature.shape[0], output_size, output_size)
    for ph in range(output_size):
        for pw in range(output_size):
            total = 0
            for iy in range(sampling_ratio):
                y = y1 + ph * bin_h + (iy + 0.5) * bin_h / sampling_ratio
                for ix in range(sampling_ratio):
                    x = x1 + pw * bin_w + (ix + 0.5) * bin_w / sampling_ratio
                    total = total + roi_bilinear(feature, y, x)
            out[:, ph, pw] = total / sampling_ratio**2
    return out


# ------------------------------------------------------------------------ §4.3/§4.4 align, written out


def reference_depthwise_pairs(moving, reference, weight, bias):
    """`offset_mask_dw` on concat([moving, reference]) with groups=C: output c reads inputs 2c, 2c+1 (§4.3)."""
    stacked = F.pad(torch.cat([moving, reference]), (1, 1, 1, 1))  # [2C, H+2, W+2], zero padding 1
    channels, height, width = moving.shape
    out = bias[:, None, None].expand(channels, height, width).clone()
    for c in range(channels):
        for j in range(2):
            for a in range(3):
                for b in range(3):
                    out[c] += weight[c, j, a, b] * stacked[2 * c + j, a : a + height, b : b + width]
    return out


def dcn_bilinear_zero(values, py, px):
    """Bilinear sample of `values [H, W, C]` at (py, px); corners outside the map contribute 0 (§4.4)."""
    height, width, _ = values.shape
    y0, x0 = math.floor(py), math.floor(px)
    total = values.new_zeros(values.shape[-1])
    for yy, wy in ((y0, 1 - (py - y0)), (y0 + 1, py - y0)):
        for xx, wx in ((x0, 1 - (px - x0)), (x0 + 1, px - x0)):
            if 0 <= yy < height and 0 <= xx < width:
                total = total + wy * wx * values[yy, xx]
    return total


def reference_align(model, moving, reference):
    """CustomDCNv4 forward for one (moving, reference) pair of `[C, H, W]` maps (docs/upstream/model.md §4.3/§4.4)."""
    w = weights(model.cvem_align)
    group, kernel = model.config.align_group, 3
    channels, height, width = moving.shape
    group_channels = channels // group
    values = moving.permute(1, 2, 0) @ w["value_proj.weight"].T + w["value_proj.bias"]  # [H, W, C]
    guide = reference_depthwise_pairs(moving, reference, w["offset_mask_dw.weight"], w["offset_mask_dw.bias"])
    offset_mask = guide.permute(1, 2, 0) @ w["offset_mask.weight"].T + w["offset_mask.bias"]  # [H, W, 112]
    sampled = torch.zeros(height, width, channels, dtype=moving.dtype)
    for y in range(height):
        for x in range(width):
            for g in range(group):
                base = 27 * g  # per group: 9 (dx, dy) pairs, then 9 raw masks
                for k in range(kernel * kernel):
                    i, j = divmod(k, 3)  # x-major: i is the column (x) index, j the row (y) index
                    dx, dy = offset_mask[y, x, base + 2 * k], offset_mask[y, x, base + 2 * k + 1]
                    mask = offset_mask[y, x, base + 18 + k]  # raw: no sigmoid, no softmax
                    px, py = x + (i - 1) + float(dx), y + (j - 1) + float(dy)
                    group_values = values[:, :, g * group_channels : (g + 1) * group_channels]
                    sampled[y, x, g * group_channels : (g + 1) * group_channels] += mask * dcn_bilinear_zero(
                        group_values, py, px
                    )
    out = sampled @ w["output_proj.weight"].T + w["output_proj.bias"]
    return out.permute(2, 0, 1)


# ------------------------------------------------------------------------------ §3-§5 fusion, written out


def reference_roi_maps(model, tokens, view_boxes):
    """§3: drop cls, reshape the patch tokens row-major, box k on image k, scale 1/patch: `[R*V, D, S, S]`."""
    images, length, _ = tokens.shape
    grid = math.isqrt(length - 1)
    maps = []
    for k in range(images):
        feature = torch.stack(
            [tokens[k, 1 + row * grid : 1 + (row + 1) * grid].T for row in range(grid)], dim=1
        )
        maps.append(reference_roi_align(feature, view_boxes.reshape(-1, 4)[k], grid, 1.0 / PATCH, 2))
    return torch.stack(maps)


def reference_fuse_views(model, tokens, view_boxes):
    """§3-§5 end to end: `[R*V, 1 + P*P, D]` ln_vision tokens -> `visual_embeds [R, 1 + S*S, D]`."""
    regions, views = view_boxes.shape[:2]
    roi_maps = reference_roi_maps(model, tokens, view_boxes)
    # §4.1: moving = views 1..V-1 view-major, reference = view 0 of the same region; view 0 untouched
    moving = [roi_maps[r * views + v] for v in range(1, views) for r in range(regions)]
    reference = [roi_maps[r * views] for v in range(1, views) for r in range(regions)]
    aligned = [reference_align(model, m, f) for m, f in zip(moving, reference)]
    per_view = {}
    for r in range(regions):
        for v in range(views):
            cells = roi_maps[r * views] if v == 0 else aligned[(v - 1) * regions + r]
            # each view's own cls token first, then its cells in row-major order
            per_view[r, v] = torch.cat([tokens[r * views + v, :1], cells.flatten(1).T])
    w = weights(model.cvem_mlp)
    fused = torch.stack(
        [torch.cat([per_view[r, v] for v in range(views)], dim=1) for r in range(regions)]
    )  # §5: [view0 | view1 | view2] per token
    hidden = torch.relu(fused @ w["0.weight"].T + w["0.bias"])
    return hidden @ w["2.weight"].T + w["2.bias"], aligned, moving, reference


# --------------------------------------------------------------------------- §7-§9 heads, written out


def reference_label_head(head, labels, memory, num_heads=4, eps=1e-12):
    """RAM's cross-attention-only BERT (§7): per layer h = LN(h + Dense(CrossAttn)); h = LN(h + FFN(h)).
    4 heads and LayerNorm eps 1e-12 as in tag_bert_config.json (the tiny config keeps both)."""
    w = weights(head)
    hidden = labels
    for i in range(len(head.encoder.layer)):
        p = f"encoder.layer.{i}."

        def linear(x, name, p=p):
            return x @ w[p + name + ".weight"].T + w[p + name + ".bias"]

        def layer_norm(x, name, p=p):
            return F.layer_norm(x, x.shape[-1:], w[p + name + ".weight"], w[p + name + ".bias"], eps)

        query = linear(hidden, "crossattention.self.query")
        key, value = linear(memory, "crossattention.self.key"), linear(memory, "crossattention.self.value")
        size = query.shape[-1] // num_heads
        context = []
        for h in range(num_heads):
            part = slice(h * size, (h + 1) * size)
            scores = query[..., part] @ key[..., part].transpose(-1, -2) / math.sqrt(size)
            context.append(torch.softmax(scores, dim=-1) @ value[..., part])  # encoder mask: all ones
        attended = layer_norm(
            hidden + linear(torch.cat(context, dim=-1), "crossattention.output.dense"),
            "crossattention.output.LayerNorm",
        )
        ffn = linear(F.gelu(linear(attended, "intermediate.dense")), "output.dense")  # exact erf GELU
        hidden = layer_norm(attended + ffn, "output.LayerNorm")
    return hidden


def reference_scores(model, prefix, text_embeds, queries, normalize):
    """§7 (normalize=False) / §8-§9 scoring: `fc(head(text_proj(T), vision_proj(Q)))` -> `[B, M]`."""
    w = {name: p.detach().double() for name, p in model.named_parameters() if name.startswith(prefix)}
    memory = queries.double() @ w[f"{prefix}_vision_proj.weight"].T + w[f"{prefix}_vision_proj.bias"]
    labels = text_embeds.double() @ w[f"{prefix}_text_proj.weight"].T + w[f"{prefix}_text_proj.bias"]
    labels = labels.unsqueeze(0).expand(queries.shape[0], -1, -1)
    hidden = reference_label_head(getattr(model, f"{prefix}_head"), labels, memory)
    if normalize:
        hidden = hidden / hidden.norm(dim=-1, keepdim=True)
    return (hidden @ w[f"{prefix}_fc.weight"].T + w[f"{prefix}_fc.bias"]).squeeze(-1)


def assert_bf16_close(actual, expected):
    """`actual` is bf16-representable and within one bf16 rounding step of `expected` (float64)."""
    assert torch.equal(actual.float(), actual.to(torch.bfloat16).float()), "values not quantised to bf16"
    step = expected.abs().clamp(min=1e-30) * 2.0**-7
    assert bool(((actual.double() - expected).abs() <= step + 1e-6).all())


# ============================================================================================== tests


def test_vision_tokens_are_ln_vision_with_eps_1e5(model, inputs, vit_tokens):
    """§2: the tokens fed to RoI-Align are LayerNorm(eps 1e-5) of the last ViT block's output."""
    pixel_values, _ = inputs
    with torch.no_grad():
        hidden = model.vision_model(pixel_values=pixel_values.flatten(0, 1), output_hidden_states=True)
    norm = model.vision_model.post_layernorm
    expected = F.layer_norm(
        hidden.hidden_states[-1], (norm.normalized_shape[0],), norm.weight, norm.bias, 1e-5
    )
    assert torch.allclose(vit_tokens, expected, atol=1e-5)


def test_fused_visual_tokens_match_the_spec(model, inputs, vit_tokens, reference_visual):
    """§3 RoI-Align, §4.1 view pairing, §4.3/§4.4 DCNv4 align, §5 channel concat + cvem_mlp."""
    _, view_boxes = inputs
    config = model.config
    assert (config.roi_spatial_scale, config.roi_sampling_ratio, config.roi_aligned) == (1 / PATCH, 2, False)
    expected, aligned, moving, reference = reference_visual
    calls = []
    handle = model.cvem_align.register_forward_hook(lambda mod, args, out: calls.append((args, out)))
    try:
        with torch.no_grad():
            actual = model.fuse_views(vit_tokens, view_boxes)
    finally:
        handle.remove()
    # the module's inputs are view-major: all regions of view 1, then all regions of view 2
    (moving_in, reference_in), aligned_out = calls[0]
    assert torch.allclose(moving_in.double(), torch.stack(moving), atol=1e-5)
    assert torch.allclose(reference_in.double(), torch.stack(reference), atol=1e-5)
    aligned = torch.stack(aligned)
    assert aligned.abs().amax() > 0.1  # the aligned views really contribute
    assert torch.allclose(aligned_out.double(), aligned, rtol=1e-4, atol=1e-4)
    assert actual.shape == (REGIONS, 1 + 4 * 4, 64)
    assert torch.allclose(actual.double(), expected, rtol=1e-4, atol=1e-4)


def test_region_queries_are_the_qformer_on_the_fused_tokens(model, inputs, reference_visual, region_queries):
    """§6: Q = Q-Former(query_embeds=query_tokens, encoder_hidden_states=visual_embeds, mask all ones);
    the Q-Former LayerNorms the raw (learned) query tokens."""
    expected_visual = reference_visual[0].float()
    layernorm_inputs = []
    handle = model.qformer.layernorm.register_forward_hook(
        lambda mod, args, out: layernorm_inputs.append(args[0].detach())
    )
    try:
        with torch.no_grad():
            queries = model.qformer(
                query_embeds=model.query_tokens.expand(REGIONS, -1, -1),
                encoder_hidden_states=expected_visual,
                encoder_attention_mask=torch.ones(expected_visual.shape[:2], dtype=torch.long),
            ).last_hidden_state
            model.get_region_queries(*inputs)
    finally:
        handle.remove()
    assert torch.allclose(region_queries, queries, rtol=1e-4, atol=1e-4)
    assert torch.equal(layernorm_inputs[-1], model.query_tokens.expand(REGIONS, -1, -1))


def test_head_outputs_at_inference(model, region_queries):
    """§7 tag logits, §8 attribute scores (sigmoid, grouped max), §9 class scores (raw s), bf16-quantised."""
    config = model.config
    with torch.no_grad():
        tag_logits, tag_mask, attribute_scores, class_scores = model.predict_labels(region_queries, 0.5)
    ref_tags = reference_scores(model, "tag", model.clip_embeds, region_queries, normalize=False)
    assert_bf16_close(tag_logits, ref_tags)
    # the threshold test happens on the bf16 sigmoid of the bf16 logits
    expected_mask = torch.sigmoid(tag_logits.to(torch.bfloat16)) > 0.5
    assert torch.equal(tag_mask, expected_mask) and 0 < int(tag_mask.sum()) < tag_mask.numel()

    ref_attr = reference_scores(model, "attr", model.att_embeds, region_queries, normalize=True)
    probs = torch.sigmoid(ref_attr)  # no attr_t / attr_b at inference
    expected, start = [], 0
    for size in config.attribute_group_sizes:  # consecutive groups, in order
        expected.append(probs[:, start : start + size].amax(dim=1))
        start += size
    assert_bf16_close(attribute_scores, torch.stack(expected, dim=1))

    ref_classes = reference_scores(model, "attr", model.ov_embeds, region_queries, normalize=True)
    assert_bf16_close(class_scores, ref_classes)  # raw s
    assert class_scores.shape == (REGIONS, config.num_classes)


def reference_asl(logits, targets, gamma_neg=7.0, gamma_pos=0.0, clip=0.05, eps=1e-8):
    """§7 ASL, entry by entry as the spec writes it; focal weights carry no gradient."""
    p = torch.sigmoid(logits)
    p_neg = torch.clamp(1 - p + clip, max=1)
    likelihood = targets * torch.log(torch.clamp(p, min=eps)) + (1 - targets) * torch.log(
        torch.clamp(p_neg, min=eps)
    )
    p_t = torch.where(targets > 0, p, p_neg).detach()
    gamma = torch.where(targets > 0, torch.tensor(gamma_pos), torch.tensor(gamma_neg))
    return -(likelihood * (1 - p_t) ** gamma).sum()


def test_tag_loss_is_weighted_summed_asl(model, inputs):
    pixel_values, view_boxes = inputs
    targets = torch.zeros(REGIONS, model.config.num_tags)
    targets[0, [1, 4]] = 1
    targets[2, 0] = 1
    model.zero_grad()
    output = model(pixel_values, view_boxes, tag_labels=targets)
    queries = output.region_queries.detach().requires_grad_(True)
    raw = reference_scores(model, "tag", model.clip_embeds, queries, normalize=False)
    expected = 0.01 * reference_asl(raw, targets.double())
    assert torch.allclose(output.loss_tag.double(), expected, rtol=1e-4)
    assert torch.allclose(output.loss.double(), expected, rtol=1e-4)
    # gradient through the logits with the focal weights treated as constants
    logits = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    labels = (torch.rand(4, 6) > 0.5).double()
    actual_grad = torch.autograd.grad(asymmetric_loss(logits, labels), logits)[0]
    expected_grad = torch.autograd.grad(reference_asl(logits, labels), logits)[0]
    assert torch.allclose(actual_grad.double(), expected_grad, rtol=1e-5, atol=1e-7)
    model.zero_grad()


def test_contrastive_loss_single_process(model, inputs):
    """§8: i2t / t2i sigmoid losses, +1 on the diagonal, -1 elsewhere, s*exp(attr_t)+attr_b, /bs, x0.5x0.5."""
    pixel_values, view_boxes = inputs
    generator = torch.Generator().manual_seed(2)
    caption_embeds = torch.randn(REGIONS, model.config.text_embed_dim, generator=generator)
    with torch.no_grad():
        model.attr_t.fill_(1.3)
        model.attr_b.fill_(-0.7)
        output = model(pixel_values, view_boxes, caption_embeds=caption_embeds)
        model.attr_t.fill_(model.config.attr_logit_scale_init)
        model.attr_b.fill_(model.config.attr_logit_bias_init)
    s = reference_scores(
        model, "attr", caption_embeds, output.region_queries, normalize=True
    )  # [regions, caps]
    logits_t2i = s * math.exp(1.3) - 0.7  # local regions against all captions
    logits_i2t = s.T * math.exp(1.3) - 0.7  # local captions against all regions
    labels = 2 * torch.eye(REGIONS, dtype=torch.float64) - 1
    batch = REGIONS
    i2t = -F.logsigmoid(labels * logits_i2t).sum() / batch
    t2i = -F.logsigmoid(labels * logits_t2i).sum() / batch
    expected = 0.5 * (i2t + t2i) * 0.5
    assert torch.allclose(output.loss_region_text.double(), expected, rtol=1e-4)
    assert torch.allclose(output.contrastive_logits.double(), logits_t2i, rtol=1e-4, atol=1e-4)


def reference_encoder_inputs(model, queries, input_ids, attention_mask):
    """§11: concat(t5_proj(Q), embed_tokens(ids) + cem_memory on every control position), mask concat."""
    projection = model.language_projection
    visual = queries.double() @ projection.weight.double().T + projection.bias.double()
    control = (
        model.language_model.get_input_embeddings().weight.double()[input_ids] + model.cem_memory.double()
    )
    embeds = torch.cat([visual, control], dim=1)
    mask = torch.cat([torch.ones(queries.shape[:2], dtype=torch.long), attention_mask], dim=1)
    return embeds, mask


def test_language_model_inputs_and_caption_loss(model, inputs, tokenizer, region_queries):
    pixel_values, view_boxes = inputs
    control = tokenizer(PROMPTS, padding="longest", truncation=True, max_length=32, return_tensors="pt")
    assert (control.attention_mask == 0).any()  # padding positions exist (they get cem_memory too)
    target = tokenizer(CAPTIONS, padding="longest", truncation=True, max_length=32, return_tensors="pt")
    labels = target.input_ids.masked_fill(target.attention_mask == 0, -100)
    seen = []
    handle = model.language_model.register_forward_pre_hook(
        lambda mod, args, kwargs: seen.append(kwargs), with_kwargs=True
    )
    try:
        with torch.no_grad():
            output = model(
                pixel_values,
                view_boxes,
                input_ids=control.input_ids,
                attention_mask=control.attention_mask,
                labels=labels,
                decoder_attention_mask=target.attention_mask,
            )
    finally:
        handle.remove()
    # LAVIS's T5 FFN uses exact erf GELU, not Flan-T5's tanh "gelu_new"
    activation = model.language_model.encoder.block[0].layer[-1].DenseReluDense.act
    probe = torch.linspace(-3, 3, 13)
    assert torch.allclose(activation(probe), F.gelu(probe), atol=1e-7)
    assert not torch.allclose(activation(probe), F.gelu(probe, approximate="tanh"), atol=1e-5)
    embeds, mask = reference_encoder_inputs(model, region_queries, control.input_ids, control.attention_mask)
    assert torch.allclose(seen[0]["inputs_embeds"].double(), embeds, rtol=1e-4, atol=1e-5)
    assert torch.equal(seen[0]["attention_mask"].long(), mask)
    # black-box T5 with teacher forcing (labels shifted right, start id 0), our token-mean CE over non-pads
    decoder_input_ids = torch.cat(
        [torch.zeros(REGIONS, 1, dtype=torch.long), target.input_ids[:, :-1]], dim=1
    )
    with torch.no_grad():
        logits = model.language_model(
            inputs_embeds=embeds.float(),
            attention_mask=mask,
            decoder_input_ids=decoder_input_ids,
            decoder_attention_mask=target.attention_mask,
        ).logits
    log_probs = F.log_softmax(logits.double(), dim=-1)
    keep = labels != -100
    token_nll = -log_probs.gather(2, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    expected_loss = token_nll[keep].sum() / keep.sum()
    assert torch.allclose(output.logits, logits, rtol=1e-4, atol=1e-4)
    assert torch.allclose(output.loss_caption.double(), expected_loss, rtol=1e-4)


@pytest.mark.slow
def test_generation_uses_released_defaults_and_scores(model, inputs, tokenizer, region_queries):
    """§11: num_beams 2, repetition_penalty 1.5, length_penalty 0, max_new_tokens 20, min_length 1,
    no sampling, from the model's GenerationConfig; score = exp(sequences_scores)."""
    pixel_values, view_boxes = inputs
    config = model.generation_config
    released = {"num_beams": 2, "repetition_penalty": 1.5, "length_penalty": 0.0, "max_new_tokens": 20}
    assert {key: getattr(config, key) for key in released} == released
    assert config.min_length == 1 and config.do_sample is False and config.num_return_sequences in (None, 1)
    assert config.early_stopping in (None, False)  # upstream does not pass it: HF's default False
    control = tokenizer(PROMPTS, padding="longest", truncation=True, max_length=32, return_tensors="pt")
    embeds, mask = reference_encoder_inputs(model, region_queries, control.input_ids, control.attention_mask)
    with torch.no_grad():
        expected = model.language_model.generate(
            inputs_embeds=embeds.float(),
            attention_mask=mask,
            do_sample=False,
            output_scores=True,
            return_dict_in_generate=True,
            **released,
            min_length=1,
        )
        actual = model.generate(
            pixel_values,
            view_boxes,
            input_ids=control.input_ids,
            attention_mask=control.attention_mask,
            add_predicted_tags=False,
            output_scores=True,
            return_dict_in_generate=True,
        )
    assert torch.equal(actual.sequences, expected.sequences)
    assert torch.allclose(actual.sequences_scores, expected.sequences_scores, atol=1e-4)


@pytest.mark.slow
def test_generated_prompts_scores_and_records(model, inputs, tokenizer, region_queries):
    """§12 control prompt (user words first, then tags in tag-list order; built on token ids, equal to the
    tokenised text prompt), §11 score, §16 record fields."""
    pixel_values, view_boxes = inputs
    config = model.config
    with torch.no_grad():
        tag_logits, _, attribute_scores, class_scores = model.predict_labels(region_queries)
    probs = torch.sigmoid(tag_logits.to(torch.bfloat16)).float()
    threshold = float(probs.median())
    tags = [
        [config.tag_names[i] for i in range(config.num_tags) if probs[r, i] > threshold]
        for r in range(REGIONS)
    ]
    assert any(tags) and all(len(t) < config.num_tags for t in tags)
    user = [["red ball"], [], [tags[2][0] if tags[2] else "sky", "blue"]]
    processor = DynReferProcessor(DynReferImageProcessor(), tokenizer)
    outputs = model.generate(
        pixel_values, view_boxes, **processor.encode_control_prompts(user), tag_threshold=threshold
    )
    records = processor.post_process_generation(outputs, config.tag_names)
    expected_prompts = []
    for words, region_tags in zip(user, tags):
        merged = list(words) + [tag for tag in region_tags if tag not in words]
        expected_prompts.append(",".join(merged) + "|")
    control = tokenizer(
        expected_prompts, padding="longest", truncation=True, max_length=32, return_tensors="pt"
    )
    assert torch.equal(outputs.input_ids, control.input_ids)
    assert torch.equal(outputs.attention_mask, control.attention_mask)
    embeds, mask = reference_encoder_inputs(model, region_queries, control.input_ids, control.attention_mask)
    with torch.no_grad():
        generated = model.language_model.generate(
            inputs_embeds=embeds.float(),
            attention_mask=mask,
            num_beams=2,
            repetition_penalty=1.5,
            length_penalty=0.0,
            max_new_tokens=20,
            min_length=1,
            do_sample=False,
            output_scores=True,
            return_dict_in_generate=True,
        )
    captions = tokenizer.batch_decode(generated.sequences, skip_special_tokens=True)
    scores = generated.sequences_scores.exp()
    assert len(records) == REGIONS
    for r, record in enumerate(records):
        # upstream: {"id", "caption", "score", "tag_set1", "tag_set2" (same list), "attr", "cls"}
        assert set(record) == {"caption", "score", "tags", "attribute_scores", "class_scores"}
        assert record["caption"] == captions[r]
        assert record["score"] == pytest.approx(float(scores[r]), rel=1e-4)
        assert record["tags"] == tags[r]
        assert record["attribute_scores"] == attribute_scores[r].tolist()
        assert record["class_scores"] == class_scores[r].tolist()
        assert len(record["attribute_scores"]) == config.num_attributes
        assert len(record["class_scores"]) == config.num_classes


KEYWORDS = ("cvem", "cem", "tag", "attr", "qformer", "language_projection")  # upstream: Qformer, t5_proj


def test_default_trainable_set_is_the_keyword_rule():
    """§14: trainable iff the (port's) name holds one of the upstream keywords; query_tokens, the ViT, the LM
    and the text encoder stay frozen."""
    text_encoder = {
        "vocab_size": 514,
        "hidden_size": 16,
        "intermediate_size": 32,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "projection_dim": 32,
    }
    fresh = make_tiny_model(text_encoder_config=text_encoder)
    assert fresh.text_encoder is not None
    for name, parameter in fresh.named_parameters():
        assert parameter.requires_grad == any(keyword in name for keyword in KEYWORDS), name
    assert not fresh.query_tokens.requires_grad
