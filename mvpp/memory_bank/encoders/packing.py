"""A BERT sentence model run over texts packed back to back, without padding.

A padded call multiplies every text up to its longest text's length: on a CPU, where a
call's cost is its matrix products, random titles in calls of 16 pay for 1.4 times their
tokens, and splitting a call by length to cut the padding pays the call's fixed cost
again. Here the matrix products (every linear layer, the layer norms, the activation) run
over the real tokens only, all texts of a call in one (T, hidden) table, and attention,
the only step that mixes tokens, runs per group of texts of equal length, which sit side
by side in the table because the texts are sorted by length. No text shares an attention
call with a text of another length, no padding enters any product, so a text's vectors do
not depend on the other texts of its call; under bfloat16 arithmetic too, where a padded
call's kernels change with the padding.

The layers are the model's own modules (its weights, activation, layer norms); only the
order of the work differs from `BertModel.forward`. Pooling and what follows it are the
sentence-transformers pipeline's own modules, run on the call's texts laid out padded.
Models other than BERT encoders (position ids, attention variants, prompts) are left to
the pipeline: `PackedBert.wrap` returns None for them.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger(__name__)

# Most token positions in one call: bounds the (T, intermediate) activations (UAE-Large:
# 4,096 floats a position, 128 MB at this cap); calls of 64 titles hold about 1,100.
MAX_CALL_TOKENS = 8192


@dataclass(frozen=True)
class LengthGroup:
    """Texts of one length, side by side in the packed table: rows [start, start + n * length)."""

    start: int
    n: int
    length: int

    @property
    def stop(self) -> int:
        return self.start + self.n * self.length


class PackedBert:
    """Runs a sentence-transformers pipeline whose transformer is a BERT encoder on packed texts.

    `encode(texts, max_texts)` returns, per text, what the pipeline's own `encode(...,
    output_value=None)` returns: the sentence embedding, the input ids, the attention mask
    and the token embeddings (special tokens included, as the transformer saw them).
    """

    def __init__(self, pipeline: Any) -> None:
        self._transformer = pipeline[0]
        self._bert = self._transformer.auto_model
        self._after = list(pipeline)[1:]
        config = self._bert.config
        self._heads = int(config.num_attention_heads)
        self._head_size = int(config.hidden_size) // self._heads
        self._scale = self._head_size**-0.5

    @classmethod
    def wrap(cls, pipeline: Any) -> PackedBert | None:
        """A `PackedBert` for `pipeline` (a SentenceTransformer), or None where its first
        module is not a plain BERT encoder or the pipeline adds a prompt of its own."""
        try:
            from transformers import BertModel
        except ImportError:  # pragma: no cover - a dependency of the package
            return None
        modules = list(pipeline) if hasattr(pipeline, "__iter__") else []
        bert = getattr(modules[0], "auto_model", None) if modules else None
        if not isinstance(bert, BertModel) or getattr(pipeline, "default_prompt_name", None):
            return None
        config = bert.config
        plain = (
            not config.is_decoder
            and not getattr(config, "add_cross_attention", False)
            and getattr(config, "position_embedding_type", "absolute") in (None, "absolute")
            and getattr(modules[0], "module_output_name", "token_embeddings") == "token_embeddings"
            and hasattr(modules[0], "preprocess")
        )
        if not plain:
            return None
        pipeline.eval()  # dropout off: the layers are called one by one, outside `encode`
        return cls(pipeline)

    def encode(self, texts: Sequence[str], max_texts: int) -> list[dict[str, Any]]:
        """Per text (in the given order) a dict of `sentence_embedding` (dim,), `input_ids`
        (L,), `attention_mask` (L,) and `token_embeddings` (L, hidden), on the CPU."""
        import torch

        if not texts:
            return []
        with torch.inference_mode():
            features = self._transformer.preprocess(list(texts))
            ids = features["input_ids"]  # (n, L_max)
            mask = features["attention_mask"].bool()  # (n, L_max)
            types = features.get("token_type_ids")
            if types is None:
                types = torch.zeros_like(ids)
            lengths = mask.sum(dim=1)
            outputs: list[dict[str, Any]] = [{} for _ in texts]
            order = torch.argsort(lengths, stable=True).tolist()
            for call in _calls(order, lengths.tolist(), max(1, max_texts), MAX_CALL_TOKENS):
                rows = torch.as_tensor(call)
                done = self._encode_call(ids[rows], types[rows], mask[rows])
                for i, out in zip(call, done, strict=True):
                    outputs[i] = out
        return outputs

    def _encode_call(self, ids: Any, types: Any, mask: Any) -> list[dict[str, Any]]:
        """One call over texts sorted by length: ids, types and mask (n, L_max)."""
        import torch

        lengths = mask.sum(dim=1)  # (n,)
        groups = _length_groups(lengths.tolist())
        positions = torch.arange(mask.shape[1]).expand_as(mask)[mask]  # (T,) restart per text
        hidden = self._bert.embeddings(
            input_ids=ids[mask][None], token_type_ids=types[mask][None], position_ids=positions[None]
        )[0]  # (T, hidden)
        for layer in self._bert.encoder.layer:
            hidden = self._layer(layer, hidden, groups)

        n, width = mask.shape
        tokens = hidden.new_zeros(n, width, hidden.shape[-1])  # (n, L_max, hidden)
        tokens[mask] = hidden
        pooled = {"token_embeddings": tokens, "attention_mask": mask.long()}
        for module in self._after:
            pooled = module(pooled)
        sentence = pooled["sentence_embedding"]  # (n, dim)
        return [
            {
                "sentence_embedding": sentence[i],
                "input_ids": ids[i, : int(lengths[i])],
                "attention_mask": mask[i, : int(lengths[i])].long(),
                "token_embeddings": tokens[i, : int(lengths[i])],
            }
            for i in range(n)
        ]

    def _layer(self, layer: Any, hidden: Any, groups: list[LengthGroup]) -> Any:
        """One BERT layer over the packed table (T, hidden)."""
        import torch

        attention = layer.attention.self
        query, key, value = attention.query(hidden), attention.key(hidden), attention.value(hidden)  # (T, hidden)
        context = torch.cat([self._attend(query, key, value, group) for group in groups])  # (T, hidden)
        attended = layer.attention.output(context, hidden)  # dense, residual, layer norm
        return layer.output(layer.intermediate(attended), attended)

    def _attend(self, query: Any, key: Any, value: Any, group: LengthGroup) -> Any:
        import torch

        if group.length == 0:  # a tokenizer without special tokens, an empty text
            return query[:0]
        def heads(x: Any) -> Any:  # (n * L, hidden) -> (n, heads, L, head_size)
            return x[group.start : group.stop].view(group.n, group.length, self._heads, self._head_size).transpose(1, 2)

        out = torch.nn.functional.scaled_dot_product_attention(
            heads(query), heads(key), heads(value), scale=self._scale
        )  # (n, heads, L, head_size)
        return out.transpose(1, 2).reshape(group.n * group.length, -1)


def _length_groups(lengths: Sequence[int]) -> list[LengthGroup]:
    """Runs of equal length in `lengths` (sorted), with their rows in the packed table."""
    groups: list[LengthGroup] = []
    start = 0
    for length in lengths:
        if groups and groups[-1].length == length:
            last = groups[-1]
            groups[-1] = LengthGroup(last.start, last.n + 1, length)
        else:
            groups.append(LengthGroup(start, 1, length))
        start += length
    return groups


def _calls(order: list[int], lengths: list[int], max_texts: int, max_tokens: int) -> list[list[int]]:
    """`order` (texts sorted by length) cut into calls of at most `max_texts` texts and
    `max_tokens` tokens (a longer text goes alone)."""
    calls: list[list[int]] = []
    current: list[int] = []
    tokens = 0
    for i in order:
        if current and (len(current) >= max_texts or tokens + lengths[i] > max_tokens):
            calls.append(current)
            current, tokens = [], 0
        current.append(i)
        tokens += lengths[i]
    if current:
        calls.append(current)
    return calls
