"""Basic behaviour of the tiny checkpoints shared by every test (fixtures in conftest.py)."""

import torch

from interleaf.model import InternVLChatModel, load_checkpoint


def test_tiny_fixtures_load_and_agree(tiny_ckpt, tiny_ckpt_hf):
    model, tok = load_checkpoint(tiny_ckpt)
    model_hf, _ = load_checkpoint(tiny_ckpt_hf)
    assert isinstance(model, InternVLChatModel)
    assert model.config.num_image_token == 256
    assert model.config.layout == "internvl_chat" and model_hf.config.layout == "hf"
    assert model.config.img_context_token_id == tok.convert_tokens_to_ids("<IMG_CONTEXT>")
    ids = tok("<img>" + "<IMG_CONTEXT>" * 256 + "</img>\nhello", return_tensors="pt").input_ids
    pixel_values = torch.randn(1, 3, 448, 448, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = model(input_ids=ids, pixel_values=pixel_values).logits
        b = model_hf(input_ids=ids, pixel_values=pixel_values).logits
    assert a.shape == (1, ids.shape[1], model.config.llm.vocab_size)
    assert torch.isfinite(a).all()
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_image_features_placed_as_masked_scatter(tiny_ckpt):
    """``embed`` writes image features by index (no host sync in the backward); values and gradients
    are those of transformers' formulation, ``masked_scatter`` at the ``<IMG_CONTEXT>`` positions."""
    model, tok = load_checkpoint(tiny_ckpt)
    model = model.float()
    text = "a<img>" + "<IMG_CONTEXT>" * 256 + "</img> b <img>" + "<IMG_CONTEXT>" * 256 + "</img> c"
    ids = tok([text, text], return_tensors="pt").input_ids
    ids[1, :3] = ids[0, -3:]  # rows differ outside the images
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(4, 256, model.config.llm.hidden_size, generator=g, requires_grad=True)
    upstream = torch.randn(*ids.shape, model.config.llm.hidden_size, generator=g)
    table = model.language_model.model.embed_tokens.weight
    ours = model.embed(ids, image_embeds=feats)
    grads_ours = torch.autograd.grad((ours * upstream).sum(), (feats, table))
    tokens = model.language_model.model.embed_tokens(ids)
    mask = (ids == model.config.img_context_token_id).unsqueeze(-1)
    ref = tokens.masked_scatter(mask, feats.reshape(-1, tokens.shape[-1]))
    grads_ref = torch.autograd.grad((ref * upstream).sum(), (feats, table))
    assert torch.equal(ours, ref)
    for a, b in zip(grads_ours, grads_ref):
        assert torch.equal(a, b)
