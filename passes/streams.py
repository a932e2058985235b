"""Pass: group attention sites into residual streams and choose the one stream that merges.

A graph can hold several token sequences: the two towers of CLIP, the image encoder and
text decoder of BLIP. Each is a *stream*: a chain of attention sites whose residual input
comes from the previous site of the chain. A site joins the stream of the latest earlier
site whose output its residual input derives from; a site whose residual derives from no
earlier site starts a new stream.

A stream can merge when every one of its sites is mergeable and every site of another
stream that reads its tokens (cross-attention: BLIP's text encoder over the image tokens)
can take merged keys: such a *reader* then attends over the merged tokens with their
``log(size)`` key bias, which for exact duplicates gives the unmerged result. A reader's
keys may concatenate the merged tokens with tokens of its own sequence (CaiT's class
attention over ``cat([class token, patches])``); ``key_layout`` says how many come before
and after, and those keys get no bias. Of the
streams that can merge, the one with the most sites merges (the first one on a tie); the
other streams run their own computation unchanged.

Guarantees: the graph is not modified. Every site gets a decision: it merges, it reads
the merged tokens (``reads``: after which merged site), or it is untouched, with a reason
that names the site's own problems, a reader that cannot take merged tokens, or the stream
that merges instead.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Optional

from torch.fx import Node

from . import graph_utils as gu
from .find_attention import AttentionSite


@dataclass
class Stream:
    index: int
    sites: list[AttentionSite] = field(default_factory=list)
    readers: list[AttentionSite] = field(default_factory=list)  # sites of other streams that read its tokens
    # reader index -> the latest site of this stream whose output the reader's keys derive from
    read_after: dict[int, int] = field(default_factory=dict)
    # reader index -> (tokens of other sequences before, after) the merged ones in its keys
    # (CaiT's class attention attends over cat([class token, patches])), or why unknown
    key_layout: dict[int, "tuple[int, int] | str"] = field(default_factory=dict)

    @property
    def problems(self) -> list[str]:
        own = [f"site {s.index} ({s.module or s.kind}): {'; '.join(s.problems)}" for s in self.sites if s.problems]
        first = self.sites[0]
        shapes = [gu.tensor_shape(s.residual) for s in self.sites]
        # Symbolic counts are not compared (each such site already says its count is dynamic).
        counts = {shape[1] for shape in shapes if shape is not None and len(shape) == 3 and isinstance(shape[1], int)}
        if len(counts) > 1:
            # Unmerged, every site of one sequence sees the same token count; a sequence that
            # grows (tokens of another sequence concatenated in) needs a merge plan per part.
            own.append(f"the sequence of site {first.index} ({first.module or first.kind}) changes its token "
                       f"count between sites ({sorted(counts)}): tokens are concatenated into it")
        read = [f"the sequence of site {first.index} ({first.module or first.kind}) is read by site {r.index} "
                f"({r.module or r.kind}) of another sequence, which cannot take merged tokens: {why}"
                for r in self.readers for why in [reader_problem(r, self.padded) or self._layout_problem(r)] if why]
        return own + read

    def _layout_problem(self, reader: AttentionSite) -> str:
        layout = self.key_layout.get(reader.index, (0, 0))
        return layout if isinstance(layout, str) else ""

    @property
    def mergeable(self) -> bool:
        return not self.problems

    @property
    def padded(self) -> bool:
        """The sequence has padding (its first site's mask comes from the input)."""
        mask = self.sites[0].mask
        return isinstance(mask, Node) and gu.depends_on_data(mask)


def reader_problem(site: AttentionSite, padded: bool = False) -> str:
    """Why a cross-attention site cannot attend over merged tokens ('' if it can): it needs
    keys whose token axis is the merged one and no mask of its own, so that the key-size
    bias can be its whole mask. Over a ``padded`` sequence a mask of its own computed from
    the input is taken for the sequence's padding mask (NaFlex's attention-pooling head):
    the key bias, which masks padding too, replaces it, after a run-time check that both
    mask the same keys (``ops.check_reader_padding``)."""
    if site.kind not in ("sdpa", "explicit", "packed"):
        return f"{site.kind} attention as a reader is not supported yet"
    own = reader_mask(site)
    if isinstance(own, str):
        return own
    if own is not None and not (padded and isinstance(own, Node) and gu.depends_on_data(own)):
        return "it has its own attention mask over the merged tokens"
    if site.kind == "explicit" and site.softmax is None:
        return "no softmax to bias"
    if site.kind == "packed":
        # nn.MultiheadAttention (SigLIP's attention-pooling head): [tokens, batch, channels] keys.
        args = gu.packed_attention_args(site.attn)
        shape = gu.tensor_shape(site.k)
        if shape is None or len(shape) != 3:
            return "its keys are not [tokens, batch, channels]"
        if args["use_separate_proj_weight"] or args["bias_k"] is not None or args["add_zero_attn"]:
            return "extra key/value bias, zero attention or separate projections"
        return ""
    if gu.tensor_shape(site.k) is None or len(gu.tensor_shape(site.k)) != 4:
        return "its keys are not [batch, heads, tokens, dim]"
    return ""


def reader_mask(site: AttentionSite) -> "Node | str | None":
    """A reader's own mask over the keys (nn.MultiheadAttention: its ``attn_mask`` or its
    ``key_padding_mask``), or why it has two."""
    if site.kind != "packed":
        return site.mask
    args = gu.packed_attention_args(site.attn)
    if args["attn_mask"] is not None and args["key_padding_mask"] is not None:
        return "it has both an attention mask and a key padding mask over the merged tokens"
    return args["attn_mask"] if args["attn_mask"] is not None else args["key_padding_mask"]


@dataclass
class SiteDecision:
    site: int
    stream: int
    merge: bool
    reason: str = ""
    reads: Optional[int] = None  # the merged site whose tokens this cross-attention site reads


@dataclass
class StreamPlan:
    streams: list[Stream]
    chosen: Optional[Stream]
    decisions: list[SiteDecision]

    def problems(self) -> str:
        """Why nothing merges, site by site (for the fallback message)."""
        return "; ".join(p for s in self.streams for p in s.problems)


def group_streams(sites: list[AttentionSite]) -> list[Stream]:
    """The streams of ``sites`` (in graph order), each with the foreign sites that read it."""
    streams: list[Stream] = []
    stream_of: dict[int, Stream] = {}
    for site in sites:
        upstream = gu.ancestors(site.residual) | {site.residual} if isinstance(site.residual, Node) else set()
        earlier = [s for s in sites[: site.index] if s.stream_out is not None and s.stream_out in upstream]
        if earlier:
            stream = stream_of[earlier[-1].index]
        else:
            stream = Stream(len(streams))
            streams.append(stream)
        stream.sites.append(site)
        stream_of[site.index] = stream
    for site in sites:
        # What the site attends over, not counting what reaches it through its own residual
        # stream: a decoder's self-attention derives from the image only through its
        # earlier cross-attention outputs, which carry the text's token axis.
        own = site.residual
        inputs = set()
        for node in (site.q, site.k):
            if isinstance(node, Node) and node is not own:
                inputs |= gu.ancestors(node, stop=lambda n: n is own) | {node}
        for stream in streams:
            if stream is stream_of[site.index]:
                continue
            read = [s for s in stream.sites if s.stream_out is not None and s.stream_out in inputs]
            if read:
                stream.readers.append(site)
                stream.read_after[site.index] = read[-1].index
                stream.key_layout[site.index] = key_layout(site, read[-1].stream_out)
    return streams


def key_layout(reader: AttentionSite, tokens: Node) -> "tuple[int, int] | str":
    """Where the merged sequence ``tokens`` sits in ``reader``'s keys: (tokens before, tokens
    after) it, put there by a ``cat`` along the token axis with tokens of other sequences;
    (0, 0) when the keys are the sequence's tokens alone. A string says why it is unknown."""
    k_shape, own = gu.tensor_shape(reader.k), gu.tensor_shape(tokens)
    if k_shape is None or own is None or len(own) != 3 or len(k_shape) != (3 if reader.kind == "packed" else 4):
        return "the token counts of its keys are unknown"
    n_keys = k_shape[reader.k_token_axis]
    derived = gu.descendants(tokens) | {tokens}
    queue, seen = deque([reader.k]), set()
    while queue:
        node = queue.popleft()
        if node in seen or not isinstance(node, Node):
            continue
        seen.add(node)
        if node is tokens:
            break
        axis = gu.token_cat_axis(node)
        if axis is not None:
            pieces = list(node.args[0])
            # torch.cat skips 1-D empty tensors: an empty key cache arrives as one.
            widths = [(0,) * (axis + 1) if w == (0,) else w for w in map(gu.tensor_shape, pieces)]
            if any(w is None or len(w) <= axis or not isinstance(w[axis], int) for w in widths):
                return "its keys concatenate the merged tokens with pieces of unknown size"
            widths = [w[axis] for w in widths]
            # The piece that carries the sequence's own tokens (others may derive from it only
            # through attention: CaiT's class token after a class-attention block).
            carrying = [i for i, p in enumerate(pieces) if p in derived and widths[i] == own[1]]
            if len(carrying) != 1:
                return "its keys concatenate the merged tokens in a way that cannot be followed"
            at = carrying[0]
            before, after = sum(widths[:at]), sum(widths[at + 1:])
            if before + own[1] + after != n_keys:
                break
            return before, after
        queue.extend(i for i in node.all_input_nodes if i in derived)
    if n_keys != own[1]:
        return f"its keys hold {n_keys} tokens where the merged sequence has {own[1]}"
    return 0, 0


def plan_streams(sites: list[AttentionSite]) -> StreamPlan:
    """Group ``sites`` into streams and decide which one merges (see the module docstring)."""
    streams = group_streams(sites)
    candidates = [s for s in streams if s.mergeable]
    chosen = max(candidates, key=lambda s: len(s.sites)) if candidates else None
    decisions = []
    readers = {r.index: chosen.read_after[r.index] for r in chosen.readers} if chosen else {}
    for stream in streams:
        for site in stream.sites:
            if stream is chosen:
                decisions.append(SiteDecision(site.index, stream.index, True))
            elif site.index in readers:
                decisions.append(SiteDecision(site.index, stream.index, False,
                                              f"cross-attention over the merged tokens (as left by site "
                                              f"{readers[site.index]}), with their log-size key bias",
                                              reads=readers[site.index]))
            else:
                decisions.append(SiteDecision(site.index, stream.index, False, _untouched_reason(site, stream, chosen)))
    decisions.sort(key=lambda d: d.site)
    return StreamPlan(streams, chosen, decisions)


def _untouched_reason(site: AttentionSite, stream: Stream, chosen: Optional[Stream]) -> str:
    if site.problems:
        return "; ".join(site.problems)
    if not stream.mergeable:
        return "another site of its sequence cannot merge: " + "; ".join(stream.problems)
    assert chosen is not None
    return f"another sequence merges (stream {chosen.index}, {len(chosen.sites)} sites); one merged sequence per graph"
