"""Runtime ops that the rewritten graph calls, one module per concern:

- ``merge``: the bipartite merge and its token bookkeeping (sizes, dest, assign);
- ``semantic``: the CLS attention row that gives the semantic value;
- ``attention_bias``: per-key validity, the key-padding check and the ``log(size)`` key bias;
- ``restore``: original token count back (each original token takes its merged token's value);
- ``reductions``: size-weighted token-axis sums and means;
- ``packed_attention``: the metric and CLS row for ``F.multi_head_attention_forward`` sites
  (nn.MultiheadAttention), whose projected keys never reach the graph;
- ``grid_merge``: merge-and-restore for generation blocks (destinations per grid cell, one merge
  plan per block, the cross-attention saliency that gives their semantic value);
- ``compact``: a language model's placeholder tokens (filled from a vision tower) merged into fewer
  slots, with the masks and key bias of the shorter sequence;
- ``merge_step``: one block's whole merge step as the opaque op ``torch.ops.turbo_fx.merge_block``,
  the same step written for Inductor to trace (``traced_merge_block``, which ``compile_blocks``
  compiles in each merge piece), and ``record_merges``.

They are ordinary torch code with static Python ints for every count, so the graph stays
traceable and Inductor can trace through them. Shapes use ``B`` (batch), ``H`` (heads),
``N`` (tokens), ``C`` (channels). Every name is re-exported here: passes and tests write
``ops.merge_tokens``.
"""
from .attention_bias import (
    MASKED_BELOW, add_bias, pad_key_bias, check_key_padding_mask, check_reader_padding, key_bias, key_validity,
)
from .merge import (
    PAD_PAIR_SCORE,
    SALIENT_DEGREE,
    SALIENT_PAIR_SCORE,
    compose_assign,
    head_mean,
    information_degree,
    initial_assign,
    initial_sizes,
    merge_count,
    merge_tokens,
)
from .compact import compact_mask, compact_placeholders, check_placeholder_count, merge_placeholder_tokens, placeholder_rows, text_attention_to_placeholders
from .grid_merge import cell_offsets, cell_shape, destination_count, cross_attention_saliency, grid_merge, grid_merge_plan, grid_partition, merge_by_plan
from .merge_step import MergeRecord, _is_fake, merge_block, merge_block_op, record_merges
from .packed_attention import key_padding_bias, packed_cls_probs, packed_head_mean
from .reductions import weighted_token_mean, weighted_token_sum
from .restore import assign_after_prefix, assign_with_whole_tokens, destination_token_rows, merge_token_rows, restore_tokens
from .semantic import cls_attention, cls_attention_from_probs

__all__ = [
    "MASKED_BELOW", "PAD_PAIR_SCORE", "SALIENT_DEGREE", "SALIENT_PAIR_SCORE",
    "add_bias", "pad_key_bias", "check_key_padding_mask", "check_reader_padding", "key_bias", "key_validity",
    "compose_assign", "head_mean", "information_degree", "initial_assign", "initial_sizes",
    "merge_count", "merge_tokens", "MergeRecord", "merge_block", "merge_block_op", "record_merges",
    "weighted_token_mean", "weighted_token_sum", "restore_tokens", "merge_token_rows", "assign_after_prefix", "assign_with_whole_tokens", "destination_token_rows", "cls_attention",
    "cls_attention_from_probs", "_is_fake", "key_padding_bias", "packed_cls_probs", "packed_head_mean",
    "compact_mask", "compact_placeholders", "check_placeholder_count", "merge_placeholder_tokens", "placeholder_rows", "text_attention_to_placeholders",
    "cell_offsets", "cell_shape", "destination_count", "cross_attention_saliency", "grid_merge", "grid_merge_plan", "grid_partition", "merge_by_plan",
]
