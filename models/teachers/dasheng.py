"""Dasheng, SPEAR's audio teacher, in plain torch; loads the checkpoints the ``dasheng`` package publishes.

Dasheng (Dinkel et al., 2024) is a masked-autoencoder ViT over log-mel patches. The
published encoders (``dasheng_base`` / ``dasheng_06B`` / ``dasheng_12B``: embed dim
768 / 1280 / 1536, depth 12 / 32 / 40, heads 12 / 16 / 24) share one front end:

1. 64-bin mel power spectrogram at 16 kHz (n_fft 512, hann window 512, hop 160,
   ``center=True`` with reflect padding, HTK mel scale 0-8 kHz, no filter norm), as
   torchaudio's ``MelSpectrogram``;
2. ``AmplitudeToDB(top_db=120)``: 10 log10(max(x, 1e-10)), floored at the peak - 120 dB;
3. a BatchNorm over the mel bins (running statistics);
4. a patch embedding over (all 64 mel bins x 4 frames), stride 4: one token per 40 ms, 25 Hz;
5. time + frequency positional embeddings, pre-norm ViT blocks, a final LayerNorm.

Inputs longer than ``target_length`` mel frames (1008 = 10.08 s) are cut into chunks of
252 tokens that run through the transformer independently, as the reference does; here
the chunks of the whole batch run as one batch.

Where this implementation differs from ``dasheng`` on purpose (so that an utterance's
embeddings never depend on its batch; for a batch of one, both agree):

- the top_db floor uses each utterance's own peak (torchaudio takes one peak over the
  whole [B, mel, T] batch);
- reflect padding happens at each utterance's real end, not at the end of the padded batch;
- an utterance has floor((1 + S // 160) / 4) tokens, what the reference gives it alone;
  the reference's ``x_length`` masking keeps floor(S / 640), which can be one fewer.

Checkpoints: ``torch.load(weights_only=True)`` of ``{"model": state_dict, "config": {...}}``
(the published layout) or of a bare state dict; the architecture is read off the tensor
shapes, the head count from the published sizes or ``config["num_heads"]``. Layer ``k``
is the output of block ``k`` (0 = the patch tokens with positions); ``k == depth`` (the
default) is the model's output after the final LayerNorm, SPEAR's audio-teacher layer.

Example::

    >>> import torch
    >>> from spear.models.teachers.dasheng import DashengConfig, DashengEncoder, DashengTeacher
    >>> enc = DashengEncoder(DashengConfig(embed_dim=64, depth=2, num_heads=4)).eval()
    >>> teacher = DashengTeacher(enc, layer=None, weights_hash="random")
    >>> out = teacher(torch.randn(1, 32000) * 0.1)
    >>> out.embeddings.shape, teacher.frame_rate
    (torch.Size([1, 50, 64]), 25.0)
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .base import Teacher, conv_frames, hash_state_dict, make_version, read_weights

# (embed_dim, depth) -> heads of the published encoders; the dasheng package forces these at load.
PUBLISHED_HEADS = {(768, 12): 12, (1280, 32): 16, (1536, 40): 24}


@dataclass(frozen=True)
class DashengConfig:
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    layer_scale: bool = False  # LayerScale gammas (the reference's init_values); absent in published models
    patch_size: tuple[int, int] = (64, 4)
    patch_stride: tuple[int, int] = (64, 4)
    target_length: int = 1008  # mel frames per chunk
    n_fft: int = 512
    win_size: int = 512
    hop_size: int = 160
    n_mels: int = 64
    f_min: float = 0.0
    f_max: float = 8000.0
    center: bool = True
    top_db: float | None = 120.0
    sample_rate: int = 16000

    @property
    def chunk_tokens(self) -> int:
        return self.target_length // self.patch_stride[1]


# ----------------------------------------------------------------------------- front end


def htk_mel(f):
    return 2595.0 * math.log10(1.0 + f / 700.0)


def htk_mel_filterbank(n_freqs: int, f_min: float, f_max: float, n_mels: int, sample_rate: int) -> torch.Tensor:
    """[n_freqs, n_mels] triangles on the HTK mel scale, unnormalised (torchaudio's melscale_fbanks defaults)."""
    all_freqs = torch.linspace(0, sample_rate // 2, n_freqs)
    m_pts = torch.linspace(htk_mel(f_min), htk_mel(f_max), n_mels + 2)
    f_pts = 700.0 * (10.0 ** (m_pts / 2595.0) - 1.0)
    f_diff = f_pts[1:] - f_pts[:-1]
    slopes = f_pts.unsqueeze(0) - all_freqs.unsqueeze(1)  # [n_freqs, n_mels + 2]
    down = -slopes[:, :-2] / f_diff[:-1]
    up = slopes[:, 2:] / f_diff[1:]
    return torch.clamp(torch.minimum(down, up), min=0.0)


class DashengFrontEnd(nn.Module):
    """Waveforms [B, S] + lengths -> log-mel dB [B, n_mels, T] + mel frames per utterance."""

    def __init__(self, cfg: DashengConfig):
        super().__init__()
        self.cfg = cfg
        self.register_buffer("window", torch.hann_window(cfg.win_size))  # periodic, as torch.stft's default
        self.register_buffer("fb", htk_mel_filterbank(cfg.n_fft // 2 + 1, cfg.f_min, cfg.f_max, cfg.n_mels, cfg.sample_rate))

    def num_frames(self, num_samples):
        c = self.cfg
        if c.center:
            return num_samples // c.hop_size + 1
        return conv_frames(num_samples, [c.n_fft], [c.hop_size])

    def forward(self, wavs: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.cfg
        B, S = wavs.shape
        if c.center:
            # Reflect-pad each utterance at its own end: row b = reflect(x_b[:len_b], n_fft // 2), then zeros.
            pad = c.n_fft // 2
            pos = torch.arange(S + 2 * pad, device=wavs.device).unsqueeze(0) - pad  # [1, S + 2 pad]
            n = lengths.view(B, 1)
            src = pos.abs()
            src = torch.where(src >= n, 2 * (n - 1) - src, src)
            inside = pos < n + pad
            wavs = torch.where(inside, torch.gather(wavs, 1, src.clamp(0, S - 1).expand(B, -1)), 0.0)
        nf = self.num_frames(lengths)
        T = int(nf.max())
        frames = wavs[:, : (T - 1) * c.hop_size + c.n_fft].unfold(1, c.n_fft, c.hop_size)  # [B, T, n_fft]
        left = (c.n_fft - c.win_size) // 2  # torch.stft centres a shorter window inside n_fft
        window = F.pad(self.window, (left, c.n_fft - c.win_size - left))
        power = torch.fft.rfft(frames * window, dim=-1).abs().pow(2)
        db = 10.0 * torch.log10((power @ self.fb).clamp_min(1e-10))  # [B, T, n_mels]
        if c.top_db is not None:
            valid = (torch.arange(T, device=db.device).unsqueeze(0) < nf.unsqueeze(1)).unsqueeze(-1)
            peak = db.masked_fill(~valid, float("-inf")).amax(dim=(1, 2), keepdim=True)
            db = torch.maximum(db, peak - c.top_db)
        return db.transpose(1, 2), nf


# ----------------------------------------------------------------------------- transformer


class PatchEmbed(nn.Module):
    def __init__(self, cfg: DashengConfig):
        super().__init__()
        self.proj = nn.Conv2d(1, cfg.embed_dim, kernel_size=cfg.patch_size, stride=cfg.patch_stride)


class LayerScale(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * self.gamma


class Attention(nn.Module):
    def __init__(self, cfg: DashengConfig):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.qkv = nn.Linear(cfg.embed_dim, 3 * cfg.embed_dim, bias=cfg.qkv_bias)
        self.proj = nn.Linear(cfg.embed_dim, cfg.embed_dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        B, N, C = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4).unbind(0)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # mask [B, 1, 1, N]: True = attend
        return self.proj(y.transpose(1, 2).reshape(B, N, C))


class Mlp(nn.Module):
    def __init__(self, cfg: DashengConfig):
        super().__init__()
        hidden = int(cfg.embed_dim * cfg.mlp_ratio)
        self.fc1 = nn.Linear(cfg.embed_dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, cfg.embed_dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, cfg: DashengConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.embed_dim, eps=1e-6)
        self.attn = Attention(cfg)
        self.ls1 = LayerScale(cfg.embed_dim) if cfg.layer_scale else nn.Identity()
        self.norm2 = nn.LayerNorm(cfg.embed_dim, eps=1e-6)
        self.mlp = Mlp(cfg)
        self.ls2 = LayerScale(cfg.embed_dim) if cfg.layer_scale else nn.Identity()

    def forward(self, x, mask):
        x = x + self.ls1(self.attn(self.norm1(x), mask))
        return x + self.ls2(self.mlp(self.norm2(x)))


class DashengEncoder(nn.Module):
    """The Dasheng encoder; parameter names follow the published checkpoints (see ``KEY_MAP``)."""

    def __init__(self, cfg: DashengConfig):
        super().__init__()
        if cfg.patch_size[0] != cfg.n_mels or cfg.patch_stride[0] != cfg.n_mels:
            raise ValueError("only patches spanning all mel bins are supported (one token per time step, as published)")
        self.cfg = cfg
        self.front_end = DashengFrontEnd(cfg)
        self.init_bn = nn.BatchNorm1d(cfg.n_mels, momentum=0.01)
        self.patch_embed = PatchEmbed(cfg)
        self.time_pos_embed = nn.Parameter(torch.randn(1, cfg.embed_dim, 1, cfg.chunk_tokens) * 0.02)
        self.freq_pos_embed = nn.Parameter(torch.randn(1, cfg.embed_dim, 1, 1) * 0.02)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.embed_dim, eps=1e-6)

    def num_tokens(self, num_samples):
        c = self.cfg
        return conv_frames(self.front_end.num_frames(num_samples), [c.patch_size[1]], [c.patch_stride[1]])

    def forward(self, wavs: torch.Tensor, lengths: torch.Tensor, layer: int | None = None) -> torch.Tensor:
        """[B, S] float32 + lengths [B] -> [B, max tokens, D] of block ``layer`` (None: final, normed)."""
        layer = self.cfg.depth if layer is None else layer
        with torch.autocast(wavs.device.type, enabled=False):  # mel + dB in float32, as the reference
            spec, _ = self.front_end(wavs.float(), lengths)
            spec = self.init_bn(spec)
        x = self.patch_embed.proj(spec.unsqueeze(1)).flatten(2).transpose(1, 2)  # [B, P, D]
        B, P, D = x.shape
        C = self.cfg.chunk_tokens
        n = -(-P // C)
        # Chunks of C tokens run independently: fold them into the batch.
        x = F.pad(x, (0, 0, 0, n * C - P)).reshape(B * n, C, D)
        x = x + self.time_pos_embed[0, :, 0, :C].T + self.freq_pos_embed[0, :, 0, 0]
        pos = torch.arange(n * C, device=x.device).view(1, n, C)
        valid = (pos < self.num_tokens(lengths).view(B, 1, 1)).reshape(B * n, C)
        rows = valid.any(1)  # chunks wholly past an utterance's end are not run
        h, valid = x[rows], valid[rows]
        mask = None if bool(valid.all()) else valid[:, None, None, :]
        for blk in self.blocks[:layer]:
            h = blk(h, mask)
        if layer == self.cfg.depth:
            h = self.norm(h)
        out = h.new_zeros(B * n, C, D)
        out[rows] = h
        return out.view(B, n * C, D)[:, :P]


# ----------------------------------------------------------------------------- checkpoints

# Published key -> ours (torchaudio modules and an einops Rearrange wrapper in the reference).
KEY_MAP = {"front_end.0.spectrogram.window": "front_end.window", "front_end.0.mel_scale.fb": "front_end.fb"}
_BN_PREFIX = ("init_bn.1.", "init_bn.")
_FRONTEND_CONFIG_KEYS = ("n_fft", "win_size", "hop_size", "n_mels", "f_min", "f_max", "center", "top_db", "target_length")


def to_published_state_dict(model: DashengEncoder) -> dict[str, torch.Tensor]:
    """Our state dict under the published checkpoint's key names."""
    inv = {v: k for k, v in KEY_MAP.items()}
    out = {}
    for k, v in model.state_dict().items():
        if k in inv:
            k = inv[k]
        elif k.startswith(_BN_PREFIX[1]):
            k = _BN_PREFIX[0] + k[len(_BN_PREFIX[1]):]
        out[k] = v.detach().clone()
    return out


def save_dasheng_checkpoint(model: DashengEncoder, path: str | Path) -> None:
    """Write ``{"model": state_dict, "config": {...}}`` in the published layout (loadable by ``dasheng`` too)."""
    c = model.cfg
    config = {"embed_dim": c.embed_dim, "depth": c.depth, "num_heads": c.num_heads, "mlp_ratio": c.mlp_ratio,
              "qkv_bias": c.qkv_bias, "patch_size": list(c.patch_size), "patch_stride": list(c.patch_stride),
              **{k: getattr(c, k) for k in _FRONTEND_CONFIG_KEYS}}
    if c.layer_scale:
        config["init_values"] = 1.0
    torch.save({"model": to_published_state_dict(model), "config": config}, str(path))


def load_dasheng_checkpoint(path: str | Path) -> tuple[DashengConfig, dict[str, torch.Tensor]]:
    """Read a Dasheng checkpoint without executing code -> (config, state dict under our key names)."""
    dump = read_weights(path, "dasheng checkpoint")
    if isinstance(dump, dict) and isinstance(dump.get("model"), dict):
        state, meta = dump["model"], dict(dump.get("config") or {})
    elif isinstance(dump, dict) and dump and all(isinstance(v, torch.Tensor) for v in dump.values()):
        state, meta = dump, {}
    else:
        raise ValueError(f"dasheng checkpoint {path}: expected {{'model': state_dict, 'config': {{...}}}} or a state dict")
    ours = {}
    for k, v in state.items():
        if k in KEY_MAP:
            k = KEY_MAP[k]
        elif k.startswith(_BN_PREFIX[0]):
            k = _BN_PREFIX[1] + k[len(_BN_PREFIX[0]):]
        ours[k] = v
    if "cls_token" in ours:
        raise ValueError(f"dasheng checkpoint {path} uses token pooling (cls_token); published encoders do not, "
                         "and frame embeddings need one token per time step")
    if "patch_embed.proj.weight" not in ours:
        raise ValueError(f"dasheng checkpoint {path}: no patch_embed.proj.weight (not a Dasheng encoder)")
    w = ours["patch_embed.proj.weight"]
    embed_dim, patch_size = int(w.shape[0]), (int(w.shape[2]), int(w.shape[3]))
    depth = 1 + max((int(m.group(1)) for k in ours if (m := re.match(r"blocks\.(\d+)\.", k))), default=-1)
    heads = PUBLISHED_HEADS.get((embed_dim, depth), meta.get("num_heads"))
    if heads is None:
        raise ValueError(f"dasheng checkpoint {path}: embed_dim {embed_dim} / depth {depth} is not a published size "
                         "and its config has no num_heads")
    kwargs = {k: meta[k] for k in _FRONTEND_CONFIG_KEYS if k in meta}
    if "front_end.fb" in ours:
        kwargs["n_mels"] = int(ours["front_end.fb"].shape[1])
    if "patch_stride" in meta:
        kwargs["patch_stride"] = tuple(int(s) for s in meta["patch_stride"])
    cfg = DashengConfig(
        embed_dim=embed_dim, depth=depth, num_heads=int(heads),
        mlp_ratio=ours["blocks.0.mlp.fc1.weight"].shape[0] / embed_dim if depth else 4.0,
        qkv_bias="blocks.0.attn.qkv.bias" in ours, layer_scale="blocks.0.ls1.gamma" in ours,
        patch_size=patch_size, **{"patch_stride": patch_size, **kwargs},
    )
    # The reference cuts or stretches the time positions to target_length // stride tokens.
    tpe = ours.get("time_pos_embed")
    if tpe is not None and tpe.shape[-1] != cfg.chunk_tokens:
        if tpe.shape[-1] > cfg.chunk_tokens:
            ours["time_pos_embed"] = tpe[..., : cfg.chunk_tokens]
        else:
            ours["time_pos_embed"] = F.interpolate(tpe, size=(1, cfg.chunk_tokens), mode="bilinear", align_corners=False)
    return cfg, ours


def build_dasheng(path: str | Path) -> tuple[DashengEncoder, str]:
    """(encoder with the checkpoint's weights, weights hash) from a local checkpoint file or folder."""
    p = Path(path)
    if p.is_dir():
        files = sorted(q for q in p.iterdir() if q.suffix in (".pt", ".pth", ".ckpt"))
        if len(files) != 1:
            raise FileNotFoundError(f"dasheng checkpoint folder {p} must hold exactly one .pt/.pth/.ckpt file, found {len(files)}")
        p = files[0]
    cfg, state = load_dasheng_checkpoint(p)
    model = DashengEncoder(cfg)
    missing, unexpected = model.load_state_dict(state, strict=False)
    # Buffers the checkpoint lacks (bare state dicts) keep our computed values; weights may not be missing.
    missing = [k for k in missing if k not in ("front_end.window", "front_end.fb", "init_bn.num_batches_tracked")]
    if missing or unexpected:
        raise ValueError(f"dasheng checkpoint {p} does not match the architecture read from it: "
                         f"missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model.eval().requires_grad_(False), hash_state_dict(model.state_dict())


class DashengTeacher(Teacher):
    """A Dasheng encoder at one layer; 25 Hz, ``embed_dim``-d."""

    name = "dasheng"

    def __init__(self, encoder: DashengEncoder, layer: int | None, weights_hash: str):
        super().__init__()
        cfg = encoder.cfg
        layer = cfg.depth if layer is None else (layer + cfg.depth + 1 if layer < 0 else layer)
        if not 0 <= layer <= cfg.depth:
            raise ValueError(f"dasheng: layer {layer} out of range: the model has {cfg.depth} blocks (0..{cfg.depth})")
        encoder.blocks = encoder.blocks[:layer]  # blocks above the chosen layer are never run
        self.encoder = encoder.eval().requires_grad_(False)
        self.layer, self._depth = layer, cfg.depth
        self.dim = cfg.embed_dim
        self.frame_rate = cfg.sample_rate / (cfg.hop_size * cfg.patch_stride[1])
        self.version = make_version(self.name, weights_hash, layer, asdict(cfg))

    def num_frames_for(self, num_samples):
        return self.encoder.num_tokens(num_samples)

    def embed(self, wavs: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return self.encoder(wavs, lengths, layer=self.layer)
