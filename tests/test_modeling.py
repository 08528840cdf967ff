"""DynReferForRegionCaptioning on tiny configs: dataflow, losses, generation, serialisation, training."""

import math

import pytest
import torch
import torch.nn.functional as F
from tiny import make_tiny_config, make_tiny_model, make_tiny_tokenizer
from transformers import AutoModel, AutoModelForImageTextToText, CLIPTextModelWithProjection

import dynrefer_hf  # registers the Auto classes
from dynrefer_hf.configuration_dynrefer import DEFAULT_TRAINABLE_MODULES
from dynrefer_hf.modeling_dynrefer import (
    DynReferForRegionCaptioning,
    DynReferRegionAlign,
    asymmetric_loss,
)
from dynrefer_hf.ops import roi_align
from dynrefer_hf.prompts import format_control_prompt

REGIONS, VIEWS, SIZE = 2, 3, 56
NO_DROPOUT = {
    "head_dropout": 0.0,
    "qformer_config": {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
    },
}


def make_views(seed=0, regions=REGIONS):
    generator = torch.Generator().manual_seed(seed)
    pixel_values = torch.randn(regions, VIEWS, 3, SIZE, SIZE, generator=generator)
    boxes = torch.tensor([[0.0, 0.0, 56.0, 56.0], [10.0, 12.0, 40.0, 44.0], [20.0, 18.0, 31.0, 30.0]])
    view_boxes = boxes.expand(regions, VIEWS, 4).clone()
    view_boxes[1:, 1:] += 2.0
    return pixel_values, view_boxes


def make_processor(tokenizer):
    from dynrefer_hf.image_processing_dynrefer import DynReferImageProcessor
    from dynrefer_hf.processing_dynrefer import DynReferProcessor

    return DynReferProcessor(DynReferImageProcessor(size={"height": SIZE, "width": SIZE}), tokenizer)


def make_batch(tokenizer, regions=REGIONS):
    prompts = ["person,dog|", "|", "car,tree|", "horse|"][:regions]
    captions = ["a white dog lying on green grass", "the man riding a horse", "a parked car", "a horse"][
        :regions
    ]
    control = tokenizer(prompts, padding="longest", return_tensors="pt")
    target = tokenizer(captions, padding="longest", return_tensors="pt")
    labels = target.input_ids.masked_fill(target.attention_mask == 0, -100)
    return {
        "input_ids": control.input_ids,
        "attention_mask": control.attention_mask,
        "labels": labels,
        "decoder_attention_mask": target.attention_mask,
    }


@pytest.fixture(scope="module")
def tokenizer():
    return make_tiny_tokenizer()


def capture_inputs(module):
    """Record the positional inputs of every call of ``module``."""
    calls = []
    handle = module.register_forward_hook(
        lambda mod, args, out: calls.append(([a.detach() for a in args], out))
    )
    return calls, handle


def randomise_align(model, seed=1):
    """Give the alignment module non-zero offsets/masks so that views 1..V-1 contribute."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        weight = model.cvem_align.offset_mask.weight
        weight.copy_(torch.randn(weight.shape, generator=generator) * 0.1)


# ----------------------------------------------------------------------------------- losses / training


@pytest.mark.slow
def test_forward_backward_of_every_loss(tokenizer):
    model = make_tiny_model().train()
    pixel_values, view_boxes = make_views()
    tag_labels = torch.zeros(REGIONS, 12)
    tag_labels[0, [1, 2]] = 1
    tag_labels[1, 3] = 1
    caption_embeds = torch.randn(REGIONS, 32)
    out = model(
        pixel_values,
        view_boxes,
        tag_labels=tag_labels,
        caption_embeds=caption_embeds,
        **make_batch(tokenizer),
    )
    with pytest.warns(FutureWarning, match="loss_region_text"):
        torch.testing.assert_close(out["loss_att"], out.loss_region_text)  # the deprecated name still reads
    for name in ("loss_caption", "loss_tag", "loss_region_text"):
        assert torch.isfinite(out[name]) and out[name].item() > 0, name
    assert torch.allclose(out.loss, out.loss_caption + out.loss_tag + out.loss_region_text)
    assert out.logits.shape[:2] == make_batch(tokenizer)["labels"].shape
    assert out.tag_logits.shape == (REGIONS, 12) and out.contrastive_logits.shape == (REGIONS, REGIONS)
    assert out.region_queries.shape == (REGIONS, 4, 32)
    out.loss.backward()
    trainable = {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(DEFAULT_TRAINABLE_MODULES)
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            assert parameter.grad is not None and torch.isfinite(parameter.grad).all(), name
        else:
            assert parameter.grad is None, name
    assert model.cem_memory.grad.abs().sum() > 0 and model.cvem_align.offset_mask.weight.grad.abs().sum() > 0


@pytest.mark.slow
def test_each_loss_alone(tokenizer):
    model = make_tiny_model().train()
    pixel_values, view_boxes = make_views()
    only_tags = model(pixel_values, view_boxes, tag_labels=torch.ones(REGIONS, 12))
    assert only_tags.loss_caption is None and only_tags.loss_region_text is None
    assert torch.equal(only_tags.loss, only_tags.loss_tag)
    only_llm = model(pixel_values, view_boxes, **make_batch(tokenizer))
    assert torch.equal(only_llm.loss, only_llm.loss_caption)
    assert model(pixel_values, view_boxes).loss is None


def direct_asl(logits, targets, gamma_neg=7.0, gamma_pos=0.0, clip=0.05, eps=1e-8):
    """docs/upstream/model.md §7, entry by entry."""
    total = 0.0
    for x, y in zip(logits.flatten().tolist(), targets.flatten().tolist()):
        p = 1 / (1 + math.exp(-x))
        p_neg = min(1 - p + clip, 1.0)
        likelihood = y * math.log(max(p, eps)) + (1 - y) * math.log(max(p_neg, eps))
        p_t = p if y == 1 else p_neg
        gamma = gamma_pos if y == 1 else gamma_neg
        total += -likelihood * (1 - p_t) ** gamma
    return total


def test_asymmetric_loss_matches_the_formula():
    generator = torch.Generator().manual_seed(0)
    logits = (torch.randn(3, 7, generator=generator, dtype=torch.float64) * 4).requires_grad_()
    targets = (torch.rand(3, 7, generator=generator) > 0.6).double()
    loss = asymmetric_loss(logits, targets)
    assert math.isclose(loss.item(), direct_asl(logits, targets), rel_tol=1e-5)
    # the focal weights carry no gradient: d/dx of -w * log-likelihood with w constant
    loss.backward()
    with torch.no_grad():
        p = torch.sigmoid(logits)
        p_neg = (1 - p + 0.05).clamp(max=1)
        weight = torch.where(targets == 1, (1 - p) ** 0, (1 - p_neg) ** 7)
        d_pos = -(1 - p)  # d/dx -log p
        d_neg = torch.where(
            1 - p + 0.05 < 1, p * (1 - p) / (1 - p + 0.05), torch.zeros_like(p)
        )  # d/dx -log p_neg
        expected = torch.where(targets == 1, d_pos, d_neg) * weight
    assert torch.allclose(logits.grad, expected, rtol=1e-4, atol=1e-8)


def test_tag_loss_in_forward_is_weighted_asl():
    model = make_tiny_model()
    pixel_values, view_boxes = make_views()
    tag_labels = torch.zeros(REGIONS, 12)
    tag_labels[:, 0] = 1
    out = model(pixel_values, view_boxes, tag_labels=tag_labels)
    raw = model.tag_logits(out.region_queries)
    assert math.isclose(out.loss_tag.item(), 0.01 * direct_asl(raw.double(), tag_labels), rel_tol=1e-5)


def direct_region_caption_logits(model, region_queries, caption_embeds):
    """docs/upstream/model.md §8 scoring, one (region, caption) pair at a time: logits[r, c] = s * exp(attr_t) + attr_b."""
    scores = torch.zeros(len(region_queries), len(caption_embeds))
    with torch.no_grad():
        for r in range(len(region_queries)):
            memory = model.attr_vision_proj(region_queries[r : r + 1])
            for c in range(len(caption_embeds)):
                label = model.attr_text_proj(caption_embeds[c]).view(1, 1, -1)
                hidden = model.attr_head(label, memory)
                scores[r, c] = model.attr_fc(hidden / hidden.norm(dim=-1, keepdim=True)).item()
    return scores * math.exp(model.attr_t.item()) + model.attr_b.item()


def direct_sigmoid_loss(logits, first_positive_column):
    """-sum over the [bs, N] matrix of logsigmoid(label * logit) / bs; row i's positive: column offset + i."""
    rows, columns = logits.shape
    total = 0.0
    for i in range(rows):
        for j in range(columns):
            label = 1.0 if j == first_positive_column + i else -1.0
            total += -F.logsigmoid(torch.tensor(label * logits[i, j].item())).item()
    return total / rows


def test_contrastive_loss_matches_the_formula():
    model = make_tiny_model(**NO_DROPOUT).train()
    pixel_values, view_boxes = make_views(regions=3)
    caption_embeds = torch.randn(3, 32)
    out = model(pixel_values, view_boxes, caption_embeds=caption_embeds)
    logits = direct_region_caption_logits(model, out.region_queries, caption_embeds)
    assert torch.allclose(out.contrastive_logits, logits, atol=1e-5)
    expected = 0.5 * (direct_sigmoid_loss(logits, 0) + direct_sigmoid_loss(logits.T, 0)) / 2
    assert math.isclose(out.loss_region_text.item(), expected, rel_tol=1e-5)


@pytest.mark.slow
def test_contrastive_loss_across_ranks(monkeypatch):
    """Rank 1 of 2: scored against rank 0's regions and captions too; positives sit in its own block."""
    import torch.distributed as dist

    model = make_tiny_model(**NO_DROPOUT).train()
    pixel_values, view_boxes = make_views(regions=4)
    caption_embeds = torch.randn(4, 32)
    with torch.no_grad():
        all_queries = model.get_region_queries(pixel_values, view_boxes)
        rank0 = {
            "memory": model.attr_vision_proj(all_queries[:2]),
            "captions": model.attr_text_proj(caption_embeds[:2]),
        }

    def fake_all_gather(parts, tensor):
        if tensor.dim() == 1:  # the row counts: 2 on both ranks
            for part in parts:
                part.copy_(tensor)
            return
        other = rank0["memory"] if tensor.dim() == 3 else rank0["captions"]
        parts[0].copy_(other)
        parts[1].copy_(tensor)

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(dist, "get_rank", lambda: 1)
    monkeypatch.setattr(dist, "all_gather", fake_all_gather)
    out = model(pixel_values[2:], view_boxes[2:], caption_embeds=caption_embeds[2:])
    logits = direct_region_caption_logits(model, all_queries, caption_embeds)  # [4 regions, 4 captions]
    t2i, i2t = logits[2:], logits[:, 2:].T  # this rank's regions / this rank's captions against everything
    assert torch.allclose(out.contrastive_logits, t2i, atol=1e-5)
    expected = 0.5 * (direct_sigmoid_loss(t2i, 2) + direct_sigmoid_loss(i2t, 2)) / 2
    assert math.isclose(out.loss_region_text.item(), expected, rel_tol=1e-5)
    out.loss_region_text.backward()  # the local slice keeps its gradient
    assert (
        model.attr_vision_proj.weight.grad.abs().sum() > 0
        and model.attr_text_proj.weight.grad.abs().sum() > 0
    )


@pytest.mark.slow
def test_gradient_checkpointing_gives_the_same_gradients(tokenizer):
    batch = make_batch(tokenizer)
    pixel_values, view_boxes = make_views()
    overrides = dict(NO_DROPOUT)
    overrides["text_config"] = dict(make_tiny_config().text_config.to_dict(), dropout_rate=0.0)
    grads = []
    for checkpointing in (False, True):
        model = make_tiny_model(**overrides).train()
        randomise_align(model)
        if checkpointing:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            assert model.is_activation_checkpointing
        out = model(
            pixel_values,
            view_boxes,
            tag_labels=torch.ones(REGIONS, 12),
            caption_embeds=torch.ones(REGIONS, 32),
            **batch,
        )
        out.loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    for name in grads[0]:
        assert torch.allclose(grads[0][name], grads[1][name], atol=1e-6), name


@pytest.mark.slow
def test_trainer_steps_lower_the_loss(tmp_path, tokenizer):
    from transformers import Trainer, TrainingArguments

    model = make_tiny_model(**NO_DROPOUT)
    pixel_values, view_boxes = make_views()
    batch = make_batch(tokenizer)
    examples = [
        {
            "pixel_values": pixel_values[i],
            "view_boxes": view_boxes[i],
            "tag_labels": torch.eye(12)[i],
            **{key: value[i] for key, value in batch.items()},
        }
        for i in range(REGIONS)
    ]

    def collate(features):
        return {key: torch.stack([f[key] for f in features]) for key in features[0]}

    def total_loss():
        model.eval()
        with torch.no_grad():
            return model(**collate(examples)).loss.item()

    before = total_loss()
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=8,
        per_device_train_batch_size=REGIONS,
        learning_rate=1e-2,
        report_to=[],
        use_cpu=True,
        remove_unused_columns=False,
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    Trainer(model=model, args=args, train_dataset=examples, data_collator=collate).train()
    after = total_loss()
    assert after < before * 0.95


@pytest.mark.slow
def test_peft_lora_on_the_language_model_trains_and_saves(tmp_path, tokenizer):
    from peft import LoraConfig, PeftModel, get_peft_model

    model = make_tiny_model(**NO_DROPOUT)
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=r".*language_model.*\.(q|v)")
    peft_model = get_peft_model(model, lora)
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n and "language_model" in n for n in trainable)
    pixel_values, view_boxes = make_views()
    batch = make_batch(tokenizer)
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    peft_model.train()
    losses = []
    for _ in range(8):
        loss = peft_model(pixel_values=pixel_values, view_boxes=view_boxes, **batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    # The tiny T5's large initial logits make single steps noisy: compare the last steps' mean.
    assert sum(losses[-3:]) / 3 < losses[0]
    peft_model.eval()
    with torch.no_grad():
        expected = peft_model(pixel_values=pixel_values, view_boxes=view_boxes, **batch).loss
    peft_model.save_pretrained(tmp_path)
    assert (tmp_path / "adapter_model.safetensors").exists()
    reloaded = PeftModel.from_pretrained(make_tiny_model(**NO_DROPOUT), tmp_path).eval()
    with torch.no_grad():
        assert torch.allclose(
            reloaded(pixel_values=pixel_values, view_boxes=view_boxes, **batch).loss, expected
        )


# ------------------------------------------------------------------------------------- dataflow


def test_region_align_output_is_zero_at_init():
    model = make_tiny_model()
    moving, reference = torch.randn(2, 64, 4, 4), torch.randn(2, 64, 4, 4)
    assert torch.equal(model.cvem_align(moving, reference), torch.zeros(2, 64, 4, 4))
    assert model.cvem_align.offset_mask.weight.shape == (112, 64)  # 4 groups x 9 points x 3 -> 108 -> 112


def test_region_align_depthwise_conv_pairs_channels_within_a_view():
    torch.manual_seed(0)
    align = DynReferRegionAlign(channels=8, group=4)
    guides = []
    align.offset_mask_dw.register_forward_hook(lambda mod, args, out: guides.append(out.detach()))
    moving, reference = torch.randn(1, 8, 5, 5), torch.randn(1, 8, 5, 5)
    align(moving, reference)
    for channel in range(8):
        for view, tensor in (("moving", moving), ("reference", reference)):
            bumped = tensor.clone()
            bumped[0, channel] += 1.0
            align(bumped, reference) if view == "moving" else align(moving, bumped)
            changed = (guides[-1] - guides[0]).abs().amax(dim=(0, 2, 3)) > 0
            # concat order is [moving | reference]; output channel c reads input channels 2c and 2c+1
            expected_channel = (channel if view == "moving" else 8 + channel) // 2
            assert changed.nonzero().flatten().tolist() == [expected_channel], (view, channel)


def test_region_align_layout_identity_and_shift():
    torch.manual_seed(0)
    channels, group = 8, 4
    align = DynReferRegionAlign(channels=channels, group=group)
    moving, reference = torch.randn(2, channels, 4, 4), torch.randn(2, channels, 4, 4)
    projected = align.value_proj(moving.permute(0, 2, 3, 1))
    with torch.no_grad():
        align.offset_mask.weight.zero_()
        bias = torch.zeros(112)
        for g in range(group):
            bias[27 * g + 18 + 4] = 1.0  # mask of the centre point (k = 4) of every group
        align.offset_mask.bias.copy_(bias)
        identity = align(moving, reference)
        expected = align.output_proj(projected).permute(0, 3, 1, 2)
        assert torch.allclose(identity, expected, atol=1e-6)
        for g in range(group):
            bias[27 * g + 2 * 4] = 1.0  # dx of the centre point: sample one cell to the right
        align.offset_mask.bias.copy_(bias)
        shifted_values = torch.zeros_like(projected)
        shifted_values[:, :, :-1] = projected[:, :, 1:]  # zero padding past the right edge
        expected = align.output_proj(shifted_values).permute(0, 3, 1, 2)
        assert torch.allclose(align(moving, reference), expected, atol=1e-5)


def test_released_configuration_shapes_and_trainable_count():
    """The full-size model, built on the meta device: shapes of docs/upstream/checkpoint.md §5 and the §14 parameter counts."""
    from dynrefer_hf import DynReferConfig

    with torch.device("meta"):
        model = DynReferForRegionCaptioning(DynReferConfig())
    shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}
    assert shapes["cvem_align.offset_mask.weight"] == (112, 1408)
    assert shapes["cvem_align.offset_mask_dw.weight"] == (1408, 2, 3, 3)
    assert shapes["cvem_mlp.0.weight"] == (1408, 4224) and shapes["cvem_mlp.2.weight"] == (1408, 1408)
    assert shapes["cem_memory"] == (2048,) and shapes["language_projection.weight"] == (2048, 768)
    assert shapes["query_tokens"] == (1, 32, 768) and shapes["tag_text_proj.weight"] == (256, 1024)
    assert shapes["tag_head.encoder.layer.1.crossattention.self.key.weight"] == (256, 256)
    assert shapes["attr_head.encoder.layer.0.intermediate.dense.weight"] == (1024, 256)
    assert "language_model.lm_head.weight" in shapes  # Flan-T5's own lm_head
    assert (model.clip_embeds.shape, model.att_embeds.shape, model.ov_embeds.shape) == (
        (4585, 1024),
        (474, 1024),
        (80, 1024),
    )
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    qformer = sum(p.numel() for p in model.qformer.parameters())
    assert round(trainable / 1e6, 1) == 122.9 and round(qformer / 1e6, 1) == 105.1  # docs/upstream/model.md §14


def test_label_head_is_cross_attention_then_ffn_post_ln():
    """docs/upstream/model.md §7 written out: h = LN1(h + Dense(CrossAttn(h, memory))); h = LN2(h + Dense2(GELU(Dense1(h))))."""
    model = make_tiny_model()
    head = model.tag_head
    labels, memory = torch.randn(2, 5, 32), torch.randn(2, 4, 32)
    hidden = labels
    for layer in head.encoder.layer:
        attention = layer.crossattention.self

        def heads(x):
            return x.view(x.shape[0], x.shape[1], 4, 8).transpose(1, 2)

        q, k, v = heads(attention.query(hidden)), heads(attention.key(memory)), heads(attention.value(memory))
        probabilities = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(8), dim=-1)
        context = (probabilities @ v).transpose(1, 2).reshape(2, 5, 32)
        output = layer.crossattention.output
        hidden = output.LayerNorm(hidden + output.dense(context))
        ffn = layer.output.dense(F.gelu(layer.intermediate.dense(hidden)))
        hidden = layer.output.LayerNorm(hidden + ffn)
    with torch.no_grad():
        assert torch.allclose(head(labels, memory), hidden, atol=1e-5)
    names = {name for name, _ in head.named_parameters()}
    assert "encoder.layer.1.crossattention.self.query.weight" in names
    assert "encoder.layer.0.crossattention.output.LayerNorm.bias" in names
    assert {"encoder.layer.0.intermediate.dense.weight", "encoder.layer.0.output.dense.weight"} <= names
    assert not any("attention.self" in name and "crossattention" not in name for name in names)


def test_two_views():
    model = make_tiny_model(num_views=2)
    assert model.cvem_mlp[0].in_features == 128
    pixel_values, view_boxes = make_views()
    with torch.no_grad():
        queries = model.get_region_queries(pixel_values[:, :2], view_boxes[:, :2])
    assert queries.shape == (REGIONS, 4, 32)


def test_roi_tokens_cls_tokens_and_view_major_alignment():
    model = make_tiny_model()
    randomise_align(model)
    pixel_values, view_boxes = make_views()
    vit_calls, h1 = capture_inputs(model.vision_model.post_layernorm)
    align_calls, h2 = capture_inputs(model.cvem_align)
    mlp_calls, h3 = capture_inputs(model.cvem_mlp)
    with torch.no_grad():
        model.get_region_queries(pixel_values, view_boxes)
    for handle in (h1, h2, h3):
        handle.remove()
    embeds = vit_calls[0][1]  # ln_vision output [R*V, 17, 64]
    fused = mlp_calls[0][0][0]  # [R, 17, V*64]
    (moving, reference), aligned = align_calls[0]
    width = 64
    maps = embeds[:, 1:].transpose(1, 2).reshape(REGIONS * VIEWS, width, 4, 4)
    for r in range(REGIONS):
        for v in range(VIEWS):
            k = r * VIEWS + v
            roi = roi_align(maps[k : k + 1], [view_boxes[r, v].view(1, 4)], 4, 1 / 14, 2, False)[0]
            block = fused[r, :, v * width : (v + 1) * width]
            assert torch.equal(block[0], embeds[k, 0])  # each view keeps its own cls token
            if v == 0:
                assert torch.allclose(block[1:], roi.flatten(1).T, atol=1e-6)  # view 0 is not aligned
            else:
                row = (v - 1) * REGIONS + r  # view-major order of the moving maps
                assert torch.allclose(moving[row], roi, atol=1e-6)
                assert torch.allclose(
                    reference[row],
                    roi_align(
                        maps[r * VIEWS : r * VIEWS + 1], [view_boxes[r, 0].view(1, 4)], 4, 1 / 14, 2, False
                    )[0],
                    atol=1e-6,
                )
                assert torch.allclose(block[1:], aligned[row].detach().flatten(1).T, atol=1e-6)


def test_view_order_matters():
    model = make_tiny_model()
    randomise_align(model)
    pixel_values, view_boxes = make_views()
    order = [0, 2, 1]
    with torch.no_grad():
        queries = model.get_region_queries(pixel_values, view_boxes)
        swapped = model.get_region_queries(pixel_values[:, order], view_boxes[:, order])
        again = model.get_region_queries(pixel_values, view_boxes)
    assert torch.equal(queries, again)
    assert not torch.allclose(queries, swapped, atol=1e-6)


def test_regions_are_independent():
    model = make_tiny_model()
    randomise_align(model)
    pixel_values, view_boxes = make_views(regions=3)
    with torch.no_grad():
        together = model.get_region_queries(pixel_values, view_boxes)
        alone = model.get_region_queries(pixel_values[1:2], view_boxes[1:2])
    assert torch.allclose(together[1:2], alone, atol=1e-5)


# ------------------------------------------------------------------------------------- inference


def test_generate_feeds_visual_prefix_and_control_tokens_with_cem_memory(tokenizer):
    model = make_tiny_model()
    with torch.no_grad():
        model.cem_memory.normal_()
    pixel_values, view_boxes = make_views()
    control = tokenizer(["person,dog|", "|"], padding="longest", return_tensors="pt")
    steps = 4
    generated = model.generate(
        pixel_values,
        view_boxes,
        control.input_ids,
        control.attention_mask,
        add_predicted_tags=False,  # the prompts are given whole
        num_beams=1,
        max_new_tokens=steps,
        min_new_tokens=steps,
        repetition_penalty=1.0,
    ).sequences
    with torch.no_grad():
        queries = model.get_region_queries(pixel_values, view_boxes)
        embed = model.language_model.get_input_embeddings()
        prefix = torch.cat(
            [model.language_projection(queries), embed(control.input_ids) + model.cem_memory], dim=1
        )
        mask = torch.cat([torch.ones(REGIONS, 4, dtype=torch.long), control.attention_mask], dim=1)
        decoded = torch.zeros(REGIONS, 1, dtype=torch.long)  # decoder_start_token_id
        for _ in range(steps):
            logits = model.language_model(
                inputs_embeds=prefix, attention_mask=mask, decoder_input_ids=decoded
            ).logits
            logits[:, -1, 1] = -float("inf")  # min_new_tokens forbids EOS
            decoded = torch.cat([decoded, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(generated, decoded)


def test_generation_defaults_are_the_released_ones(tmp_path):
    model = make_tiny_model()
    config = model.generation_config
    assert (config.num_beams, config.max_new_tokens, config.repetition_penalty, config.length_penalty) == (
        2,
        20,
        1.5,
        0.0,
    )
    model.save_pretrained(tmp_path)
    assert AutoModel.from_pretrained(tmp_path).generation_config.num_beams == 2


@pytest.mark.slow
def test_generate_prompts_user_words_then_predicted_tags_as_the_tokenizer_writes_them(tokenizer):
    """§12 on token ids: the prompt `generate` builds equals the tokenised text prompt of the processor, and the
    captions are those of generating from that text prompt."""
    model = make_tiny_model()
    processor = make_processor(tokenizer)
    pixel_values, view_boxes = make_views()
    with torch.no_grad():
        queries = model.get_region_queries(pixel_values, view_boxes)
        tag_probs = torch.sigmoid(model.tag_logits(queries).to(torch.bfloat16))
    threshold = tag_probs.float().median().item()
    user = [["sky", "dog"], "red,  blue"]
    user_ids = processor.encode_control_prompts(user)
    out = model.generate(
        pixel_values, view_boxes, **user_ids, tag_threshold=threshold, output_scores=True, return_dict_in_generate=True
    )
    records = processor.post_process_generation(out, model.config.tag_names)
    assert len(records) == REGIONS
    prompts = []
    for r, record in enumerate(records):
        assert set(record) == {"caption", "score", "tags", "attribute_scores", "class_scores"}
        expected_tags = [model.config.tag_names[i] for i in range(12) if tag_probs[r, i] > threshold]
        assert record["tags"] == expected_tags and expected_tags  # tag-list order
        assert len(record["attribute_scores"]) == 3 and len(record["class_scores"]) == 5
        assert 0 < record["score"] <= 1
        words = ["sky", "dog"] if r == 0 else ["red", "blue"]
        prompts.append(format_control_prompt(list(dict.fromkeys(words + expected_tags))))
    assert {"sky", "dog"} & set(records[0]["tags"])  # a user word that is also a predicted tag comes once
    control = tokenizer(prompts, padding="longest", truncation=True, max_length=32, return_tensors="pt")
    assert torch.equal(out.input_ids, control.input_ids) and torch.equal(out.attention_mask, control.attention_mask)
    whole = model.generate(pixel_values, view_boxes, **control, add_predicted_tags=False)
    assert [r["caption"] for r in records] == tokenizer.batch_decode(whole.sequences, skip_special_tokens=True)
    assert torch.allclose(torch.tensor([r["score"] for r in records]), whole.sequences_scores.exp())
    assert torch.allclose(out.sequences_scores, out.language_model_outputs.sequences_scores)


def test_control_prompt_tokens_equal_the_tokenized_text_prompt(tokenizer):
    """The token-level prompt of `ControlPromptTokens` against the slow reference, the tokenizer on the text
    prompt, over random user words and tag sets, truncation included."""
    import random

    from dynrefer_hf.prompts import ControlPromptTokens, merge_control_words

    tags = list(make_tiny_config().tag_names)
    table = ControlPromptTokens.from_tokenizer(tokenizer, tags, max_length=16)
    rng = random.Random(0)
    for _ in range(300):
        user = rng.sample([*tags, "sky", "red ball", "blue"], rng.randint(0, 3))
        chosen = sorted(rng.sample(range(len(tags)), rng.randint(0, 8)))
        text = format_control_prompt(merge_control_words(user, [tags[i] for i in chosen]))
        expected = tokenizer(text, truncation=True, max_length=16).input_ids
        user_ids = tokenizer(format_control_prompt(user), truncation=True, max_length=16).input_ids if user else None
        assert table.prompt_ids(user_ids, chosen) == expected, (user, chosen)
    with pytest.raises(ValueError, match="cannot hold"):
        ControlPromptTokens.from_tokenizer(tokenizer, ["dog", "a,b"], max_length=16)


def test_generate_without_a_tokenised_tag_vocabulary_says_how_to_build_it():
    model = make_tiny_model(control_prompt_tokens=None)
    pixel_values, view_boxes = make_views()
    with pytest.raises(ValueError, match="tokenize_tag_vocabulary"):
        model.generate(pixel_values, view_boxes, max_new_tokens=2)
    assert model.generate(pixel_values, view_boxes, add_predicted_tags=False, max_new_tokens=2).sequences.shape[0] == 2


def test_generate_takes_the_processors_output_and_label_regions_matches_its_labels(tokenizer):
    """`generate(**processor(...))`: the processor's bookkeeping keys are accepted; the heads-only
    `label_regions` gives the labels of the full path."""
    import numpy as np

    model = make_tiny_model()
    processor = make_processor(tokenizer)
    image = np.random.default_rng(0).integers(0, 256, (60, 80, 3), dtype=np.uint8)
    inputs = processor(images=image, boxes=[[5, 5, 40, 30], [0, 0, 80, 60]], controls=[["sky"], []])
    full = model.generate(**inputs, max_new_tokens=3)
    heads = model.label_regions(**inputs)
    assert heads.sequences is None and heads.language_model_outputs is None
    for key in ("tag_logits", "tag_mask", "attribute_scores", "class_scores"):
        assert torch.equal(heads[key], full[key]), key
    with pytest.raises(TypeError, match="unexpected"):
        model.label_regions(**inputs, num_beams=2)


def test_identical_views_go_through_the_vision_tower_once_with_the_outputs_of_running_every_view():
    from tiny import make_varied_tiny_model

    model = make_varied_tiny_model()
    pixel_values, view_boxes = make_views(regions=3)
    pixel_values[:, 2] = pixel_values[0, 2]  # the whole image (t = 1): the same view for every region
    pixel_values[1, 1] = pixel_values[0, 2]  # a selection that picked t = 1 twice
    batches = []
    model.vision_model.register_forward_pre_hook(
        lambda module, args, kwargs: batches.append(len(kwargs["pixel_values"])), with_kwargs=True
    )
    with torch.no_grad():
        once = model(pixel_values, view_boxes, output_hidden_states=True)
        once_generated = model.generate(pixel_values, view_boxes, max_new_tokens=4)
        model.config.deduplicate_views = False  # the reference: every view through the tower
        every = model(pixel_values, view_boxes, output_hidden_states=True)
        every_generated = model.generate(pixel_values, view_boxes, max_new_tokens=4)
    assert batches == [6, 6, 9, 9]  # 9 views, 6 distinct
    for got, expected in (
        (once.vision_outputs.last_hidden_state, every.vision_outputs.last_hidden_state),
        (once.vision_outputs.pooler_output, every.vision_outputs.pooler_output),
        (once.region_queries, every.region_queries),
        (once.tag_logits, every.tag_logits),
        *zip(once.vision_outputs.hidden_states, every.vision_outputs.hidden_states, strict=True),
    ):
        assert got.shape == expected.shape and torch.allclose(got, expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(once_generated.sequences, every_generated.sequences)
    assert torch.equal(once_generated.tag_mask, every_generated.tag_mask)


def test_unique_views_finds_exactly_the_equal_views():
    from dynrefer_hf.modeling_view_encoder import unique_views

    images = torch.randn(5, 3, 64, 64)
    assert unique_views(images) is None
    images[3] = images[1]
    images[4] = images[1].clone()
    images[4, 2, 7, 7] += 1e-6  # one pixel apart, one the strided sample skips: a distinct view
    first_index, inverse = unique_views(images)
    assert first_index.tolist() == [0, 1, 2, 4] and inverse.tolist() == [0, 1, 2, 1, 3]
    assert torch.equal(images[first_index][inverse], images)


def test_head_scores_at_inference():
    model = make_tiny_model()
    pixel_values, view_boxes = make_views()
    with torch.no_grad():
        queries = model.get_region_queries(pixel_values, view_boxes)
        tag_logits, tag_mask, attribute_scores, class_scores = model.predict_labels(
            queries, tag_threshold=0.5
        )
        prompt_probs = torch.sigmoid(
            model.attribute_similarity(queries, model.att_embeds).to(torch.bfloat16)
        ).float()
        raw_classes = model.attribute_similarity(queries, model.ov_embeds)
    groups = [[0, 1], [2], [3, 4, 5]]  # tiny attribute group sizes 2, 1, 3
    expected = torch.stack([prompt_probs[:, g].amax(dim=1) for g in groups], dim=1)
    assert torch.equal(attribute_scores, expected)
    assert torch.equal(class_scores, raw_classes.to(torch.bfloat16).float())
    assert torch.equal(tag_logits, tag_logits.to(torch.bfloat16).float())  # bf16-quantised like upstream
    assert torch.equal(tag_mask, torch.sigmoid(tag_logits.to(torch.bfloat16)) > 0.5)
    model.config.quantize_head_outputs = False
    with torch.no_grad():
        exact = model.predict_labels(queries)[0]
    assert not torch.equal(exact, exact.to(torch.bfloat16).float())


@pytest.mark.slow
def test_greedy_scores_are_summed_log_probabilities(tokenizer):
    model = make_tiny_model()
    pixel_values, view_boxes = make_views()
    outputs = model.generate(
        pixel_values,
        view_boxes,
        tag_threshold=1.0,
        num_beams=1,
        max_new_tokens=3,
        min_new_tokens=3,
        repetition_penalty=1.0,
    )
    records = make_processor(tokenizer).post_process_generation(outputs, model.config.tag_names)
    assert not any(r["tags"] for r in records)  # no tag passes a threshold of 1: the prompt is "|"
    control = tokenizer(["|"] * REGIONS, return_tensors="pt")
    with torch.no_grad():
        queries = model.get_region_queries(pixel_values, view_boxes)
        embeds, mask = model._language_model_inputs(queries, control.input_ids, control.attention_mask)
        decoded = torch.zeros(REGIONS, 1, dtype=torch.long)
        total = torch.zeros(REGIONS)
        for _ in range(3):
            logits = model.language_model(
                inputs_embeds=embeds, attention_mask=mask, decoder_input_ids=decoded
            ).logits
            logits[:, -1, 1] = -float("inf")
            log_probs = F.log_softmax(logits[:, -1], dim=-1)
            token = log_probs.argmax(-1)
            total += log_probs.gather(1, token[:, None]).squeeze(1)
            decoded = torch.cat([decoded, token[:, None]], dim=1)
    assert torch.allclose(torch.tensor([r["score"] for r in records]), total.exp(), rtol=1e-5)


# ---------------------------------------------------------------------------- serialisation / auto


@pytest.mark.slow
def test_save_load_gives_identical_outputs_and_auto_classes(tmp_path, tokenizer):
    model = make_tiny_model()
    randomise_align(model)
    pixel_values, view_boxes = make_views()
    batch = make_batch(tokenizer)
    with torch.no_grad():
        expected = model(pixel_values, view_boxes, **batch)
    model.save_pretrained(tmp_path)
    for auto in (AutoModel, AutoModelForImageTextToText, DynReferForRegionCaptioning):
        loaded = auto.from_pretrained(tmp_path).eval()
        assert type(loaded) is DynReferForRegionCaptioning
        with torch.no_grad():
            out = loaded(pixel_values, view_boxes, **batch)
        for key in ("loss", "logits", "tag_logits", "region_queries"):
            assert torch.equal(out[key], expected[key]), key
        trainable = {n.split(".")[0] for n, p in loaded.named_parameters() if p.requires_grad}
        assert trainable == set(DEFAULT_TRAINABLE_MODULES)
    for name in ("clip_embeds", "att_embeds", "ov_embeds"):
        assert torch.equal(getattr(loaded, name), getattr(model, name))


def test_flan_t5_lm_head_is_untied(tmp_path):
    model = make_tiny_model()
    language_model = model.language_model
    assert language_model.lm_head.weight is not language_model.shared.weight
    assert language_model.encoder.embed_tokens.weight is language_model.shared.weight
    with torch.no_grad():
        language_model.lm_head.weight.add_(1.0)
    model.save_pretrained(tmp_path)
    loaded = AutoModel.from_pretrained(tmp_path)
    loaded.tie_weights()
    assert torch.equal(loaded.language_model.lm_head.weight, language_model.lm_head.weight)
    assert torch.equal(loaded.language_model.shared.weight, language_model.shared.weight)


def test_ln_vision_eps_and_return_tuple():
    model = make_tiny_model()
    assert model.vision_model.post_layernorm.eps == 1e-5
    assert all(layer.layer_norm1.eps == 1e-6 for layer in model.vision_model.encoder.layers)
    pixel_values, view_boxes = make_views()
    with torch.no_grad():
        as_tuple = model(pixel_values, view_boxes, return_dict=False)
    # loss parts and logits absent without targets: (tag_logits, region_queries, vision, Q-Former outputs)
    assert isinstance(as_tuple, tuple) and as_tuple[1].shape == (REGIONS, 4, 32)
    assert isinstance(as_tuple[2], tuple) and isinstance(as_tuple[3], tuple)


def test_trainable_switch(tmp_path):
    model = make_tiny_model()
    assert (
        not model.query_tokens.requires_grad
        and not model.vision_model.embeddings.patch_embedding.weight.requires_grad
    )
    assert not any(p.requires_grad for p in model.language_model.parameters())
    model.set_trainable(["language_projection", "query_tokens"])
    assert {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad} == {
        "language_projection",
        "query_tokens",
    }
    model.save_pretrained(tmp_path)
    reloaded = AutoModel.from_pretrained(tmp_path)
    assert {n.split(".")[0] for n, p in reloaded.named_parameters() if p.requires_grad} == {
        "language_projection",
        "query_tokens",
    }
    with pytest.raises(ValueError, match="unknown trainable modules"):
        model.set_trainable(["t5_proj"])


def test_precision_on_cpu_is_float32_and_bf16_language_model_runs(tokenizer):
    model = make_tiny_model()
    pixel_values, view_boxes = make_views()
    batch = make_batch(tokenizer)
    with torch.no_grad():
        out = model(pixel_values, view_boxes, **batch)
    assert out.region_queries.dtype == torch.float32 and out.logits.dtype == torch.float32
    model.to_upstream_precision()
    assert all(p.dtype == torch.bfloat16 for p in model.language_model.parameters())
    assert model.qformer.layernorm.weight.dtype == torch.float32
    with torch.no_grad():
        out_bf16 = model(pixel_values, view_boxes, **batch)
    assert (
        torch.isfinite(out_bf16.loss) and abs(out_bf16.loss.item() - out.loss.item()) < 0.1 * out.loss.item()
    )


def test_upstream_precision_dataflow_under_autocast(tokenizer, monkeypatch):
    """The CUDA precision plan of docs/upstream/model.md §15, exercised with CPU autocast."""
    model = make_tiny_model().to_upstream_precision()
    monkeypatch.setattr(model, "_uses_autocast", lambda device: True)
    seen = {}

    def record(name):
        def hook(module, args, kwargs, out):
            seen.setdefault(name, (args, kwargs, out))

        return hook

    hooks = [
        model.vision_model.encoder.layers[0].mlp.fc1.register_forward_hook(
            record("vit_linear"), with_kwargs=True
        ),
        model.vision_model.post_layernorm.register_forward_hook(record("ln_vision"), with_kwargs=True),
        model.cvem_mlp.register_forward_hook(record("fusion"), with_kwargs=True),
        model.tag_fc.register_forward_hook(record("tag_fc"), with_kwargs=True),
        model.language_model.encoder.register_forward_hook(record("lm_encoder"), with_kwargs=True),
    ]
    pixel_values, view_boxes = make_views()
    with torch.no_grad():
        out = model(pixel_values, view_boxes, **make_batch(tokenizer))
    for hook in hooks:
        hook.remove()
    assert seen["vit_linear"][2].dtype == torch.float16  # ViT matmuls in fp16 ...
    assert model.vision_model.encoder.layers[0].mlp.fc1.weight.dtype == torch.float32  # ... from fp32 weights
    assert seen["ln_vision"][2].dtype == torch.float32
    assert seen["fusion"][0][0].dtype == torch.float32 and seen["fusion"][2].dtype == torch.float32
    assert out.region_queries.dtype == torch.float32  # Q-Former outside autocast
    assert seen["tag_fc"][2].dtype == torch.bfloat16  # heads under bf16 autocast
    assert seen["lm_encoder"][1]["inputs_embeds"].dtype == torch.float32  # fp32 inputs into the bf16 LM
    assert torch.isfinite(out.loss)


# ------------------------------------------------------------------------------ causal LM variant


@pytest.mark.slow
def test_causal_language_model_variant(tokenizer):
    text_config = {
        "model_type": "llama",
        "vocab_size": len(tokenizer),
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "pad_token_id": 0,
        "eos_token_id": 1,
        "bos_token_id": 1,
    }
    model = make_tiny_model(text_config=text_config)
    assert model.config.use_decoder_only_language_model
    pixel_values, view_boxes = make_views()
    control = tokenizer(["dog|", "man|"], return_tensors="pt")  # equal lengths: no padding
    assert control.attention_mask.all()
    target = tokenizer(["a white dog", "the man riding a horse"], padding="longest", return_tensors="pt")
    labels = target.input_ids.masked_fill(target.attention_mask == 0, -100)
    out = model(
        pixel_values,
        view_boxes,
        input_ids=control.input_ids,
        attention_mask=control.attention_mask,
        labels=labels,
    )
    prefix = 4 + control.input_ids.shape[1]
    caption_logits = out.logits[:, prefix - 1 : prefix - 1 + labels.shape[1]]  # position t predicts token t+1
    expected = F.cross_entropy(
        caption_logits.reshape(-1, caption_logits.shape[-1]), labels.reshape(-1), ignore_index=-100
    )
    assert torch.allclose(out.loss_caption, expected, atol=1e-5)
    out.loss_caption.backward()
    assert model.language_projection.weight.grad is not None and model.cem_memory.grad.abs().sum() > 0

    # generate(**processor(...)) through the bridge, against greedy decoding written out step by step
    import numpy as np

    processor = make_processor(tokenizer)
    image = np.random.default_rng(0).integers(0, 256, (60, 80, 3), dtype=np.uint8)
    inputs = processor(images=image, boxes=[[5, 5, 40, 30], [20, 10, 70, 55]], controls=["dog", "man"])
    steps = 4
    generated = model.generate(
        **inputs, tag_threshold=1.0, num_beams=1, max_new_tokens=steps, min_new_tokens=steps, repetition_penalty=1.0
    )
    prompts = tokenizer(["dog|", "man|"], return_tensors="pt")  # no tag passes a threshold of 1
    assert torch.equal(generated.input_ids, prompts.input_ids) and prompts.attention_mask.all()
    with torch.no_grad():
        queries = model.get_region_queries(inputs["pixel_values"], inputs["view_boxes"])
        embed = model.language_model.get_input_embeddings()
        sequence = torch.cat([model.language_projection(queries), embed(prompts.input_ids) + model.cem_memory], dim=1)
        decoded = torch.zeros(2, 0, dtype=torch.long)
        for _ in range(steps):
            logits = model.language_model(inputs_embeds=sequence).logits[:, -1]
            logits[:, 1] = -float("inf")  # min_new_tokens forbids EOS
            token = logits.argmax(-1, keepdim=True)
            decoded = torch.cat([decoded, token], dim=1)
            sequence = torch.cat([sequence, embed(token)], dim=1)
    assert torch.equal(generated.sequences, decoded)
    records = processor.post_process_region_captioning(generated, inputs, model.config)[0]
    assert [r["caption"] for r in records] == tokenizer.batch_decode(decoded, skip_special_tokens=True)


# ------------------------------------------------------------------------------------ vocabulary


def test_set_vocabulary_needs_a_text_encoder(tokenizer):
    model = make_tiny_model()
    with pytest.raises(ValueError, match="text encoder"):
        model.set_vocabulary(tags=["dog"], tokenizer=tokenizer)


def test_set_vocabulary_recomputes_tables(tokenizer):
    text_encoder_config = {
        "vocab_size": len(tokenizer),
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 4,
        "projection_dim": 32,
        "max_position_embeddings": 16,
        "hidden_act": "gelu",
        "pad_token_id": 0,
        "bos_token_id": 1,
        "eos_token_id": 1,
    }
    model = make_tiny_model(text_encoder_config=text_encoder_config)
    assert isinstance(model.text_encoder, CLIPTextModelWithProjection)
    assert not any(p.requires_grad for p in model.text_encoder.parameters())
    model.set_vocabulary(
        tags=["dog", "red car", "tree"],
        attributes={"red": ["the red", "the  is red"], "tall": ["the tall"]},
        classes=["Dog", "Car"],
        tokenizer=tokenizer,
    )
    assert model.config.tag_names == ["dog", "red car", "tree"] and model.clip_embeds.shape == (3, 32)
    assert model.config.attribute_group_sizes == [2, 1] and model.att_embeds.shape == (3, 32)
    assert model.config.class_prompts == ["the dog", "the car"] and model.ov_embeds.shape == (2, 32)
    with torch.no_grad():
        ids = tokenizer(["red car"], return_tensors="pt").input_ids  # unpadded: EOT is the last token
        alone = model.text_encoder(input_ids=ids).text_embeds[0]
    assert torch.allclose(model.clip_embeds[1], alone, atol=1e-5)
    assert model.config.control_prompt_tokens is None  # the old tags' pieces are gone: rebuilt from the tokenizer
    model.config.control_prompt_tokens = make_processor(tokenizer).tokenize_tag_vocabulary(model.config.tag_names)
    pixel_values, view_boxes = make_views()
    outputs = model.generate(pixel_values, view_boxes, max_new_tokens=2, tag_threshold=0.0)
    records = make_processor(tokenizer).post_process_generation(outputs, model.config.tag_names)
    assert len(records[0]["attribute_scores"]) == 2 and len(records[0]["class_scores"]) == 2
    assert records[0]["tags"] == ["dog", "red car", "tree"]
    assert tokenizer.decode(outputs.input_ids[0], skip_special_tokens=True) == "dog,red car,tree|"


# ------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda p, b: (p[0], b), r"\[R, V, 3, H, W\]"),
        (lambda p, b: (p[:, :2], b[:, :2]), "config.num_views"),
        (lambda p, b: (p[..., :28, :28], b), "each view must be"),
        (lambda p, b: (p, b[..., :3]), "view_boxes must be"),
        (lambda p, b: (p, b[:1]), "view_boxes must be"),
        (lambda p, b: (p.index_put((torch.tensor(0),), torch.tensor(float("nan"))), b), "NaN"),
        (lambda p, b: (p, b.index_put((torch.tensor(0),), torch.tensor(float("nan")))), "NaN"),
        (lambda p, b: (p, b[..., [2, 1, 0, 3]]), "x2 >= x1"),
    ],
)
def test_bad_views_raise(change, message):
    model = make_tiny_model()
    pixel_values, view_boxes = change(*make_views())
    with pytest.raises(ValueError, match=message):
        model(pixel_values, view_boxes)


def test_bad_targets_raise(tokenizer):
    model = make_tiny_model()
    pixel_values, view_boxes = make_views()
    with pytest.raises(ValueError, match="tag_labels"):
        model(pixel_values, view_boxes, tag_labels=torch.zeros(REGIONS, 11))
    with pytest.raises(ValueError, match="caption_embeds"):
        model(pixel_values, view_boxes, caption_embeds=torch.zeros(REGIONS + 1, 32))
    with pytest.raises(ValueError, match="input_ids"):
        model(pixel_values, view_boxes, input_ids=torch.zeros(REGIONS + 1, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="input_ids"):
        model.generate(pixel_values, view_boxes, input_ids=torch.ones(REGIONS + 1, 3, dtype=torch.long))


def test_nested_outputs_decoder_input_ids_and_eager_attention(tokenizer):
    model = make_tiny_model()
    pixel_values, view_boxes = make_views()
    decoder_input_ids = torch.tensor([[0, 5, 6], [0, 7, 8]])[: pixel_values.shape[0]]
    with torch.no_grad():
        sdpa = model(pixel_values, view_boxes)
        model.set_attn_implementation("eager")  # attention weights need eager; the label heads follow the config
        assert model.tag_head.encoder.layer[0].crossattention.self.config._attn_implementation == "eager"
        out = model(
            pixel_values,
            view_boxes,
            decoder_input_ids=decoder_input_ids,
            output_attentions=True,
            output_hidden_states=True,
        )
    config = model.config
    regions, views = pixel_values.shape[:2]
    assert out.loss is None and out.logits.shape == (regions, 3, config.text_config.vocab_size)
    vision, qformer, language = out.vision_outputs, out.qformer_outputs, out.language_model_outputs
    assert len(vision.hidden_states) == config.vision_config.num_hidden_layers + 1
    assert vision.hidden_states[0].shape[0] == regions * views and len(vision.attentions) == 2
    assert len(qformer.hidden_states) == config.qformer_config.num_hidden_layers + 1
    assert len(language.decoder_hidden_states) == config.text_config.num_decoder_layers + 1
    torch.testing.assert_close(sdpa.tag_logits, out.tag_logits, rtol=1e-2, atol=1e-2)  # bf16-rounded
    with pytest.warns(FutureWarning, match="loss_caption"):
        assert out.loss_llm is None


def test_missing_language_model_weights_get_t5_initialisation(tmp_path):
    from safetensors.torch import load_file, save_file

    model = make_tiny_model()
    model.save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    missing = [key for key in state if key.startswith("language_model.") and ".SelfAttention.q." in key]
    for key in missing:
        state.pop(key)
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    loaded = DynReferForRegionCaptioning.from_pretrained(tmp_path)
    text = model.config.text_config
    q = loaded.language_model.encoder.block[0].layer[0].SelfAttention.q.weight
    # T5: q ~ N(0, (d_model * d_kv) ** -0.5); a left-over N(0, 1) would be 16 times wider
    assert q.std().item() == pytest.approx((text.d_model * text.d_kv) ** -0.5, rel=0.25)
    k = "language_model.encoder.block.0.layer.0.SelfAttention.k.weight"
    torch.testing.assert_close(loaded.state_dict()[k], model.state_dict()[k])  # loaded weights untouched
    assert torch.count_nonzero(DynReferForRegionCaptioning(model.config).clip_embeds) == 0  # deterministic tables


def test_the_model_imports_nothing_from_the_processor():
    """The model is tensors in, tensors out: no model module imports the processor or the image processor."""
    import ast
    from pathlib import Path

    package = Path(dynrefer_hf.__file__).parent
    modules = sorted(package.glob("modeling_*.py"))
    assert len(modules) == 7
    for path in modules:
        imported = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                imported.add((node.module or "").split(".")[-1])
            elif isinstance(node, ast.Import):
                imported.update(alias.name.split(".")[-1] for alias in node.names)
        assert not imported & {"processing_dynrefer", "image_processing_dynrefer", "pipelines"}, path.name
