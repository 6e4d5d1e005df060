"""Tiny user-style models and data for tests, loaded through `file.py:fn` / `module:fn` like a user's."""

from __future__ import annotations

import os
import time

import torch
from torch import nn


class TinyNet(nn.Module):
    """Embedding -> FFN (fc1 -> relu -> fc2) -> head. Output: logits-like tensor (metric: mse)."""

    def __init__(self, vocab: int = 100, dim: int = 32, hidden: int = 64, out: int = 10) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, out)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        delay = float(os.environ.get("TINY_SLEEP", "0"))
        if delay:
            time.sleep(delay)  # a slow model, so tests can kill a search in the middle of a trial
        h = self.emb(ids).mean(1)
        h = self.norm(h + self.fc2(torch.relu(self.fc1(h))))
        return self.head(h)


def tiny() -> nn.Module:
    torch.manual_seed(0)
    return TinyNet().eval()


def calib() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, 100, (8, 6), generator=g) for _ in range(4)]


class TinyConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1, stride=2)
        self.fc = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.fc(h.mean(dim=(2, 3)))


def tiny_conv() -> nn.Module:
    torch.manual_seed(0)
    return TinyConv().eval()


def conv_calib() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    return [torch.randn(4, 3, 8, 8, generator=g) for _ in range(2)]


# -- deliberately bad factories ---------------------------------------------------------------------------
def not_a_module() -> dict:
    return {"weights": [1, 2, 3]}


def no_layers() -> nn.Module:
    return nn.Sequential(nn.ReLU(), nn.LayerNorm(4))


def empty_data() -> list:
    return []


def wrong_shape_data() -> list[torch.Tensor]:
    return [torch.randn(8, 6)]  # floats where token ids are expected


def nan_model() -> nn.Module:
    m = tiny()
    with torch.no_grad():
        m.head.weight[0, 0] = float("nan")
    return m


class DeepNet(nn.Module):
    """A synthetic deep model: ``depth`` residual blocks of three Linear layers each (210 + 1 layers at the
    default depth), for checking that a 200+-layer model stays searchable."""

    def __init__(self, depth: int = 70, dim: int = 16) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.ModuleDict({"a": nn.Linear(dim, dim), "b": nn.Linear(dim, dim),
                                                   "c": nn.Linear(dim, dim)}) for _ in range(depth))
        self.head = nn.Linear(dim, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for blk in self.blocks:
            x = x + 0.2 * blk["c"](torch.relu(blk["b"](torch.relu(blk["a"](x)))))
        return self.head(x)


def deep() -> nn.Module:
    torch.manual_seed(0)
    return DeepNet().eval()


def deep_calib() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    return [torch.randn(16, 16, generator=g) for _ in range(2)]


def train_data() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return [torch.randint(0, 100, (16, 6), generator=g) for _ in range(8)]


def agreement(model: nn.Module) -> float:
    """The tiny model's "true metric": how often the model's top class agrees with the original's on
    held-out inputs (a task metric that a compressed model can lose)."""
    g = torch.Generator().manual_seed(4)
    x = torch.randint(0, 100, (256, 6), generator=g)
    with torch.no_grad():
        ref = tiny()(x).argmax(-1)
        return float((model(x).argmax(-1) == ref).float().mean())


class TinyDual(nn.Module):
    """A tiny CLIP-style dual encoder with a cross-modal fusion block: image tokens attend to the caption's
    tokens. Output: {"image_embeds", "text_embeds"} (L2-normalized), like transformers' CLIPModel."""

    def __init__(self, dim: int = 32, heads: int = 4) -> None:
        super().__init__()
        from autocomp.models.clip_digits import _classes

        block = _classes()["Block"]
        self.text_model = nn.Module()
        self.text_model.token_embedding = nn.Embedding(100, dim)
        self.text_model.encoder = block(dim, heads, 2 * dim)
        self.vision_model = nn.Module()
        self.vision_model.patch_embedding = nn.Linear(4, dim)
        self.vision_model.encoder = block(dim, heads, 2 * dim)
        self.fusion = block(dim, heads, 2 * dim, cross=True)
        self.text_projection = nn.Linear(dim, 16, bias=False)
        self.visual_projection = nn.Linear(dim, 16, bias=False)

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        t = self.text_model.encoder(self.text_model.token_embedding(input_ids))
        v = self.vision_model.encoder(self.vision_model.patch_embedding(pixel_values))
        v = self.fusion(v, t)
        return {"image_embeds": nn.functional.normalize(self.visual_projection(v.mean(1)), dim=-1),
                "text_embeds": nn.functional.normalize(self.text_projection(t.mean(1)), dim=-1)}


def tiny_dual() -> nn.Module:
    torch.manual_seed(0)
    return TinyDual().eval()


def dual_calib() -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(5)
    return [{"pixel_values": torch.randn(8, 9, 4, generator=g), "input_ids": torch.randint(0, 100, (8, 5), generator=g)}
            for _ in range(3)]


def dual_mismatch() -> list[dict[str, torch.Tensor]]:
    """Image/text batch mismatch: 8 images, 6 captions."""
    g = torch.Generator().manual_seed(5)
    return [{"pixel_values": torch.randn(8, 9, 4, generator=g), "input_ids": torch.randint(0, 100, (6, 5), generator=g)}]


# -- torch's own transformer modules (nn.MultiheadAttention inside) ------------------------------------------
class CharLM(nn.Module):
    """A causal character LM from ``nn.TransformerEncoderLayer``: token + learned position embeddings, a
    causal mask, logits [B, T, V] as a plain tensor (autocomp detects them as logits: metric kl)."""

    def __init__(self, vocab: int = 48, dim: int = 32, heads: int = 4, layers: int = 2, ff: int = 64,
                 ctx: int = 32, norm_first: bool = False, batch_first: bool = True) -> None:
        super().__init__()
        self.batch_first = batch_first
        self.tok = nn.Embedding(vocab, dim)
        self.pos = nn.Parameter(torch.randn(1, ctx, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(dim, heads, ff, dropout=0.1, batch_first=batch_first, norm_first=norm_first)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(dim, vocab)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        t = ids.shape[1]
        mask = nn.Transformer.generate_square_subsequent_mask(t)
        h = self.tok(ids) + self.pos[:, :t]
        if not self.batch_first:
            h = h.transpose(0, 1)
        h = self.encoder(h, mask=mask, is_causal=True)
        if not self.batch_first:
            h = h.transpose(0, 1)
        return self.head(h)


def char_lm() -> nn.Module:
    torch.manual_seed(0)
    return CharLM().eval()


def char_lm_prenorm() -> nn.Module:
    torch.manual_seed(0)
    return CharLM(norm_first=True, batch_first=False).eval()


def char_calib() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return [torch.randint(0, 48, (4, 16), generator=g) for _ in range(3)]
