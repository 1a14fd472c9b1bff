"""The BLIP text model on the one core: parity with transformers 5.x BlipText*, modes, losses, checkpoints,
attention capture and Grad-CAM."""

import numpy as np
import pytest
import torch
import transformers

import bertkit
from bertkit import blip

TEXT = dict(vocab_size=30, hidden_size=12, encoder_hidden_size=8, intermediate_size=16, num_hidden_layers=2,
            num_attention_heads=3, max_position_embeddings=20, bos_token_id=1, eos_token_id=2, pad_token_id=0,
            sep_token_id=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def randomize(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3 + (1.0 if name.endswith("LayerNorm.weight") else 0.0))
    return model.eval()


@pytest.fixture
def inputs():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(4, 30, (2, 6), generator=g)
    ids[:, 0] = 1
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1] * 6])
    image = torch.randn(2, 5, 8, generator=g)
    # transformers 5.x BlipText* ignores encoder_attention_mask (the output is the same with or without it),
    # so parity uses a full mask; test_image_padding_mask checks masking without a reference.
    image_mask = torch.ones(2, 5, dtype=torch.long)
    labels = ids.masked_fill(mask == 0, -100)
    return dict(ids=ids, mask=mask, image=image, image_mask=image_mask, labels=labels)


def close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_text_model_parity_both_modes(tmp_path, inputs):
    ref = randomize(transformers.BlipTextModel(transformers.BlipTextConfig(**TEXT)))
    ref.save_pretrained(tmp_path)
    ours = bertkit.BertModel.from_pretrained(tmp_path, strict=True)
    assert ours.config.encoder_width == 8 and ours.config.add_cross_attention and ours.config.type_vocab_size == 0
    with torch.no_grad():
        a = ours(inputs["ids"], inputs["mask"], encoder_hidden_states=inputs["image"],
                 encoder_attention_mask=inputs["image_mask"], mode="multimodal", output_hidden_states=True)
        b = ref(inputs["ids"], inputs["mask"], encoder_hidden_states=inputs["image"],
                encoder_attention_mask=inputs["image_mask"], output_hidden_states=True)
        close(a.last_hidden_state, b.last_hidden_state)
        close(a.pooler_output, b.pooler_output)
        for x, y in zip(a.hidden_states, b.hidden_states, strict=True):
            close(x, y)
        text = ours(inputs["ids"], inputs["mask"], encoder_hidden_states=inputs["image"], mode="text")
        close(text.last_hidden_state, ref(inputs["ids"], inputs["mask"]).last_hidden_state)
        assert not torch.allclose(text.last_hidden_state, a.last_hidden_state)
        # is_decoder at call time: causal, as BlipTextModel(is_decoder=True).
        close(ours(inputs["ids"], inputs["mask"], is_decoder=True).last_hidden_state,
              ref(inputs["ids"], inputs["mask"], is_decoder=True).last_hidden_state)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_lm_head_parity_losses_and_return_logits(tmp_path, inputs, reduction):
    ref = randomize(transformers.BlipTextLMHeadModel(transformers.BlipTextConfig(**TEXT, label_smoothing=0.1)))
    ref.save_pretrained(tmp_path)
    ours = bertkit.BertLMHeadModel.from_pretrained(tmp_path, strict=True)
    assert ours.config.label_smoothing == 0.1
    kw = dict(attention_mask=inputs["mask"], encoder_hidden_states=inputs["image"],
              encoder_attention_mask=inputs["image_mask"])
    with torch.no_grad():
        a = ours(inputs["ids"], labels=inputs["labels"], reduction=reduction, **kw)
        b = ref(inputs["ids"], labels=inputs["labels"], reduction=reduction, **kw)
        close(a.logits, b.logits)
        close(a.loss, b.loss)
        assert a.loss.shape == ((2,) if reduction == "none" else ())
        close(ours(inputs["ids"], return_logits=True, **kw), ref(inputs["ids"], return_logits=True, **kw))


def test_bertkit_saves_back_in_blip_text_naming(tmp_path, inputs):
    cfg = bertkit.BertConfig.from_dict(dict(TEXT, model_type="blip_text_model"))
    ours = randomize(bertkit.BertLMHeadModel(cfg), seed=3)
    ours.save_pretrained(tmp_path)
    ref = transformers.BlipTextLMHeadModel.from_pretrained(tmp_path).eval()
    assert ref.config.encoder_hidden_size == 8 and ref.config.is_decoder
    kw = dict(attention_mask=inputs["mask"], encoder_hidden_states=inputs["image"])
    with torch.no_grad():
        close(ours(inputs["ids"], **kw).logits, ref(inputs["ids"], **kw).logits)


def test_load_text_decoder_from_blip_folder_and_salesforce_pth(tmp_path, inputs):
    vc = transformers.BlipVisionConfig(hidden_size=8, intermediate_size=12, num_hidden_layers=1,
                                       num_attention_heads=2, image_size=8, patch_size=4)
    cfg = transformers.BlipConfig(text_config=TEXT, vision_config=vc.to_dict(), projection_dim=8)
    ref = randomize(transformers.BlipForConditionalGeneration(cfg), seed=4)
    ref.save_pretrained(tmp_path / "hf")
    ours = bertkit.BertLMHeadModel.from_pretrained(tmp_path / "hf", prefix="text_decoder", strict=True)
    kw = dict(attention_mask=inputs["mask"], encoder_hidden_states=inputs["image"])
    with torch.no_grad():
        expected = ref.text_decoder(inputs["ids"], **kw).logits
        close(ours(inputs["ids"], **kw).logits, expected)
    with pytest.raises(ValueError, match=r"no tensor starts with 'text_encoder\.'; prefixes present: "
                                         r"text_decoder, vision_model"):
        bertkit.BertLMHeadModel.from_pretrained(tmp_path / "hf", prefix="text_encoder")
    # Salesforce's release: a pickle {"model": state_dict} and a med_config.json that says type_vocab_size 2
    # although med.py has no token-type embeddings.
    torch.save({"model": ref.state_dict()}, tmp_path / "model_base_caption.pth")
    med = bertkit.BertConfig(**{k: v for k, v in TEXT.items() if k not in ("encoder_hidden_size", "sep_token_id")},
                             encoder_width=8, add_cross_attention=True, type_vocab_size=2)
    sf = bertkit.BertLMHeadModel.from_pretrained(tmp_path / "model_base_caption.pth", config=med,
                                                 prefix="text_decoder", strict=True)
    assert sf.config.type_vocab_size == 0
    with torch.no_grad():
        close(sf(inputs["ids"], **kw).logits, expected)


def test_multimodal_needs_image_and_lists_of_images(inputs):
    torch.manual_seed(0)
    cfg = bertkit.BertConfig.from_dict(dict(TEXT, model_type="blip_text_model"))
    model = randomize(bertkit.BertModel(cfg, add_pooling_layer=False))
    with pytest.raises(ValueError, match=r"mode='multimodal' needs encoder_hidden_states"):
        model(inputs["ids"], mode="multimodal")
    with pytest.raises(ValueError, match=r"mode must be 'text' or 'multimodal'"):
        model(inputs["ids"], mode="image")
    other = torch.randn(2, 3, 8)
    other_mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    inputs["image_mask"] = torch.tensor([[1, 1, 1, 1, 0], [1] * 5])
    with torch.no_grad():
        two = model(inputs["ids"], inputs["mask"], encoder_hidden_states=[inputs["image"], other],
                    encoder_attention_mask=[inputs["image_mask"], other_mask]).last_hidden_state
        # By hand: layer 0 attends to the first image, layer 1 to the second.
        from bertkit.nn.masks import build_attention_mask
        h = model.embeddings(inputs["ids"])
        m, _ = build_attention_mask(inputs["mask"], 2, 6, 6, h.dtype, h.device)
        for layer, (img, img_mask) in zip(model.encoder.layer, [(inputs["image"], inputs["image_mask"]),
                                                                  (other, other_mask)]):
            em, _ = build_attention_mask(img_mask, 2, 6, img.shape[1], h.dtype, h.device)
            h = layer(h, m, img, em)[0]
    close(two, h)


def test_image_padding_mask_equals_dropping_the_padded_patches(inputs):
    cfg = bertkit.BertConfig.from_dict(dict(TEXT, model_type="blip_text_model"))
    model = randomize(bertkit.BertLMHeadModel(cfg))
    image_mask = torch.tensor([[1, 1, 1, 0, 0], [1] * 5])
    with torch.no_grad():
        padded = model(inputs["ids"], inputs["mask"], encoder_hidden_states=inputs["image"],
                       encoder_attention_mask=image_mask).logits
        cut = model(inputs["ids"][:1], inputs["mask"][:1], encoder_hidden_states=inputs["image"][:1, :3]).logits
        full = model(inputs["ids"], inputs["mask"], encoder_hidden_states=inputs["image"]).logits
    close(padded[0], cut[0])
    close(padded[1], full[1])
    assert not torch.allclose(padded[0], full[0])


def test_encoder_embeds_feed_the_layers_directly(inputs):
    cfg = bertkit.BertConfig.from_dict(dict(TEXT, model_type="blip_text_model"))
    model = randomize(bertkit.BertModel(cfg))
    with torch.no_grad():
        emb = model.embeddings(inputs["ids"])
        a = model(encoder_embeds=emb, attention_mask=inputs["mask"], encoder_hidden_states=inputs["image"])
        b = model(inputs["ids"], inputs["mask"], encoder_hidden_states=inputs["image"])
    close(a.last_hidden_state, b.last_hidden_state)
    with pytest.raises(ValueError, match="pass encoder_embeds alone"):
        model(inputs["ids"], encoder_embeds=emb)


def test_gradcam_formula_by_hand():
    # 1 sample, 2 heads, 1 text token, [CLS] + 2x2 patches.
    att = torch.tensor([[[[0.2, 0.1, 0.2, 0.3, 0.2]], [[0.0, 0.4, 0.2, 0.2, 0.2]]]])
    grad = torch.tensor([[[[9.0, 1.0, -1.0, 2.0, 0.5]], [[9.0, -3.0, 1.0, 1.0, 2.0]]]])
    cam = blip.gradcam(att, grad, grid=(2, 2))
    # head 0: [0.1*1, 0.2*0, 0.3*2, 0.2*0.5] = [0.1, 0, 0.6, 0.1]; head 1: [0, 0.2, 0.2, 0.4]; mean of the two
    expected = torch.tensor([[[[0.05, 0.1], [0.4, 0.25]]]])
    close(cam, expected)
    masked = blip.gradcam(att, grad, grid=(2, 2), text_mask=torch.tensor([[0]]))
    assert masked.abs().sum() == 0
    with pytest.raises(ValueError, match=r"4 image tokens do not fill a 3x3 grid"):
        blip.gradcam(att, grad, grid=(3, 3))


def test_attention_capture_and_rendered_png(tmp_path, inputs):
    import matplotlib.image

    cfg = bertkit.BertConfig.from_dict(dict(TEXT, model_type="blip_text_model"))
    model = randomize(bertkit.BertModel(cfg))
    image = inputs["image"].clone().requires_grad_(True)
    inputs["image_mask"] = torch.tensor([[1, 1, 1, 1, 0], [1] * 5])
    first = model.encoder.layer[0].crossattention.self
    seen = {}
    first.register_forward_hook(lambda mod, args, out: seen.update(input=args[0]))
    blip.save_cross_attention(model, layers=[0])
    out = model(inputs["ids"], inputs["mask"], encoder_hidden_states=image, encoder_attention_mask=inputs["image_mask"])
    out.pooler_output.sum().backward()
    att, grads = first.get_attention_map(), first.get_attn_gradients()
    assert att.shape == grads.shape == (2, 3, 6, 5) and grads.abs().sum() > 0
    # The captured map is softmax(q k^T / sqrt(d) + mask) computed from the module's own weights.
    q = first.query(seen["input"]).view(2, 6, 3, 4).transpose(1, 2)
    k = first.key(image).view(2, 5, 3, 4).transpose(1, 2)
    scores = q @ k.transpose(-1, -2) / 2.0 + (1 - inputs["image_mask"][:, None, None, :]) * torch.finfo().min
    close(att, scores.softmax(-1))
    assert not hasattr(model.encoder.layer[1].crossattention.self, "attention_map")  # capture is opt-in
    cam = blip.gradcam(att.detach(), grads, grid=(2, 2), text_mask=inputs["mask"])
    rgb = (np.random.default_rng(0).random((32, 32, 3)) * 255).astype(np.uint8)
    blip.render_heatmap_png(rgb, cam[0, 1], tmp_path / "cam.png")
    png = matplotlib.image.imread(tmp_path / "cam.png")
    assert png.shape[:2] == (32, 32)
    blip.save_cross_attention(model, enabled=False)
    with pytest.raises(ValueError, match="layer 5 has no cross-attention"):
        blip.save_cross_attention(model, layers=[5])
