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
