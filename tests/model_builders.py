"""Small random-weight models shared by the tests (no network, no pretrained weights)."""
from __future__ import annotations

import torch
from timm.models.deit import VisionTransformerDistilled
from timm.models.vision_transformer import VisionTransformer

# 32x32 images in 8x8 patches: a 4x4 grid of 16 patch tokens (row-major), plus prefix tokens.
GRID = 4
N_PATCHES = GRID * GRID
NUM_PREFIX = {"vit": 1, "vit_avg": 1, "vit_reg": 3, "deit_distilled": 2}


def small_vit(kind: str = "vit", seed: int = 0, patch_size: int = 8, depth: int = 4) -> torch.nn.Module:
    """A small random timm ViT whose attention is far from uniform (so semantic values differ)."""
    torch.manual_seed(seed)
    common = dict(img_size=32, patch_size=patch_size, embed_dim=48, depth=depth, num_heads=3, num_classes=10)
    if kind == "vit":
        model = VisionTransformer(**common)
    elif kind == "vit_avg":
        model = VisionTransformer(global_pool="avg", qk_norm=True, **common)
    elif kind == "vit_reg":  # CLS + 2 registers, no qkv bias, layer scale
        model = VisionTransformer(reg_tokens=2, qkv_bias=False, init_values=0.3, **common)
    elif kind == "deit_distilled":  # CLS + distillation token
        model = VisionTransformerDistilled(**common)
    else:
        raise ValueError(kind)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() >= 2 or "token" in name:
                param.normal_(0.0, 0.3 if "qkv" in name else 0.15)
    return model.eval()


def images(batch: int = 2, seed: int = 1, size: int = 32) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def small_hf(kind: str, attn: str = "sdpa", layers: int = 3) -> torch.nn.Module:
    """A small random transformers model: vit, deit, dinov2 (images 32x32, patch 4) or bert."""
    import transformers as tf

    torch.manual_seed(0)
    vision = dict(image_size=32, patch_size=4, hidden_size=48, num_hidden_layers=layers, num_attention_heads=3)
    if kind == "vit":
        model = tf.ViTModel(tf.ViTConfig(intermediate_size=96, **vision))
    elif kind == "deit":
        model = tf.DeiTModel(tf.DeiTConfig(intermediate_size=96, **vision))
    elif kind == "dinov2":
        model = tf.Dinov2Model(tf.Dinov2Config(mlp_ratio=2, **vision))
    elif kind == "bert":
        model = tf.BertModel(tf.BertConfig(hidden_size=48, num_hidden_layers=layers, num_attention_heads=3,
                                           intermediate_size=96, vocab_size=100))
    else:
        raise ValueError(kind)
    model.set_attn_implementation(attn)
    return model.eval()


def padded_batch(lengths: list[int], n_tokens: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and an attention mask with real tokens first and padding after."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 100, (len(lengths), n_tokens), generator=gen)
    mask = torch.zeros(len(lengths), n_tokens, dtype=torch.long)
    for row, length in enumerate(lengths):
        mask[row, :length] = 1
    return ids, mask


def duplicated_pairs(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Make patch tokens come in identical adjacent pairs (tokens p+2k and p+2k+1).

    Patch columns 1 and 3 of the image copy columns 0 and 2, and the position
    embeddings of those patches copy their left neighbours', so the embedded
    sequence is [prefix..., t0, t0, t1, t1, ...] (row-major 4x4 grid).
    Returns the modified images; the model's pos_embed is modified in place.
    """
    x = x.clone()
    x[..., 8:16] = x[..., 0:8]
    x[..., 24:32] = x[..., 16:24]
    p = model.num_prefix_tokens
    with torch.no_grad():
        pos = model.pos_embed[0, p:]  # [16, C], prefix entries come first in these models
        pos[1::2] = pos[0::2]
    return x


def tiny_timm_vit(depth: int) -> torch.nn.Module:
    """A timm ViT on 32x32 images, patch 4 (65 tokens), width 48, 3 heads, no head."""
    import timm

    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=4, depth=depth,
                             num_classes=0, embed_dim=48, num_heads=3)


def dynamo_graph(model: torch.nn.Module, *args, **kwargs):
    """The one torch-level graph (with example values) that Dynamo hands a backend for ``model(*args)``."""
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(model, backend=capture)(*args, **kwargs)
    assert len(graphs) == 1, f"Dynamo made {len(graphs)} graphs"
    return graphs[0]


class RotaryViT(torch.nn.Module):
    """A pre-norm ViT with 2D rotary positions computed in ``forward`` from the patch grid, in
    the layout DINOv3 uses: the class token is sliced off before the rotation and stays unrotated.
    ``axes="y"`` rotates by the row coordinate only, so the patches of one row share a rotation
    and a row of identical patches stays a row of identical tokens through every block."""

    def __init__(self, axes: str = "yx", dim: int = 32, heads: int = 2, depth: int = 3, patch: int = 4,
                 image: int = 16, classes: int = 5, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.axes, self.heads, self.grid = axes, heads, image // patch
        self.embed = torch.nn.Conv2d(3, dim, patch, patch)
        self.cls = torch.nn.Parameter(torch.randn(1, 1, dim) * 0.5)
        head_dim = dim // heads
        self.register_buffer("freqs", 1.0 / (10.0 ** (torch.arange(head_dim // 4) * 4 / head_dim)))
        self.blocks = torch.nn.ModuleList(torch.nn.ModuleDict(dict(
            norm1=torch.nn.LayerNorm(dim), qkv=torch.nn.Linear(dim, 3 * dim), proj=torch.nn.Linear(dim, dim),
            norm2=torch.nn.LayerNorm(dim), fc1=torch.nn.Linear(dim, 2 * dim), fc2=torch.nn.Linear(2 * dim, dim),
        )) for _ in range(depth))
        self.norm, self.head = torch.nn.LayerNorm(dim), torch.nn.Linear(dim, classes)
        with torch.no_grad():
            for name, param in self.named_parameters():
                if param.dim() >= 2 and "embed" not in name:
                    param.normal_(0.0, 0.25)

    def rotation(self) -> tuple[torch.Tensor, torch.Tensor]:
        rows, cols = torch.meshgrid(torch.arange(self.grid), torch.arange(self.grid), indexing="ij")
        along_x = 1.0 if "x" in self.axes else 0.0
        angles = torch.cat([rows.flatten()[:, None] * self.freqs, along_x * cols.flatten()[:, None] * self.freqs], -1)
        angles = torch.cat([angles, angles], -1)
        return angles.cos(), angles.sin()

    @staticmethod
    def rotate(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        half = t.shape[-1] // 2
        turned = torch.cat([-t[..., half:], t[..., :half]], -1)
        return torch.cat([t[:, :, :1], t[:, :, 1:] * cos + turned[:, :, 1:] * sin], 2)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.embed(images).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], 1)
        cos, sin = self.rotation()
        for block in self.blocks:
            batch, n, dim = x.shape
            qkv = block["qkv"](block["norm1"](x)).reshape(batch, n, 3, self.heads, dim // self.heads)
            q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
            q, k = self.rotate(q, cos, sin), self.rotate(k, cos, sin)
            attn = torch.nn.functional.scaled_dot_product_attention(q, k, v)
            x = x + block["proj"](attn.transpose(1, 2).reshape(batch, n, dim))
            x = x + block["fc2"](torch.nn.functional.gelu(block["fc1"](block["norm2"](x))))
        return self.head(self.norm(x)[:, 0])


def row_duplicated_images(batch: int = 2, image: int = 16, patch: int = 4, seed: int = 1) -> torch.Tensor:
    """Images whose patches repeat along each row: every patch of a row is the row's first patch."""
    grid = image // patch
    first = torch.randn(batch, 3, grid, 1, patch, patch, generator=torch.Generator().manual_seed(seed))
    patches = first.expand(-1, -1, -1, grid, -1, -1)  # [B, 3, rows, cols, ph, pw]
    return patches.permute(0, 1, 2, 4, 3, 5).reshape(batch, 3, image, image).contiguous()


class JointRotaryDiT(torch.nn.Module):
    """A small diffusion transformer in the MMDiT layout, written here: image tokens (1x1 patches of
    an 8x8 latent) and a class-token stream attend jointly (image first), each with its own
    residual stream and AdaLN gates from a timestep vector; the image queries and keys are
    rotated by 2D rotary positions computed in ``forward``; the output returns to the grid.
    ``by_cell``: rotate by the 2x2 cell's coordinates, so the four tokens of a cell share a
    rotation (duplicated cells then stay duplicates). ``single``: that many single-stream blocks
    follow on the concatenation [image, text] (unlike Flux's [text, image], each with separate
    attention and feed-forward adds), and the image tokens are returned as tokens, not a grid."""

    def __init__(self, by_cell: bool = False, dim: int = 32, heads: int = 2, depth: int = 2, channels: int = 4,
                 grid: int = 8, classes: int = 3, text: int = 2, seed: int = 0, single: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.by_cell, self.heads, self.grid, self.text = by_cell, heads, grid, text
        self.embed = torch.nn.Linear(channels, dim)
        self.labels = torch.nn.Embedding(classes, text * dim)
        self.time = torch.nn.Linear(1, dim)
        head_dim = dim // heads
        self.register_buffer("freqs", 1.0 / (10.0 ** (torch.arange(head_dim // 4) * 4 / head_dim)))

        def stream() -> torch.nn.ModuleDict:
            return torch.nn.ModuleDict(dict(
                mod=torch.nn.Linear(dim, 4 * dim), qkv=torch.nn.Linear(dim, 3 * dim), out=torch.nn.Linear(dim, dim),
                fc1=torch.nn.Linear(dim, 2 * dim), fc2=torch.nn.Linear(2 * dim, dim)))

        self.blocks = torch.nn.ModuleList(torch.nn.ModuleDict(dict(image=stream(), text=stream())) for _ in range(depth))
        self.single = torch.nn.ModuleList(stream() for _ in range(single))
        self.out = torch.nn.Linear(dim, channels)
        with torch.no_grad():
            for name, param in self.named_parameters():
                if param.dim() >= 2:
                    param.normal_(0.0, 0.2)

    def rotation(self) -> tuple[torch.Tensor, torch.Tensor]:
        rows, cols = torch.meshgrid(torch.arange(self.grid), torch.arange(self.grid), indexing="ij")
        if self.by_cell:
            rows, cols = rows // 2, cols // 2
        angles = torch.cat([rows.flatten()[:, None] * self.freqs, cols.flatten()[:, None] * self.freqs], -1)
        angles = torch.cat([angles, angles], -1)
        return angles.cos(), angles.sin()

    def heads_of(self, t: torch.Tensor) -> torch.Tensor:
        batch, n, dim = t.shape
        return t.reshape(batch, n, self.heads, dim // self.heads).transpose(1, 2)

    def forward(self, latents: torch.Tensor, timestep: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = latents.shape
        x = self.embed(latents.flatten(2).transpose(1, 2))
        c = self.labels(label).reshape(batch, self.text, -1)
        cond = torch.nn.functional.silu(self.time(timestep[:, None].float()))
        cos, sin = self.rotation()
        n = x.shape[1]
        for block in self.blocks:
            img, txt = block["image"], block["text"]
            shift_i, scale_i, gate_i, mlp_i = img["mod"](cond)[:, None].chunk(4, -1)
            shift_t, scale_t, gate_t, mlp_t = txt["mod"](cond)[:, None].chunk(4, -1)
            hi = torch.nn.functional.layer_norm(x, x.shape[-1:]) * (1 + scale_i) + shift_i
            ht = torch.nn.functional.layer_norm(c, c.shape[-1:]) * (1 + scale_t) + shift_t
            qi, ki, vi = (self.heads_of(t) for t in img["qkv"](hi).chunk(3, -1))
            qt, kt, vt = (self.heads_of(t) for t in txt["qkv"](ht).chunk(3, -1))
            half = qi.shape[-1] // 2
            qi = qi * cos + torch.cat([-qi[..., half:], qi[..., :half]], -1) * sin
            ki = ki * cos + torch.cat([-ki[..., half:], ki[..., :half]], -1) * sin
            q, k, v = torch.cat([qi, qt], 2), torch.cat([ki, kt], 2), torch.cat([vi, vt], 2)
            attn = torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)
            x = x + gate_i * img["out"](attn[:, :n])
            c = c + gate_t * txt["out"](attn[:, n:])
            x = x + mlp_i * img["fc2"](torch.nn.functional.gelu(img["fc1"](torch.nn.functional.layer_norm(x, x.shape[-1:]))))
            c = c + mlp_t * txt["fc2"](torch.nn.functional.gelu(txt["fc1"](torch.nn.functional.layer_norm(c, c.shape[-1:]))))
        if self.single:
            return self.out(self.single_stream(torch.cat([x, c], 1), cond, cos, sin)[:, :n])
        return self.out(x).reshape(batch, height, width, channels).permute(0, 3, 1, 2)

    def single_stream(self, s: torch.Tensor, cond: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Blocks on one stream of image then text tokens, attention and feed-forward each closed by
        its own add; the text rows of the rotation are the identity."""
        cos = torch.cat([cos, torch.ones(self.text, cos.shape[-1])], 0)
        sin = torch.cat([sin, torch.zeros(self.text, sin.shape[-1])], 0)
        for block in self.single:
            shift, scale, gate, mlp = block["mod"](cond)[:, None].chunk(4, -1)
            h = torch.nn.functional.layer_norm(s, s.shape[-1:]) * (1 + scale) + shift
            q, k, v = (self.heads_of(t) for t in block["qkv"](h).chunk(3, -1))
            half = q.shape[-1] // 2
            q = q * cos + torch.cat([-q[..., half:], q[..., :half]], -1) * sin
            k = k * cos + torch.cat([-k[..., half:], k[..., :half]], -1) * sin
            attn = torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)
            s = s + gate * block["out"](attn)
            s = s + mlp * block["fc2"](torch.nn.functional.gelu(block["fc1"](torch.nn.functional.layer_norm(s, s.shape[-1:]))))
        return s


def cell_duplicated_latents(batch: int = 2, channels: int = 4, grid: int = 8, seed: int = 2) -> torch.Tensor:
    """Latents whose every 2x2 cell holds one value per channel."""
    cells = torch.randn(batch, channels, grid // 2, grid // 2, generator=torch.Generator().manual_seed(seed))
    return cells.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)


class FactorizedVideoTransformer(torch.nn.Module):
    """Divided space-time attention written here, unlike TimeSformer's code: tokens held as
    [B, frames, places, C], each block a spatial attention over the places of each frame and a
    temporal one over the frames of each place (separate q/k/v projections, SDPA), the residual
    adds made on the 4-D tensor, no class token, mean pooling. ``pos`` is a learned per-place
    embedding (tests zero it to make duplicated patches exact duplicates)."""

    def __init__(self, dim: int = 32, heads: int = 2, depth: int = 2, patch: int = 4, image: int = 16,
                 seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.dim, self.heads, self.places = dim, heads, (image // patch) ** 2
        self.patch = torch.nn.Conv2d(3, dim, patch, patch)
        self.pos = torch.nn.Parameter(torch.randn(self.places, dim) * 0.5)

        def attention() -> torch.nn.ModuleDict:
            return torch.nn.ModuleDict({name: torch.nn.Linear(dim, dim) for name in ("q", "k", "v", "o")})

        self.blocks = torch.nn.ModuleList(torch.nn.ModuleDict(dict(
            space=attention(), time=attention(),
            mlp=torch.nn.Sequential(torch.nn.Linear(dim, 2 * dim), torch.nn.GELU(), torch.nn.Linear(2 * dim, dim))))
            for _ in range(depth))

    def attend(self, layers: torch.nn.ModuleDict, x: torch.Tensor) -> torch.Tensor:
        groups, length, dim = x.shape
        h = torch.nn.functional.layer_norm(x, (dim,))

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(groups, length, self.heads, dim // self.heads).transpose(1, 2)

        out = torch.nn.functional.scaled_dot_product_attention(split(layers.q(h)), split(layers.k(h)), split(layers.v(h)))
        return layers.o(out.transpose(1, 2).reshape(groups, length, dim))

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        batch, frames = video.shape[:2]
        x = self.patch(video.flatten(0, 1)).flatten(2).transpose(1, 2)
        x = x.reshape(batch, frames, self.places, self.dim) + self.pos
        for block in self.blocks:
            x = x + self.attend(block.space, x.reshape(batch * frames, self.places, self.dim)).reshape(x.shape)
            by_place = x.transpose(1, 2).reshape(batch * self.places, frames, self.dim)
            x = x + self.attend(block.time, by_place).reshape(batch, self.places, frames, self.dim).transpose(1, 2)
            x = x + block.mlp(torch.nn.functional.layer_norm(x, (self.dim,)))
        return x.mean(dim=(1, 2))


def row_repeated_video(batch: int = 2, frames: int = 2, image: int = 16, patch: int = 4, seed: int = 3) -> torch.Tensor:
    """Frames whose patches repeat along each row of the patch grid: the tokens of a row (four
    consecutive tokens in row-major order) are exact duplicates once position embeddings are zero."""
    rows = torch.randn(batch, frames, 3, image // patch, 1, patch, patch, generator=torch.Generator().manual_seed(seed))
    tiles = rows.expand(-1, -1, -1, -1, image // patch, -1, -1)  # B, T, 3, row, column, py, px
    return tiles.permute(0, 1, 2, 3, 5, 4, 6).reshape(batch, frames, 3, image, image).contiguous()


def cell_repeated_video(batch: int = 2, frames: int = 2, image: int = 32, patch: int = 8, seed: int = 3) -> torch.Tensor:
    """Frames whose patches repeat over each 2 x 2 cell of the patch grid."""
    cells = torch.randn(batch, frames, 3, image // patch // 2, 1, image // patch // 2, 1, patch, patch,
                        generator=torch.Generator().manual_seed(seed))
    tiles = cells.expand(-1, -1, -1, -1, 2, -1, 2, -1, -1)  # B, T, 3, cell row, 2, cell column, 2, py, px
    return tiles.permute(0, 1, 2, 3, 4, 7, 5, 6, 8).reshape(batch, frames, 3, image, image).contiguous()


class PaddedPatchEncoder(torch.nn.Module):
    """Variable-resolution patches padded to one length, written here unlike SigLIP 2's code:
    [B, N, P] patches with a [B, N] validity mask, pre-norm blocks whose SDPA takes a boolean
    mask of the valid keys, and a pooling head that is an ``nn.MultiheadAttention`` probe with
    ``key_padding_mask``. No position embedding, so duplicated patches stay duplicates."""

    def __init__(self, patch: int = 48, dim: int = 32, heads: int = 2, depth: int = 2, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.heads = heads
        self.embed = torch.nn.Linear(patch, dim)
        self.blocks = torch.nn.ModuleList(torch.nn.ModuleDict(dict(
            norm1=torch.nn.LayerNorm(dim), qkv=torch.nn.Linear(dim, 3 * dim), out=torch.nn.Linear(dim, dim),
            norm2=torch.nn.LayerNorm(dim), mlp=torch.nn.Sequential(torch.nn.Linear(dim, 2 * dim), torch.nn.GELU(),
                                                                   torch.nn.Linear(2 * dim, dim))))
            for _ in range(depth))
        self.probe = torch.nn.Parameter(torch.randn(1, 1, dim))
        self.pool = torch.nn.MultiheadAttention(dim, heads, batch_first=True)

    def forward(self, patches: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        x = self.embed(patches)
        batch, n, dim = x.shape
        allowed = valid.bool()[:, None, None, :]
        for block in self.blocks:
            q, k, v = block["qkv"](block["norm1"](x)).reshape(batch, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
            attn = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
            x = x + block["out"](attn.transpose(1, 2).reshape(batch, n, dim))
            x = x + block["mlp"](block["norm2"](x))
        pooled, _ = self.pool(self.probe.expand(batch, -1, -1), x, x, key_padding_mask=~valid.bool(), need_weights=False)
        return pooled[:, 0]


class PlaceholderPrefixLM(torch.nn.Module):
    """A language model that reads image features the way vision-language models do: token
    embeddings whose placeholder positions (``image_token``) a ``masked_scatter`` fills with the
    features, pre-norm SDPA blocks, no positions at all, and a prefix-LM mask built from arange
    (every token sees the first ``prefix`` tokens; after them attention is causal), as PaliGemma's
    prompt is read. Duplicated features stay duplicated through every layer inside the prefix."""

    def __init__(self, vocab: int = 64, dim: int = 32, heads: int = 2, depth: int = 2, image_token: int = 63,
                 prefix: int = 0) -> None:
        super().__init__()
        self.image_token, self.heads, self.prefix = image_token, heads, prefix
        self.embed = torch.nn.Embedding(vocab, dim)
        self.norms = torch.nn.ModuleList(torch.nn.LayerNorm(dim) for _ in range(2 * depth))
        self.qkv = torch.nn.ModuleList(torch.nn.Linear(dim, 3 * dim) for _ in range(depth))
        self.proj = torch.nn.ModuleList(torch.nn.Linear(dim, dim) for _ in range(depth))
        self.mlp = torch.nn.ModuleList(
            torch.nn.Sequential(torch.nn.Linear(dim, 2 * dim), torch.nn.GELU(), torch.nn.Linear(2 * dim, dim))
            for _ in range(depth))
        self.head = torch.nn.Linear(dim, vocab)

    def forward(self, input_ids: torch.Tensor, image_features: torch.Tensor) -> torch.Tensor:
        x = self.embed(input_ids)
        mask = (input_ids == self.image_token).unsqueeze(-1)
        x = x.masked_scatter(mask, image_features)
        batch, length, dim = x.shape
        q_index = torch.arange(length, device=x.device)[:, None]
        k_index = torch.arange(length, device=x.device)[None, :]
        allowed = (k_index <= q_index) | (k_index < self.prefix)
        for i, (qkv, proj, mlp) in enumerate(zip(self.qkv, self.proj, self.mlp)):
            q, k, v = qkv(self.norms[2 * i](x)).reshape(batch, length, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
            y = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
            x = x + proj(y.transpose(1, 2).reshape(batch, length, dim))
            x = x + mlp(self.norms[2 * i + 1](x))
        return self.head(x)


def placeholder_prompt(batch: int = 2, lead: int = 3, count: int = 16, trail: int = 4, image_token: int = 63,
                       seed: int = 0) -> torch.Tensor:
    """Token ids [B, lead + count + trail]: text, ``count`` placeholders, text."""
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(0, image_token, (batch, lead + trail), generator=g)
    return torch.cat([text[:, :lead], torch.full((batch, count), image_token), text[:, lead:]], dim=1)


def grouped_features(batch: int = 2, count: int = 16, group: int = 2, dim: int = 32, seed: int = 1) -> torch.Tensor:
    """[B * count, dim] image features in which each run of ``group`` consecutive tokens is one token repeated."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, count // group, dim, generator=g).repeat_interleave(group, dim=1).reshape(-1, dim)
