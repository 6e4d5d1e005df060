"""Architectures a user brings, built offline with seeded random weights (no downloads), loaded through
``file.py:fn`` like a user's: torch's own transformer layers (encoder post- and pre-norm, a decoder with
cross-attention and a ``kdim != embed_dim`` attention without bias), ViT- and ResNet-shaped vision models
(torchvision's module layout; torchvision itself does not import beside this machine's CPU torch), a Conv1d
model, and a module whose weight its parent uses directly (``F.linear``)."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

VOCAB = 40


# -- torch nn.Transformer* ------------------------------------------------------------------------------------
class Seq2Seq(nn.Module):
    """Source features -> Conv1d + TransformerEncoder -> memory; target ids -> TransformerDecoder (self- and
    cross-attention) + one more cross-attention reading the raw features (kdim = vdim = 20 != 32, no bias,
    sequence-first) -> logits [B, T, VOCAB]."""

    def __init__(self) -> None:
        super().__init__()
        self.src_conv = nn.Conv1d(20, 32, 3, padding=1)
        self.encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(32, 4, 64, dropout=0.1, batch_first=True), 1,
                                             enable_nested_tensor=False)
        self.tgt_emb = nn.Embedding(VOCAB, 32)
        self.decoder = nn.TransformerDecoder(nn.TransformerDecoderLayer(32, 4, 64, dropout=0.1, batch_first=True), 1)
        self.raw_attn = nn.MultiheadAttention(32, 4, kdim=20, vdim=20, bias=False)
        self.head = nn.Linear(32, VOCAB)

    def forward(self, src: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
        memory = self.encoder(self.src_conv(src.transpose(1, 2)).transpose(1, 2))
        t = tgt.shape[1]
        h = self.decoder(self.tgt_emb(tgt), memory, tgt_mask=nn.Transformer.generate_square_subsequent_mask(t),
                         tgt_is_causal=True)
        extra, _ = self.raw_attn(h.transpose(0, 1), src.transpose(0, 1), src.transpose(0, 1), need_weights=False)
        return self.head(h + extra.transpose(0, 1))


def seq2seq() -> nn.Module:
    torch.manual_seed(0)
    return Seq2Seq().eval()


def seq2seq_data() -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(4)
    return [{"src": torch.randn(3, 9, 20, generator=g), "tgt": torch.randint(0, VOCAB, (3, 7), generator=g)}
            for _ in range(3)]


# -- vision -------------------------------------------------------------------------------------------------------
class EncoderBlock(nn.Module):
    """torchvision's ViT block layout: ln_1, self_attention (nn.MultiheadAttention, batch_first), ln_2, mlp."""

    def __init__(self, dim: int, heads: int, hidden: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(dim)
        self.self_attention = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.ln_2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(0.0), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.ln_1(x)
        y, _ = self.self_attention(y, y, y, need_weights=False)
        x = x + y
        return x + self.mlp(self.ln_2(x))


class ViT(nn.Module):
    """ViT-shaped (torchvision's names): conv_proj patches, class_token and pos_embedding Parameters,
    encoder.layers.encoder_layer_N, heads.head."""

    def __init__(self, image: int = 16, patch: int = 4, dim: int = 32, heads: int = 4, layers: int = 2,
                 classes: int = 10) -> None:
        super().__init__()
        n = (image // patch) ** 2
        self.conv_proj = nn.Conv2d(3, dim, patch, stride=patch)
        self.class_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.encoder = nn.Module()
        self.encoder.pos_embedding = nn.Parameter(torch.randn(1, n + 1, dim) * 0.02)
        self.encoder.layers = nn.Sequential()
        for i in range(layers):
            self.encoder.layers.add_module(f"encoder_layer_{i}", EncoderBlock(dim, heads, 2 * dim))
        self.encoder.ln = nn.LayerNorm(dim)
        self.heads = nn.Sequential()
        self.heads.add_module("head", nn.Linear(dim, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_proj(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.class_token.expand(x.shape[0], -1, -1), x], dim=1) + self.encoder.pos_embedding
        x = self.encoder.ln(self.encoder.layers(x))
        return self.heads(x[:, 0])


def vit() -> nn.Module:
    torch.manual_seed(0)
    return ViT().eval()


def images() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    return [torch.randn(4, 3, 16, 16, generator=g) for _ in range(2)]


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(y + (x if self.downsample is None else self.downsample(x)))


class ResNet(nn.Module):
    """ResNet-shaped (torchvision's names): conv1/bn1 stem, layer1/layer2 of BasicBlocks, fc."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.layer1 = nn.Sequential(BasicBlock(16, 16, 1))
        self.layer2 = nn.Sequential(BasicBlock(16, 32, 2))
        self.fc = nn.Linear(32, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer2(self.layer1(F.relu(self.bn1(self.conv1(x)))))
        return self.fc(x.mean(dim=(2, 3)))


def resnet() -> nn.Module:
    torch.manual_seed(0)
    m = ResNet()
    with torch.no_grad():  # running statistics as a trained network has them
        for mod in m.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.1, 0.1)
                mod.running_var.uniform_(0.5, 1.5)
    return m.eval()


# -- 1-D convolution ------------------------------------------------------------------------------------------
class Conv1dNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(8, 16, 5, padding=2)
        self.conv2 = nn.Conv1d(16, 32, 3, stride=2, padding=1)
        self.fc = nn.Linear(32, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.relu(self.conv2(F.relu(self.conv1(x)))).mean(-1))


def conv1d() -> nn.Module:
    torch.manual_seed(0)
    return Conv1dNet().eval()


def signals() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(6)
    return [torch.randn(4, 8, 24, generator=g) for _ in range(2)]


# -- FLOPs ---------------------------------------------------------------------------------------------------
class OneEncoderLayer(nn.Module):
    """One ``nn.TransformerEncoderLayer`` (d=32, 4 heads, FFN 64) on float inputs [B, 10, 32]."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


def one_encoder_layer() -> nn.Module:
    torch.manual_seed(0)
    return OneEncoderLayer().eval()


def tokens() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return [torch.randn(2, 10, 32, generator=g)]


class ParentUsesWeight(nn.Module):
    """``proj``'s forward never runs: the parent multiplies with ``proj.weight`` itself."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(32, 48)
        self.out = nn.Linear(48, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(F.linear(x, self.proj.weight, self.proj.bias)))


def parent_uses_weight() -> nn.Module:
    torch.manual_seed(0)
    return ParentUsesWeight().eval()


# -- a module autocomp has no unit for ------------------------------------------------------------------------
class Recurrent(nn.Module):
    """An nn.LSTM between an embedding and a head: its kernels (weight_ih_l0 / weight_hh_l0) stay as they are,
    and autocomp says so."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 16)
        self.lstm = nn.LSTM(16, 32, batch_first=True)
        self.head = nn.Linear(32, 5)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.lstm(self.emb(ids))[0][:, -1])


def recurrent() -> nn.Module:
    torch.manual_seed(0)
    return Recurrent().eval()


def token_ids() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(8)
    return [torch.randint(0, VOCAB, (4, 9), generator=g) for _ in range(2)]
