"""Loading user models and data from ``file.py:fn``, ``pkg.module:fn`` and ``hf:DIR``."""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import sys
from pathlib import Path
from typing import Any, Callable

from autocomp.errors import AutocompError
from autocomp.models.base import LoadedModel

__all__ = ["resolve_callable", "load_factory", "load_data", "load_hf"]


def resolve_callable(ref: str, what: str = "factory") -> Callable[..., Any]:
    """``path/to/file.py:fn`` or ``pkg.module:fn`` -> the callable. Errors name the part that is wrong."""
    target, sep, attr = ref.rpartition(":")
    if not sep or not target or not attr:
        raise AutocompError(f"{what} {ref!r} must look like file.py:fn or pkg.module:fn")
    if target.endswith(".py") or "/" in target or "\\" in target:
        path = Path(target).expanduser()
        if not path.is_file():
            raise AutocompError(f"{what} {ref!r}: file {target!r} does not exist")
        mod_name = "_autocomp_user_" + hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:12]
        module = sys.modules.get(mod_name)
        if module is None:
            spec = importlib.util.spec_from_file_location(mod_name, path)
            if spec is None or spec.loader is None:
                raise AutocompError(f"{what} {ref!r}: cannot import {target!r}")
            module = importlib.util.module_from_spec(spec)
            sys.path.insert(0, str(path.parent.resolve()))
            try:
                spec.loader.exec_module(module)
            except Exception as e:  # user code: report, do not crash with a traceback
                raise AutocompError(f"{what} {ref!r}: importing {target!r} failed: {type(e).__name__}: {e}") from None
            finally:
                sys.path.pop(0)
            sys.modules[mod_name] = module
    else:
        if str(Path.cwd()) not in sys.path and "" not in sys.path:
            sys.path.insert(0, str(Path.cwd()))
        try:
            module = importlib.import_module(target)
        except ModuleNotFoundError as e:
            raise AutocompError(f"{what} {ref!r}: module {target!r} not found ({e})") from None
        except Exception as e:
            raise AutocompError(f"{what} {ref!r}: importing {target!r} failed: {type(e).__name__}: {e}") from None
    fn = getattr(module, attr, None)
    if fn is None:
        raise AutocompError(f"{what} {ref!r}: {target!r} has no attribute {attr!r}")
    if not callable(fn):
        raise AutocompError(f"{what} {ref!r}: {attr!r} is not callable")
    return fn


def _call(fn: Callable[..., Any], ref: str, what: str) -> Any:
    try:
        return fn()
    except AutocompError:
        raise
    except Exception as e:
        raise AutocompError(f"{what} {ref!r} raised {type(e).__name__}: {e}") from None


def load_factory(ref: str) -> LoadedModel:
    import torch

    fn = resolve_callable(ref, what="model factory")
    model = _call(fn, ref, "model factory")
    if isinstance(model, LoadedModel):
        model.spec = ref
        return model
    if not isinstance(model, torch.nn.Module):
        raise AutocompError(
            f"model factory {ref!r} returned {type(model).__name__}, not a torch.nn.Module"
        )
    name = ref.rpartition(":")[2]
    return LoadedModel(module=model.eval(), name=name, spec=ref, batches=[])


def load_data(ref: str) -> list[Any]:
    """Calibration batches from a factory: a list/iterable of tensors, dicts of tensors or tuples."""
    import torch

    fn = resolve_callable(ref, what="data factory")
    data = _call(fn, ref, "data factory")
    if isinstance(data, (torch.Tensor, dict)):
        data = [data]
    try:
        batches = list(data)
    except TypeError:
        raise AutocompError(f"data factory {ref!r} returned {type(data).__name__}; return a list of batches") from None
    if not batches:
        raise AutocompError(f"data factory {ref!r} returned no batches; return at least one calibration batch")
    for i, b in enumerate(batches):
        ok = isinstance(b, torch.Tensor) or (
            isinstance(b, (dict, tuple, list)) and b
            and all(isinstance(v, torch.Tensor) for v in (b.values() if isinstance(b, dict) else b))
        )
        if not ok:
            raise AutocompError(
                f"data factory {ref!r}: batch {i} is {type(b).__name__}; batches must be tensors, "
                "dicts of tensors or tuples of tensors"
            )
        if (b.numel() if isinstance(b, torch.Tensor) else 1) == 0:
            raise AutocompError(f"data factory {ref!r}: batch {i} is empty")
    return batches


def load_hf(directory: str, spec: str) -> LoadedModel:
    """A local transformers directory (config.json + weights); never touches the network."""
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    path = Path(directory).expanduser()
    if not (path / "config.json").is_file():
        raise AutocompError(f"model {spec!r}: {str(path)!r} is not a transformers directory (no config.json)")
    try:
        import transformers
    except ImportError:
        raise AutocompError("hf:DIR models need transformers; pip install 'autocomp[hf]'") from None
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
        arch = (getattr(config, "architectures", None) or [None])[0]
        cls = getattr(transformers, arch, None) if arch else None
        cls = cls or transformers.AutoModel
        model = cls.from_pretrained(path, local_files_only=True)
    except Exception as e:
        raise AutocompError(f"model {spec!r}: transformers could not load {str(path)!r}: {type(e).__name__}: {e}") from None
    model.eval()
    batches: list[Any] = []
    modality = "default"
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception:
        tokenizer = None
    vision_cfg, text_cfg = getattr(config, "vision_config", None), getattr(config, "text_config", None)
    info: dict[str, Any] = {}
    if vision_cfg is not None and text_cfg is not None:  # CLIP / SigLIP-style dual encoder
        info["dual_encoder"] = True
        info["attention_heads"] = {m: int(c.num_attention_heads) for m, c in (("text", text_cfg), ("vision", vision_cfg))
                                   if getattr(c, "num_attention_heads", None)}
        if tokenizer is not None:
            from autocomp.models.clip_digits import hf_pair_batches

            max_pos = getattr(text_cfg, "max_position_embeddings", 77) or 77
            batches = hf_pair_batches(tokenizer, int(getattr(vision_cfg, "image_size", 224)),
                                      int(getattr(vision_cfg, "num_channels", 3)), max_length=min(16, max_pos))
    elif tokenizer is not None:
        from autocomp.models.textdata import calibration_sentences, tokenize_batches

        max_pos = getattr(config, "max_position_embeddings", 512) or 512
        batches = tokenize_batches(tokenizer, calibration_sentences(), max_length=min(32, max_pos))
        modality = "text"
    info.update({k: getattr(config, k) for k in ("num_attention_heads", "model_type") if hasattr(config, k)})
    if getattr(config, "max_position_embeddings", None):
        info["max_positions"] = int(config.max_position_embeddings)
    return LoadedModel(module=model, name=path.name or spec, spec=spec, batches=batches,
                       modality=modality, info=info,
                       data_spec=("builtin:sklearn-digits+captions" if info.get("dual_encoder") else
                                  "builtin:stdlib-docstrings") if batches else "")
