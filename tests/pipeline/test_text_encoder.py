import json

import open_clip
import pytest
import torch
from open_clip.tokenizer import SimpleTokenizer

from pipeline.builtin.configs import clip_model_cfg
from pipeline.text_encoder import BPE_FILE, TextEncoder, write_bpe_merges
from tests.conftest import WORDS


def test_builtin_style_folder_round_trips(tiny_model_dir):
    te = TextEncoder.from_pretrained(tiny_model_dir / "clip")
    out = te.encode(["a red circle on a black background", "blue square"])
    cfg = clip_model_cfg("tiny", None)
    assert out.prompt_embeds.shape == (2, cfg["text_cfg"]["context_length"], cfg["text_cfg"]["width"])
    assert out.pooled.shape == (2, cfg["embed_dim"])
    assert out.prompt_embeds.dtype == torch.float32
    # pooled equals open_clip's own encode_text (same tokens, same weights)
    tokens = te.tokenize(["a red circle on a black background", "blue square"])
    torch.testing.assert_close(out.pooled, te.model.encode_text(tokens))
    again = TextEncoder.from_pretrained(tiny_model_dir / "clip").encode(["blue square"])
    torch.testing.assert_close(again.prompt_embeds[0], out.prompt_embeds[1])


def test_penultimate_layer_differs_from_last(tiny_model_dir):
    last = TextEncoder.from_pretrained(tiny_model_dir / "clip", layer="last").encode(["red circle"])
    pen = TextEncoder.from_pretrained(tiny_model_dir / "clip", layer="penultimate").encode(["red circle"])
    assert not torch.allclose(last.prompt_embeds, pen.prompt_embeds)
    torch.testing.assert_close(last.pooled, pen.pooled)  # pooled is always the final layer
    with pytest.raises(ValueError, match="layer"):
        TextEncoder.from_pretrained(tiny_model_dir / "clip", layer="middle")


def test_open_clip_config_plus_checkpoint_file(tmp_path):
    cfg = clip_model_cfg("tiny", None)
    cfg_path = tmp_path / "imagine-test-clip.json"
    cfg_path.write_text(json.dumps(cfg))
    torch.manual_seed(0)
    model = open_clip.CLIP(**cfg)
    torch.save(model.state_dict(), tmp_path / "ckpt.pt")  # open_clip's plain state dict
    te = TextEncoder.from_open_clip(str(cfg_path), tmp_path / "ckpt.pt", layer="penultimate")
    tokens = te.tokenize(["a red circle"])
    torch.testing.assert_close(te.encode(["a red circle"]).pooled, model.encode_text(tokens))
    with pytest.raises(FileNotFoundError):
        TextEncoder.from_open_clip(str(cfg_path), tmp_path / "missing.pt")


def test_small_bpe_vocabulary_makes_each_word_one_token(tmp_path):
    size = write_bpe_merges(WORDS, tmp_path / BPE_FILE)
    tok = SimpleTokenizer(str(tmp_path / BPE_FILE), context_length=16)
    assert tok.vocab_size == size
    ids = tok(["a red circle on a black background"])[0]
    assert ids[0] == tok.sot_token_id and ids[8] == tok.eot_token_id and ids[9] == 0
    assert tok.eot_token_id == size - 1  # argmax pooling relies on EOT being the largest id
    assert len(tok.encode("purple")) > 1  # unknown words still tokenize, into pieces
