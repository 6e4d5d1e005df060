"""The built-in multimodal demo ``clip-digits``: a CLIP-style dual encoder made offline.

* text tower: the real pretrained all-MiniLM-L6-v2 (``text_model``, frozen during the demo's own training)
  and a trained ``text_projection``;
* vision tower: a small ViT (``vision_model``: a conv stem, 2x2 patches of scikit-learn's 8x8 handwritten
  digits, 3 pre-norm blocks, 4 heads) and a ``visual_projection``, trained at first use with a contrastive
  (InfoNCE) loss against captions such as "a handwritten digit seven";
* ``clip-digits-fusion`` adds one cross-attention block in which image tokens attend to the caption's
  tokens (``fusion``), so cross-modal attention heads can be pruned like any other structured unit.

Training takes about a minute on 2 cores, is deterministic, and is cached under ``$AUTOCOMP_CACHE`` (default
``~/.cache/autocomp``) keyed by a hash of this file's source and the image data, so later runs load it.

Data (a fixed permutation of the 1,797 digits): 497 held-out test images (zero-shot accuracy only),
128 calibration images (the proxy; captioned with the zero-shot prompt), 1,172 training images (the vision tower, and ``autocomp train``).
True metric: zero-shot accuracy on the test images, each matched against one caption per class.
"""

from __future__ import annotations

import hashlib
import os
import random
from pathlib import Path
from typing import Any

from autocomp.files import cache_dir
from autocomp.models.base import LoadedModel

__all__ = ["load_clip_digits", "load_clip_digits_fusion", "ZeroShotTask", "digit_splits", "CLASS_WORDS",
           "TEMPLATES", "cache_dir", "hf_pair_batches"]

CLASS_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
TEMPLATES = (
    "a handwritten digit {}", "a photo of the number {}", "the digit {}", "an image of a handwritten {}",
    "a scanned handwritten {}", "a picture of the numeral {}", "a small grayscale image of a {}",
    "handwriting that shows a {}",
)
EVAL_TEMPLATE = TEMPLATES[0]
N_TEST, N_CALIB = 497, 128
DIM, DEPTH, HEADS, MLP, EMBED = 128, 3, 4, 512, 128
MAX_TEXT = 16
BATCH = 64  # vision-tower training batch


def digit_splits() -> dict[str, tuple[Any, Any]]:
    """name -> (images float32 [N, 1, 8, 8] scaled to [-1, 1], labels int64 [N]) for test / calibration / train."""
    import numpy as np
    import torch

    try:
        from sklearn.datasets import load_digits
    except ImportError:
        from autocomp.errors import AutocompError

        raise AutocompError("the built-in model 'clip-digits' needs scikit-learn (its digit images); "
                            "pip install 'autocomp[multimodal]'") from None

    d = load_digits()
    perm = np.random.RandomState(0).permutation(len(d.target))
    x = torch.from_numpy((d.images[perm] / 8.0 - 1.0).astype("float32")).unsqueeze(1)
    y = torch.from_numpy(d.target[perm].astype("int64"))
    cut = (0, N_TEST, N_TEST + N_CALIB, len(y))
    return {name: (x[a:b], y[a:b]) for name, a, b in zip(("test", "calibration", "train"), cut, cut[1:])}


def _classes() -> dict[str, type]:
    """The model's module classes (built on first use: importing this file stays torch-free)."""
    blocks = _block_classes()
    return {**blocks, **_model_classes(blocks["Block"])}


def _block_classes() -> dict[str, type]:
    import torch
    from torch import nn

    class Block(nn.Module):
        """Pre-norm transformer block; ``cross`` adds attention from these tokens to another sequence."""

        def __init__(self, dim: int, heads: int, mlp: int, cross: bool = False) -> None:
            super().__init__()
            self.heads = heads
            self.norm1 = nn.LayerNorm(dim)
            self.self_attn = Attention(dim, heads)
            self.norm2 = nn.LayerNorm(dim)
            self.mlp = nn.Sequential()
            self.mlp.fc1 = nn.Linear(dim, mlp)
            self.mlp.act = nn.GELU()
            self.mlp.fc2 = nn.Linear(mlp, dim)
            if cross:
                self.norm_x = nn.LayerNorm(dim)
                self.cross_attn = Attention(dim, heads)

        def forward(self, x: Any, ctx: Any = None, ctx_mask: Any = None) -> Any:
            h = self.norm1(x)
            x = x + self.self_attn(h, h)
            if ctx is not None and hasattr(self, "cross_attn"):
                x = x + self.cross_attn(self.norm_x(x), ctx, ctx_mask)
            return x + self.mlp(self.norm2(x))

    class Attention(nn.Module):
        """Multi-head attention with separate q/k/v/out Linear layers (so heads can be cut). The head count
        follows the q projection's width, so a model whose heads were pruned still runs."""

        def __init__(self, dim: int, heads: int) -> None:
            super().__init__()
            self.head_dim = dim // heads
            self.q_proj, self.k_proj = nn.Linear(dim, dim), nn.Linear(dim, dim)
            self.v_proj, self.out_proj = nn.Linear(dim, dim), nn.Linear(dim, dim)

        def forward(self, x: Any, ctx: Any, ctx_mask: Any = None) -> Any:
            b, n, _ = x.shape
            q, k, v = self.q_proj(x), self.k_proj(ctx), self.v_proj(ctx)
            h = q.shape[-1] // self.head_dim
            split = lambda t: t.reshape(b, t.shape[1], h, self.head_dim).transpose(1, 2)  # noqa: E731
            bias = None
            if ctx_mask is not None:
                bias = (1.0 - ctx_mask[:, None, None, :].to(q.dtype)) * torch.finfo(q.dtype).min
            o = torch.nn.functional.scaled_dot_product_attention(split(q), split(k), split(v), attn_mask=bias)
            return self.out_proj(o.transpose(1, 2).reshape(b, n, h * self.head_dim))

    return {"Block": Block, "Attention": Attention}


def _model_classes(Block: type) -> dict[str, type]:  # noqa: N803 - a class
    import torch
    from torch import nn

    class DigitViT(nn.Module):
        def __init__(self, fusion: bool = False) -> None:
            super().__init__()
            self.stem = nn.Conv2d(1, 32, 3, padding=1)  # a conv stem: ViTs on small data learn much faster
            self.patch_embedding = nn.Conv2d(32, DIM, 2, stride=2)  # 8x8 -> 4x4 patches
            self.position_embedding = nn.Parameter(torch.zeros(1, 17, DIM))
            self.class_embedding = nn.Parameter(torch.zeros(1, 1, DIM))
            self.layers = nn.ModuleList(Block(DIM, HEADS, MLP) for _ in range(DEPTH))
            self.post_layernorm = nn.LayerNorm(DIM)

        def tokens(self, pixel_values: Any) -> Any:
            b = pixel_values.shape[0]
            p = self.patch_embedding(torch.nn.functional.gelu(self.stem(pixel_values))).flatten(2).transpose(1, 2)
            x = torch.cat([self.class_embedding.expand(b, -1, -1), p], 1)
            x = x + self.position_embedding
            for layer in self.layers:
                x = layer(x)
            return x

    class DualEncoder(nn.Module):
        """``forward(pixel_values, input_ids, attention_mask) -> {"image_embeds", "text_embeds"}`` (both
        L2-normalized, one caption per image); ``logit_scale`` is the trained inverse temperature."""

        def __init__(self, text_model: nn.Module, fusion: bool = False) -> None:
            super().__init__()
            self.text_model = text_model
            self.vision_model = DigitViT()
            self.text_projection = nn.Linear(384, EMBED, bias=False)
            self.visual_projection = nn.Linear(DIM, EMBED, bias=False)
            self.logit_scale = nn.Parameter(torch.tensor(2.6593))  # ln(1 / 0.07), as in CLIP
            if fusion:
                self.fusion_text_in = nn.Linear(384, DIM)  # caption tokens into the vision width
                self.fusion = Block(DIM, HEADS, MLP, cross=True)

        def text_tokens(self, input_ids: Any, attention_mask: Any) -> Any:
            return self.text_model.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

        def get_text_features(self, input_ids: Any, attention_mask: Any) -> Any:
            pooled = self.text_model(input_ids=input_ids, attention_mask=attention_mask)
            return torch.nn.functional.normalize(self.text_projection(pooled), dim=-1)

        def get_image_features(self, pixel_values: Any, ctx: Any = None, ctx_mask: Any = None) -> Any:
            x = self.vision_model.tokens(pixel_values)
            if hasattr(self, "fusion") and ctx is not None:
                x = self.fusion(x, self.fusion_text_in(ctx), ctx_mask)
            pooled = self.vision_model.post_layernorm(x[:, 0])
            return torch.nn.functional.normalize(self.visual_projection(pooled), dim=-1)

        def forward(self, pixel_values: Any, input_ids: Any, attention_mask: Any) -> dict[str, Any]:
            if hasattr(self, "fusion"):
                ctx = self.text_tokens(input_ids, attention_mask)
                image = self.get_image_features(pixel_values, ctx, attention_mask)
            else:
                image = self.get_image_features(pixel_values)
            return {"image_embeds": image, "text_embeds": self.get_text_features(input_ids, attention_mask)}

    return {"DualEncoder": DualEncoder, "DigitViT": DigitViT}


def _captions(labels: Any, seed: int, templates: tuple[str, ...] = TEMPLATES) -> list[str]:
    rng = random.Random(seed)
    return [rng.choice(templates).format(CLASS_WORDS[int(c)]) for c in labels]


def _key(fusion: bool) -> str:
    h = hashlib.sha256(Path(__file__).read_bytes())
    for x, y in digit_splits().values():
        h.update(x.numpy().tobytes())
        h.update(y.numpy().tobytes())
    h.update(b"fusion" if fusion else b"dual")
    return h.hexdigest()[:16]


def _train_towers(model: Any, tokenizer: Any, epochs: int = 30, log: Any = None) -> float:
    """Train the vision tower (+ fusion block) and both projections with a symmetric InfoNCE loss over
    in-batch image-caption pairs (captions of the same class count as positives). The text encoder stays
    frozen (its caption embeddings are computed once). -> final training loss."""
    import torch

    fusion = hasattr(model, "fusion")
    x, y = digit_splits()["train"]
    captions = [t.format(w) for w in CLASS_WORDS for t in TEMPLATES]  # class c, template k -> c * T + k
    enc = tokenizer(captions, padding="max_length", truncation=True, max_length=MAX_TEXT, return_tensors="pt")
    with torch.no_grad():
        pooled = model.text_model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
        tokens = model.text_tokens(enc["input_ids"], enc["attention_mask"]) if fusion else None
    for p in model.text_model.parameters():
        p.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=2e-3, weight_decay=0.0)
    gen = torch.Generator().manual_seed(0)
    steps = epochs * ((len(y) + BATCH - 1) // BATCH)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps, pct_start=0.1)
    model.train()
    loss = torch.tensor(0.0)
    for epoch in range(epochs):
        perm = torch.randperm(len(y), generator=gen)
        for start in range(0, len(y), BATCH):
            idx = perm[start:start + BATCH]
            xb, yb = x[idx], y[idx]
            # light augmentation: shift by up to one pixel (deterministic generator)
            dx, dy = torch.randint(-1, 2, (2,), generator=gen).tolist()
            xb = torch.roll(xb, shifts=(dy, dx), dims=(2, 3))
            k = torch.randint(0, len(TEMPLATES), (len(yb),), generator=gen)
            ci = yb * len(TEMPLATES) + k
            all_txt = torch.nn.functional.normalize(model.text_projection(pooled), dim=-1)
            if fusion:
                img = model.get_image_features(xb, tokens[ci], enc["attention_mask"][ci])
            else:
                img = model.get_image_features(xb)
            scale = model.logit_scale.clamp(max=4.6052).exp()
            # image -> every caption (80 = 10 classes x 8 templates); its class's captions are the positives
            i2t = torch.log_softmax(scale * img @ all_txt.T, 1).reshape(len(yb), len(CLASS_WORDS), len(TEMPLATES))
            loss_i = -torch.logsumexp(i2t[torch.arange(len(yb)), yb], 1).mean()
            # each sampled caption -> the batch's images; images of its class are the positives
            t2i = torch.log_softmax(scale * all_txt[ci] @ img.T, 1)
            pos = yb[:, None] == yb[None, :]
            loss_t = -torch.logsumexp(t2i.masked_fill(~pos, float("-inf")), 1).mean()
            loss = 0.5 * (loss_i + loss_t)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        if log and (epoch + 1) % 10 == 0:
            log(f"clip-digits: epoch {epoch + 1}/{epochs}, loss {float(loss.detach()):.3f}")
    for p in model.text_model.parameters():
        p.requires_grad_(True)
    model.eval()
    return float(loss.detach())


def build_clip_digits(fusion: bool = False, log: Any = None, epochs: int = 20) -> tuple[Any, Any]:
    """(model, tokenizer): MiniLM + the vision tower, trained at first use and cached."""
    import torch
    from safetensors.torch import load_file, save_file

    from autocomp.models.minilm import SentenceEncoder, load_minilm_bert, load_tokenizer

    tokenizer = load_tokenizer()
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = _classes()["DualEncoder"](SentenceEncoder(load_minilm_bert()), fusion=fusion)
    path = cache_dir() / f"clip-digits{'-fusion' if fusion else ''}-{_key(fusion)}-e{epochs}.safetensors"
    trained = {n: p for n, p in model.state_dict().items() if not n.startswith("text_model.")}
    if path.is_file():
        try:
            state = load_file(str(path))
            if set(state) == set(trained):
                model.load_state_dict(state, strict=False)
                return model.eval(), tokenizer
        except Exception:  # a damaged cache entry is rebuilt, never trusted
            pass
    (log or (lambda s: None))(f"clip-digits: training the vision tower once ({epochs} epochs; cached in {path.parent})")
    with torch.random.fork_rng():
        torch.manual_seed(0)
        _train_towers(model, tokenizer, epochs=epochs, log=log)
    state = {n: p.detach().contiguous() for n, p in model.state_dict().items() if not n.startswith("text_model.")}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        save_file(state, str(tmp))
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only cache only costs a retrain next time
    return model.eval(), tokenizer


def _pair_batches(tokenizer: Any, images: Any, labels: Any, batch_size: int, seed: int,
                  max_length: int = MAX_TEXT, templates: tuple[str, ...] = TEMPLATES) -> list[dict[str, Any]]:
    caps = _captions(labels, seed, templates)
    out = []
    for s in range(0, len(labels), batch_size):
        enc = tokenizer(caps[s:s + batch_size], padding=True, truncation=True, max_length=max_length,
                        return_tensors="pt")
        out.append({"pixel_values": images[s:s + batch_size], "input_ids": enc["input_ids"],
                    "attention_mask": enc["attention_mask"]})
    return out


def hf_pair_batches(tokenizer: Any, image_size: int, channels: int = 3, max_length: int = 16,
                    batch_size: int = 32) -> list[dict[str, Any]]:
    """Calibration image/caption pairs for a transformers dual encoder (CLIP, SigLIP): the calibration
    digits, upsampled to the model's image size and channels, with their captions."""
    import torch

    x, y = digit_splits()["calibration"]
    x = torch.nn.functional.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
    return _pair_batches(tokenizer, x.repeat(1, channels, 1, 1).contiguous(), y, batch_size, seed=1, max_length=max_length)


class ZeroShotTask:
    """Zero-shot classification accuracy: each held-out image is assigned the class whose caption
    ("a handwritten digit seven") embeds closest. ``task(model) -> accuracy``."""

    name = "zero_shot_accuracy"

    def __init__(self, tokenizer: Any, n: int | None = None) -> None:
        x, y = digit_splits()["test"]
        self.x, self.y = (x, y) if n is None else (x[:n], y[:n])
        enc = tokenizer([EVAL_TEMPLATE.format(w) for w in CLASS_WORDS], padding=True, return_tensors="pt")
        self.input_ids, self.attention_mask = enc["input_ids"], enc["attention_mask"]

    def __call__(self, model: Any) -> float:
        import torch

        with torch.inference_mode():
            if hasattr(model, "fusion"):  # image features depend on the caption: score every pair
                ctx = model.text_tokens(self.input_ids, self.attention_mask)
                txt = model.get_text_features(self.input_ids, self.attention_mask)
                sims = torch.stack([
                    (model.get_image_features(self.x, ctx[c:c + 1].expand(len(self.y), -1, -1),
                                              self.attention_mask[c:c + 1].expand(len(self.y), -1)) * txt[c]).sum(-1)
                    for c in range(len(CLASS_WORDS))], 1)
            else:
                sims = model.get_image_features(self.x) @ model.get_text_features(self.input_ids, self.attention_mask).T
        return float((sims.argmax(1) == self.y).float().mean())


def _load(fusion: bool) -> LoadedModel:
    model, tokenizer = build_clip_digits(fusion=fusion, log=_stderr)
    splits = digit_splits()
    # calibration pairs caption each image with the prompt zero-shot classification uses: calibrate with the
    # prompts the model will be queried with (training pairs keep all templates)
    calib = _pair_batches(tokenizer, *splits["calibration"], batch_size=32, seed=1, templates=(EVAL_TEMPLATE,))
    name = "clip-digits-fusion" if fusion else "clip-digits"

    def train_batches() -> list[Any]:
        return _pair_batches(tokenizer, *splits["train"], batch_size=32, seed=2)

    # zero-shot classification queries the class captions with images: score image -> text matches
    return LoadedModel(module=model, name=name, spec=name, batches=calib, metric="alignment-i2t", modality="default",
                       data_spec="builtin:sklearn-digits+captions",
                       info={"num_attention_heads": 12, "dual_encoder": True,
                             "attention_heads": {"text": 12, "vision": HEADS, "fusion": HEADS}}, train_batches=train_batches)


def _stderr(msg: str) -> None:
    import sys

    print(msg, file=sys.stderr)


def load_clip_digits() -> LoadedModel:
    return _load(fusion=False)


def load_clip_digits_fusion() -> LoadedModel:
    return _load(fusion=True)

