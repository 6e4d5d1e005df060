"""What a loaded model is, and how a model spec becomes one."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from autocomp.errors import AutocompError

__all__ = ["LoadedModel", "load_model", "run_batch", "extract_output", "output_metric", "resolve_metric", "is_token_logits",
           "check_pairs", "BUILTIN_MODELS"]


@dataclass
class LoadedModel:
    """A model ready to search: the module (eval mode), calibration batches and how to score its output.
    Building one splits every ``nn.MultiheadAttention`` of the module in place
    (:func:`autocomp.models.attention.split_attention`).

    metric: ``"cosine"`` (embeddings), ``"kl"`` (logits), ``"mse"`` (anything else), ``"alignment"`` /
    ``"tower"`` (dual encoders: image-text match distributions / per-tower embedding drift), or ``"auto"``
    to decide from the first output (``image_embeds`` + ``text_embeds`` -> alignment, ``logits`` or a plain
    tensor of token logits (:func:`is_token_logits`) -> kl, otherwise mse).
    """

    module: Any  # torch.nn.Module
    name: str
    spec: str
    batches: list[Any]
    metric: str = "auto"
    modality: str = "default"
    data_spec: str = ""
    info: dict[str, Any] = field(default_factory=dict)
    train_batches: Callable[[], list[Any]] | None = None
    # inputs for the compensated options' statistics (autocomp.compressors.calibration), disjoint from
    # ``batches`` where the model brings more calibration text; None: ``batches``
    stats_batches: Callable[[], list[Any]] | None = None

    def __post_init__(self) -> None:
        # torch's fused attention keeps q/k/v in one bare Parameter and skips out_proj's forward: split every
        # nn.MultiheadAttention into four Linear layers (same outputs) so plans can reach them
        import torch

        if isinstance(self.module, torch.nn.Module) and any(
                isinstance(m, torch.nn.MultiheadAttention) for m in self.module.modules()):
            from autocomp.models.attention import split_attention

            split_attention(self.module)


# name -> "module:function" returning a LoadedModel; resolved lazily so importing is cheap
BUILTIN_MODELS: dict[str, str] = {
    "minilm": "autocomp.models.minilm:load_minilm",
    "clip-digits": "autocomp.models.clip_digits:load_clip_digits",
    "clip-digits-fusion": "autocomp.models.clip_digits:load_clip_digits_fusion",
}


def run_batch(module: Any, batch: Any) -> Any:
    """Call ``module`` on one calibration batch: a dict is keyword arguments, a tuple/list positional."""
    if isinstance(batch, dict):
        return module(**batch)
    if isinstance(batch, (tuple, list)):
        return module(*batch)
    return module(batch)


_IMAGE_KEYS = ("pixel_values", "images", "image")
_TEXT_KEYS = ("input_ids", "captions", "text")


def check_pairs(batch: Any, i: int) -> None:
    """A batch with both images and text (dual encoders) must hold one caption per image."""
    if not isinstance(batch, dict):
        return
    img = next((batch[k] for k in _IMAGE_KEYS if k in batch), None)
    txt = next((batch[k] for k in _TEXT_KEYS if k in batch), None)
    if img is None or txt is None or not hasattr(img, "shape") or not hasattr(txt, "shape"):
        return
    if len(img.shape) and len(txt.shape) and img.shape[0] != txt.shape[0]:
        raise AutocompError(f"calibration batch {i} has {img.shape[0]} images but {txt.shape[0]} captions; "
                            f"image-text models need pairs (one caption per image) in every batch")


def extract_output(out: Any) -> tuple[Any, str]:
    """The tensor to compare and the metric ``auto`` resolves to for it."""
    import torch

    if isinstance(out, torch.Tensor):
        return out, "mse"
    get = (lambda k: out.get(k)) if isinstance(out, dict) else (lambda k: getattr(out, k, None))
    image, text = get("image_embeds"), get("text_embeds")
    if isinstance(image, torch.Tensor) and isinstance(text, torch.Tensor):
        # dual encoder (CLIP-style): images then their captions, stacked along the batch axis
        if image.shape[0] != text.shape[0] or image.shape[-1] != text.shape[-1]:
            raise AutocompError(
                f"dual-encoder output has {image.shape[0]} image and {text.shape[0]} text embeddings; calibration "
                "batches must hold image/text pairs (one caption per image)")
        return torch.cat([image.reshape(image.shape[0], -1), text.reshape(text.shape[0], -1)]), "alignment"
    logits = out.get("logits") if isinstance(out, dict) else getattr(out, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits, "kl"
    for key in ("last_hidden_state", "embeddings", "sentence_embedding"):
        value = out.get(key) if isinstance(out, dict) else getattr(out, key, None)
        if isinstance(value, torch.Tensor):
            return value, "mse"
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0], "mse"
    raise AutocompError(
        f"model output of type {type(out).__name__} has no tensor to compare; return a tensor, "
        "a dict/ModelOutput with 'logits' or 'last_hidden_state', or a tuple starting with a tensor"
    )


def is_token_logits(tensor: Any, module: Any, batch: Any) -> bool:
    """Whether a plain output tensor is a language model's logits: floating point, one score per class on the
    last axis, and that axis as long as one of the model's own token tables (an ``nn.Embedding``'s
    ``num_embeddings``) while the batch feeds integer token ids. A classifier's [B, C] scores over C labels
    it does not embed stay ``mse``; ``--metric`` overrides either way."""
    import torch

    if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point() or tensor.dim() < 2:
        return False
    values = batch.values() if isinstance(batch, dict) else batch if isinstance(batch, (list, tuple)) else [batch]
    if not any(isinstance(v, torch.Tensor) and not v.is_floating_point() and not v.is_complex()
               and v.dtype != torch.bool for v in values):
        return False
    vocab = {m.num_embeddings for m in module.modules() if isinstance(m, torch.nn.Embedding)}
    return int(tensor.shape[-1]) in vocab and tensor.shape[-1] > 2


def output_metric(auto: str, tensor: Any, module: Any, batch: Any) -> str:
    """The metric ``auto`` means for this output: :func:`extract_output`'s choice, with a plain tensor of
    token logits (:func:`is_token_logits`) scored as ``kl``."""
    return "kl" if auto == "mse" and is_token_logits(tensor, module, batch) else auto


def resolve_metric(loaded: LoadedModel) -> str:
    """``loaded.metric``, or what ``auto`` means for it (one forward pass on the first batch)."""
    import torch

    if loaded.metric != "auto":
        return loaded.metric
    batch = loaded.batches[0]
    with torch.inference_mode():
        tensor, auto = extract_output(run_batch(loaded.module, batch))
    return output_metric(auto, tensor, loaded.module, batch)


def load_model(spec: str, data: str | None = None, metric: str = "auto") -> LoadedModel:
    """Resolve a model spec (``minilm``, ``file.py:fn``, ``pkg.module:fn``, ``hf:DIR``) into a LoadedModel.

    ``data`` (``file.py:fn`` / ``pkg.module:fn``) replaces the built-in calibration batches.
    """
    from autocomp.models import intake

    spec = (spec or "").strip()
    if not spec:
        raise AutocompError("--model is empty; use minilm, file.py:fn, pkg.module:fn or hf:DIR")
    if spec in BUILTIN_MODELS:
        loader = intake.resolve_callable(BUILTIN_MODELS[spec], what="built-in model")
        loaded: LoadedModel = loader()
    elif spec.startswith("hf:"):
        loaded = intake.load_hf(spec[3:], spec)
    elif ":" in spec:
        loaded = intake.load_factory(spec)
    else:
        raise AutocompError(
            f"unknown model {spec!r}; use a built-in ({', '.join(sorted(BUILTIN_MODELS))}), "
            "file.py:fn, pkg.module:fn or hf:DIR"
        )
    if data:
        loaded.batches = intake.load_data(data)
        loaded.data_spec = data
    elif not loaded.batches:
        raise AutocompError(f"model {spec!r} brings no calibration data; pass --data file.py:fn or pkg.module:fn")
    if metric != "auto":
        loaded.metric = metric
    return loaded
