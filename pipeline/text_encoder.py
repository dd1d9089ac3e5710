"""CLIP text encoder on open_clip: prompts -> per-token hidden states + pooled embedding.

Stable Diffusion conditions its UNet on the per-token hidden states of a frozen CLIP text
transformer (cross-attention keys/values): SD 1.x on OpenAI's ViT-L/14 last layer, SD 2.x on
OpenCLIP ViT-H/14's *penultimate* layer (Rombach et al. 2022; the `FrozenOpenCLIPEmbedder` of
Stability-AI/stablediffusion). We follow that code: run the resblocks up to the chosen layer,
then `ln_final`. The pooled embedding is open_clip's own `encode_text` (EOT token, projected),
the vector the CLIP scorer compares with images.

Sources:
- a folder in open_clip's hub layout (`open_clip_config.json` + `open_clip_model.safetensors`),
  loaded through open_clip's `local-dir:` schema. The built-in model is such a folder, with a
  small BPE merges file of its own (`bpe_merges.txt.gz`) so its vocabulary is ~600 tokens;
- any open_clip model config (a registered name such as `ViT-H-14`, or a JSON file) plus a
  local checkpoint file.
"""
from __future__ import annotations

import gzip
import logging
from dataclasses import dataclass
from pathlib import Path

import open_clip
import torch
from open_clip.tokenizer import SimpleTokenizer, bytes_to_unicode

logger = logging.getLogger(__name__)

LAYERS = ("last", "penultimate")
BPE_FILE = "bpe_merges.txt.gz"


@dataclass
class PromptEmbeds:
    """What the sampler needs for one batch of prompts."""
    prompt_embeds: torch.Tensor  # (B, T, D) per-token hidden states for cross-attention
    pooled: torch.Tensor         # (B, E) projected EOT embedding (CLIP space, not normalized)


class TextEncoder:
    """A frozen open_clip model used for its text tower (and, by the scorer, its image tower).

    Args:
        model: an open_clip `CLIP` (or `CustomTextCLIP`) model.
        tokenizer: the matching open_clip tokenizer (callable: list[str] -> LongTensor (B, T)).
        layer: "last" or "penultimate": which transformer layer's states go to cross-attention.
        device: torch device for inference.
        dtype: the weights' dtype there (float16 on a GPU; outputs are float32 either way).
    """

    def __init__(self, model, tokenizer, layer: str = "last", device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32):
        if layer not in LAYERS:
            raise ValueError(f"layer must be one of {LAYERS}, got {layer!r}")
        self.model = model.to(device, dtype).eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.layer = layer
        self.device = torch.device(device)
        tower = model.text if hasattr(model, "text") else model
        self._tower = tower
        self.context_length = int(tower.context_length)
        self.hidden_size = int(tower.transformer.width)
        self.embed_dim = int(model.visual.output_dim) if hasattr(model, "visual") else None

    # ---- construction -----------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, folder: str | Path, layer: str = "last", device="cpu",
                        dtype: torch.dtype = torch.float32) -> "TextEncoder":
        """Load a folder in open_clip's hub layout (the built-in model is one)."""
        folder = Path(folder)
        if not (folder / "open_clip_config.json").is_file():
            raise FileNotFoundError(f"{folder} has no open_clip_config.json: not an open_clip model folder")
        model = open_clip.create_model(f"local-dir:{folder}", load_weights=True)
        return cls(model, load_tokenizer(folder), layer=layer, device=device, dtype=dtype)

    @classmethod
    def from_open_clip(cls, model_name: str, checkpoint: str | Path | None, layer: str = "last",
                       device="cpu", dtype: torch.dtype = torch.float32) -> "TextEncoder":
        """Any open_clip architecture plus a local checkpoint file.

        Args:
            model_name: a registered open_clip config (`ViT-H-14`, `ViT-L-14`, ...) or a path to a
                model config JSON file (`{"embed_dim":..., "vision_cfg":..., "text_cfg":...}`).
            checkpoint: local `.pt`/`.bin`/`.safetensors` state dict; None = random init (tests only).
        """
        if str(model_name).endswith(".json"):
            path = Path(model_name)
            open_clip.add_model_config(path)
            model_name = path.stem
        if checkpoint is not None and not Path(checkpoint).is_file():
            raise FileNotFoundError(f"open_clip checkpoint not found: {checkpoint}")
        model = open_clip.create_model(model_name, pretrained=str(checkpoint) if checkpoint else None)
        return cls(model, open_clip.get_tokenizer(model_name), layer=layer, device=device, dtype=dtype)

    # ---- inference -----------------------------------------------------------------------
    def tokenize(self, prompts: list[str]) -> torch.Tensor:
        """(B,) prompts -> (B, T) token ids, truncated to the context length (as SD does)."""
        return self.tokenizer(list(prompts)).to(self.device)

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> PromptEmbeds:
        """Encode prompts into per-token states (chosen layer) and the pooled embedding."""
        tokens = self.tokenize(prompts)
        return self.encode_tokens(tokens)

    def encode_tokens(self, tokens: torch.Tensor) -> PromptEmbeds:
        t = self._tower
        cast_dtype = t.transformer.get_cast_dtype()
        x = t.token_embedding(tokens).to(cast_dtype) + t.positional_embedding.to(cast_dtype)  # (B, T, D)
        n_blocks = len(t.transformer.resblocks)
        keep = n_blocks if self.layer == "last" else n_blocks - 1
        x, states = t.transformer.forward_intermediates(x, attn_mask=t.attn_mask, indices=[keep - 1])
        hidden = t.ln_final(states[0])  # (B, T, D) the chosen layer, normalized like SD
        pooled = open_clip.transformer.text_global_pool(
            t.ln_final(x), tokens, t.text_pool_type, eos_token_id=getattr(t, "text_eos_id", None))
        proj = t.text_projection
        if proj is not None:
            pooled = proj(pooled) if isinstance(proj, torch.nn.Linear) else pooled @ proj
        return PromptEmbeds(prompt_embeds=hidden.float(), pooled=pooled.float())


# ---- the built-in model's small BPE vocabulary ------------------------------------------
def load_tokenizer(folder: Path):
    """The tokenizer that goes with an open_clip folder: its own BPE file, else open_clip's."""
    cfg = open_clip.get_model_config(f"local-dir:{folder}") or {}
    context_length = cfg.get("text_cfg", {}).get("context_length", 77)
    if (folder / BPE_FILE).is_file():
        return SimpleTokenizer(bpe_path=str(folder / BPE_FILE), context_length=context_length)
    return open_clip.get_tokenizer(f"local-dir:{folder}")


def write_bpe_merges(words: list[str], path: str | Path) -> int:
    """Write a BPE merges file in which each of `words` is one token; returns the vocab size.

    open_clip's `SimpleTokenizer` builds its vocabulary as 256 bytes, 256 bytes+`</w>`, one
    token per merge, then `<start_of_text>`, `<end_of_text>` (EOT is the largest id, as the
    argmax pooling expects). Words outside the list still tokenize, into smaller pieces.
    A word that is already one token is never split again by merges added after it, so we
    add, word by word, the merge of its first two pieces until it is whole.
    """
    byte_chars = bytes_to_unicode()
    ranks: dict[tuple[str, str], int] = {}
    for word in sorted(set(w.lower() for w in words)):
        symbols = [byte_chars[b] for b in word.encode("utf-8")]
        symbols[-1] += "</w>"
        while len(pieces := _bpe(symbols, ranks)) > 1:
            ranks[(pieces[0], pieces[1])] = len(ranks)
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write("#version: imagine built-in\n")
        f.write("\n".join(f"{a} {b}" for a, b in ranks))  # no trailing newline: it would add an empty merge
    return 512 + len(ranks) + 2


def _bpe(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """The BPE rule of open_clip's tokenizer: merge the lowest-ranked adjacent pair, repeat."""
    symbols = list(symbols)
    while len(symbols) > 1:
        pairs = [(ranks.get((a, b)), i) for i, (a, b) in enumerate(zip(symbols, symbols[1:]))]
        pairs = [p for p in pairs if p[0] is not None]
        if not pairs:
            break
        best = min(pairs)[0]
        merged, i = [], 0
        while i < len(symbols):
            if i + 1 < len(symbols) and ranks.get((symbols[i], symbols[i + 1])) == best:
                merged.append(symbols[i] + symbols[i + 1])
                i += 2
            else:
                merged.append(symbols[i])
                i += 1
        symbols = merged
    return symbols
