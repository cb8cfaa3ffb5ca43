"""The authors' SPEAR checkpoints <-> this project's Zipformer2, both ways (pure: state dicts in, out).

The SPEAR authors release Zipformer2 encoders in two layouts (read with the search tools:
k2-fsa/icefall ``egs/librispeech/ASR/zipformer/{zipformer,subsampling}.py`` for the module
names, marcoyang1998/icefall ``MultiKDModel`` for the SPEAR wrapper, and the
transformers-style release ``marcoyang/spear-*`` on the Hugging Face hub: ``modeling_spear.py``
wraps the icefall model twice, ``SpearModel.model.model``, and ``configuration_spear.py``
holds the icefall arguments as comma-separated strings):

- **icefall** (``ICEFALL``): a ``.pt`` file holding ``{"model": state_dict}`` with the keys of
  ``MultiKDModel``: ``encoder_embed.*`` (Conv2dSubsampling), ``encoder.*`` (Zipformer2),
  ``mask_emb`` and the training heads (``codebook_loss_heads.*``, ``audio_tagging_proj.*``);
- **hf** (``HF``): ``model.safetensors`` with the same keys under the prefix
  ``model.model.`` (:data:`HF_PREFIX`), and a ``config.json`` of ``SpearConfig`` fields
  (:func:`hf_config` / :func:`config_from_hf`).

The key map (ours <-> theirs, :data:`KEY_RULES`; ``{ds}`` is ``encoder.`` in a stack whose
downsampling factor is above 1, where icefall wraps the stack in a DownsampledZipformer2Encoder):

=========================================== =====================================================
this project (Zipformer2)                   icefall (MultiKDModel)
=========================================== =====================================================
``encoder_embed.conv1.*``                   ``encoder_embed.conv.0.*`` (nn.Sequential index)
``encoder_embed.conv2.*``                   ``encoder_embed.conv.4.*``
``encoder_embed.conv3.*``                   ``encoder_embed.conv.7.*``
``encoder_embed.{convnext,out,out_norm}.*`` same
``stacks.I.layers.J.<module>.*``            ``encoder.encoders.I.{ds}layers.J.<module>.*``
``stacks.I.downsample_bias``                ``encoder.encoders.I.downsample.bias``
``stacks.I.out_combiner.bypass_scale``      ``encoder.encoders.I.out_combiner.bypass_scale``
``downsample_output.bias`` (25 Hz only)     ``encoder.downsample_output.bias``
``mask_embedding``                          ``mask_emb``
(none)                                      ``encoder.encoders.I.{ds}layers.J.bypass_scale``
                                            (unused by icefall's forward, which marks it for removal;
                                            written as its initial 0.5, dropped on import)
(none at 50 Hz)                             ``encoder.downsample_output.bias`` of size 1 (a
                                            softmax over one frame: the identity; written as
                                            0, dropped on import)
=========================================== =====================================================

Inside a layer the module names are icefall's (``self_attn_weights``, ``self_attn1``,
``feed_forward1``, ``nonlin_attention``, ``conv_module1``, ``norm``, ``bypass``, ...), so they map
one to one. One numeric transform: icefall computes attention scores as ``q . k`` with no
``1 / sqrt(d_q)`` (its ``in_proj`` is initialised with that scale folded in, ScaledAdam keeps it
there), while :class:`~spear.models.student.zipformer.RelPositionAttentionWeights` multiplies
``q`` by ``query_head_dim ** -0.5`` explicitly. So the query rows (the first
``num_heads * query_head_dim``) of every ``self_attn_weights.in_proj`` weight and bias are
multiplied by ``query_head_dim ** 0.5`` on import and by ``query_head_dim ** -0.5`` on export
(computed in float64, stored in the tensor's own dtype). Keys and positional rows are untouched.

Every tensor of an encoder is accounted for: a key that no rule maps raises ValueError naming it,
and the conversion result lists what was ignored (training heads) and what was filled.

Example::

    >>> import torch
    >>> from spear.models.student import build_encoder
    >>> from spear.models.student.convert import from_icefall, to_icefall
    >>> enc = build_encoder("zipformer2", "tiny", num_mel_bins=80)
    >>> theirs = to_icefall(enc.state_dict(), enc.config)
    >>> sorted(theirs)[:2]
    ['encoder.downsample_output.bias', 'encoder.encoders.0.layers.0.bypass.bypass_scale']
    >>> back = from_icefall(theirs, hints=dict(query_head_dim=8, value_head_dim=8, pos_head_dim=2), num_mel_bins=80)
    >>> back.config == enc.config, sorted(back.state) == sorted(enc.state_dict()), back.ignored
    (True, True, [])

(``tiny`` has non-SPEAR head dims, which the weights alone do not determine: hence the hints.)
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

import torch

from .configs import ZipformerConfig

ICEFALL = "icefall"
HF = "hf"
LAYOUTS = (ICEFALL, HF)
#: Where the icefall model sits in the transformers-style release (``SpearModel.model.model``).
HF_PREFIX = "model.model."
#: The icefall fbank width SPEAR uses when a checkpoint does not say (``num_mel_bins`` / ``feature_dim``).
DEFAULT_MEL_BINS = 128
#: Head dims icefall's Zipformer2 takes per stack, fixed in the SPEAR runs; the ``SpearConfig`` of
#: the release does not hold them, so an import without hints assumes these (checked against shapes).
DEFAULT_HEAD_DIMS = {"query_head_dim": 32, "value_head_dim": 12, "pos_head_dim": 4}

# The modules of one Zipformer2 layer: the same names here and in icefall.
_LAYER = r"((?:self_attn_weights|self_attn[12]|feed_forward[123]|nonlin_attention|conv_module[12]|norm|bypass|bypass_mid)\..+)"

# Ours -> icefall: (regex on our key, icefall template). ``{ds}`` is filled per stack.
KEY_RULES: tuple[tuple[str, str], ...] = (
    (r"encoder_embed\.conv1\.(weight|bias)", "encoder_embed.conv.0.{0}"),
    (r"encoder_embed\.conv2\.(weight|bias)", "encoder_embed.conv.4.{0}"),
    (r"encoder_embed\.conv3\.(weight|bias)", "encoder_embed.conv.7.{0}"),
    (r"encoder_embed\.((?:convnext|out|out_norm)\..+)", "encoder_embed.{0}"),
    (r"stacks\.(\d+)\.layers\.(\d+)\." + _LAYER, "encoder.encoders.{0}.{ds}layers.{1}.{2}"),
    (r"stacks\.(\d+)\.downsample_bias", "encoder.encoders.{0}.downsample.bias"),
    (r"stacks\.(\d+)\.out_combiner\.bypass_scale", "encoder.encoders.{0}.out_combiner.bypass_scale"),
    (r"downsample_output\.bias", "encoder.downsample_output.bias"),
    (r"mask_embedding", "mask_emb"),
)

# Icefall -> ours: (regex on the icefall key, our template; None: a known tensor with no counterpart).
INVERSE_RULES: tuple[tuple[str, Optional[str]], ...] = (
    (r"encoder_embed\.conv\.0\.(weight|bias)", "encoder_embed.conv1.{0}"),
    (r"encoder_embed\.conv\.4\.(weight|bias)", "encoder_embed.conv2.{0}"),
    (r"encoder_embed\.conv\.7\.(weight|bias)", "encoder_embed.conv3.{0}"),
    (r"encoder_embed\.((?:convnext|out|out_norm)\..+)", "encoder_embed.{0}"),
    (r"encoder\.encoders\.(\d+)\.(?:encoder\.)?layers\.(\d+)\.bypass_scale", None),  # unused in icefall
    (r"encoder\.encoders\.(\d+)\.(?:encoder\.)?layers\.(\d+)\." + _LAYER, "stacks.{0}.layers.{1}.{2}"),
    (r"encoder\.encoders\.(\d+)\.downsample\.bias", "stacks.{0}.downsample_bias"),
    (r"encoder\.encoders\.(\d+)\.out_combiner\.bypass_scale", "stacks.{0}.out_combiner.bypass_scale"),
    (r"encoder\.downsample_output\.bias", "downsample_output.bias"),
    (r"mask_emb", "mask_embedding"),
)

# Icefall's training-only parts of MultiKDModel: ignored on import, never written.
_HEADS = re.compile(r"(codebook_loss_heads|codebook_loss_net|audio_tagging_proj|ctc_output|decoder|joiner|"
                    r"simple_am_proj|simple_lm_proj)\..+")
_QUERY = re.compile(r"(?:.*\.)?self_attn_weights\.in_proj\.(weight|bias)")


@dataclass
class Conversion:
    """A converted state dict with what the conversion did beyond renaming.

    ``state``: the tensors in the target layout; ``config``: our encoder config (on import);
    ``ignored``: source keys that are not part of the encoder (training heads);
    ``filled``: target keys with no source tensor, written with their initial values;
    ``notes``: values that this project's forward pass treats differently from icefall's
    evaluation forward (e.g. a bypass scale outside [0.2, 1], which this code clamps).
    """

    state: dict[str, torch.Tensor]
    config: Optional[ZipformerConfig] = None
    ignored: list[str] = field(default_factory=list)
    filled: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _rescale_query(name: str, t: torch.Tensor, num_heads: int, query_head_dim: int, power: float) -> torch.Tensor:
    """``t`` with its first ``num_heads * query_head_dim`` rows times ``query_head_dim ** power``."""
    rows = num_heads * query_head_dim
    if t.shape[0] < rows:
        raise ValueError(f"{name}: {t.shape[0]} rows, fewer than num_heads * query_head_dim = {rows}")
    out = t.detach().to(torch.float64).clone()
    out[:rows] *= query_head_dim ** power
    return out.to(t.dtype)


def _layer_heads(config: ZipformerConfig, key: str) -> int:
    return config.num_heads[int(key.split(".")[1])]


def icefall_key(our_key: str, config: ZipformerConfig) -> str:
    """The icefall name of our tensor ``our_key`` (raises ValueError for a key no rule maps).

    >>> from spear.models.student.encoder import encoder_config
    >>> icefall_key("stacks.1.layers.0.norm.bias", encoder_config("zipformer2", "spear-base"))
    'encoder.encoders.1.encoder.layers.0.norm.bias'
    """
    for pattern, template in KEY_RULES:
        m = re.fullmatch(pattern, our_key)
        if m:
            ds = ""
            if "{ds}" in template:
                ds = "encoder." if config.downsampling_factor[int(m.group(1))] > 1 else ""
            return template.format(*m.groups(), ds=ds)
    raise ValueError(f"no icefall name for tensor {our_key!r} (not a Zipformer2 encoder key)")


def our_key(theirs: str) -> Optional[str]:
    """Our name of icefall's tensor ``theirs``; None for a known tensor we do not keep (the unused
    per-layer ``bypass_scale``); raises ValueError for a key no rule maps.

    >>> our_key("encoder_embed.conv.7.weight"), our_key("encoder.encoders.3.encoder.layers.2.bypass_scale")
    ('encoder_embed.conv3.weight', None)
    """
    for pattern, template in INVERSE_RULES:
        m = re.fullmatch(pattern, theirs)
        if m:
            return None if template is None else template.format(*m.groups())
    raise ValueError(f"unknown tensor {theirs!r} in the icefall checkpoint (not a SPEAR Zipformer2 key)")


def to_icefall(state: Mapping[str, torch.Tensor], config: ZipformerConfig, prefix: str = "") -> dict[str, torch.Tensor]:
    """Our Zipformer2 ``state`` (built from ``config``) in icefall's ``MultiKDModel`` layout,
    every key under ``prefix`` (``""`` for the icefall ``.pt``, :data:`HF_PREFIX` for the release).

    Includes icefall's unused per-layer ``bypass_scale`` (0.5) and, at 50 Hz, its one-element
    ``downsample_output.bias`` (0), so ``load_state_dict(strict=True)`` of icefall's encoder
    finds every key. See :func:`to_icefall_conversion` for the list of what was filled.
    """
    return to_icefall_conversion(state, config, prefix).state


def to_icefall_conversion(state: Mapping[str, torch.Tensor], config: ZipformerConfig, prefix: str = "") -> Conversion:
    """:func:`to_icefall` with the list of filled keys."""
    out: dict[str, torch.Tensor] = {}
    for k, v in state.items():
        name = icefall_key(k, config)
        if _QUERY.fullmatch(k):
            v = _rescale_query(k, v, _layer_heads(config, k), config.query_head_dim, -0.5)
        out[prefix + name] = v
    filled = []
    ref = next(iter(state.values()))
    for i, (ds, n) in enumerate(zip(config.downsampling_factor, config.num_layers)):
        inner = "encoder." if ds > 1 else ""
        for j in range(n):
            key = f"{prefix}encoder.encoders.{i}.{inner}layers.{j}.bypass_scale"
            out[key] = torch.full((config.encoder_dim[i],), 0.5, dtype=ref.dtype, device=ref.device)
            filled.append(key)
    if config.output_downsampling_factor == 1:
        key = f"{prefix}encoder.downsample_output.bias"
        out[key] = torch.zeros(1, dtype=ref.dtype, device=ref.device)
        filled.append(key)
    return Conversion(out, config, filled=filled)


def find_prefix(state: Mapping[str, Any]) -> str:
    """The prefix under which an icefall-layout encoder sits in ``state`` (``""``, ``"model.model."``,
    ...): the part before ``encoder_embed.conv.0.weight``. Raises ValueError when there is none.

    >>> find_prefix({"model.model.encoder_embed.conv.0.weight": 0}), find_prefix({"encoder_embed.conv.0.weight": 0})
    ('model.model.', '')
    """
    anchor = "encoder_embed.conv.0.weight"
    found = sorted(k[: -len(anchor)] for k in state if k.endswith(anchor))
    if not found:
        raise ValueError("not a SPEAR / icefall Zipformer2 checkpoint: no encoder_embed.conv.0.weight tensor")
    if len(found) > 1:
        raise ValueError(f"several Zipformer2 encoders in one checkpoint (prefixes {found}); expected one")
    return found[0]


def _ints(value: Any) -> tuple[int, ...]:
    """``"1,2,4"``, ``[1, 2, 4]`` or ``4`` as a tuple of ints."""
    if isinstance(value, str):
        return tuple(int(v) for v in value.split(",") if v.strip())
    if isinstance(value, (list, tuple)):
        return tuple(int(v) for v in value)
    return (int(value),)


def infer_config(state: Mapping[str, torch.Tensor], hints: Optional[Mapping[str, Any]] = None,
                 num_mel_bins: Optional[int] = None) -> ZipformerConfig:
    """Our :class:`ZipformerConfig` for an icefall-layout encoder ``state`` (no prefix).

    Stacks, layers, dims, kernels, subsampling channels, positional dim and the output downsampling
    are read from the tensor shapes. ``num_heads`` and the head dims are not all determined by
    shapes: ``hints`` (icefall / ``SpearConfig`` argument names, comma strings or lists) give them;
    otherwise the SPEAR head dims (:data:`DEFAULT_HEAD_DIMS`) are assumed and ``num_heads`` follows
    from ``linear_pos``; every choice is checked against the shapes (ValueError when they disagree).
    ``num_mel_bins`` (or ``hints["num_mel_bins"]`` / ``["feature_dim"]``; default 128) must agree
    with the subsampling's output width.
    """
    hints = dict(hints or {})
    stacks: dict[int, int] = {}
    ds: dict[int, int] = {}
    for k in state:
        m = re.fullmatch(r"encoder\.encoders\.(\d+)\.(encoder\.)?layers\.(\d+)\.norm\.bias", k)
        if m:
            i = int(m.group(1))
            stacks[i] = max(stacks.get(i, 0), int(m.group(3)) + 1)
        m = re.fullmatch(r"encoder\.encoders\.(\d+)\.downsample\.bias", k)
        if m:
            ds[int(m.group(1))] = int(state[k].shape[0])
    if not stacks or sorted(stacks) != list(range(len(stacks))):
        raise ValueError(f"icefall checkpoint: encoder stacks {sorted(stacks)} are not 0..N-1")
    n = len(stacks)

    def layer(i: int, name: str) -> torch.Tensor:
        inner = "encoder." if ds.get(i, 1) > 1 else ""
        return state[f"encoder.encoders.{i}.{inner}layers.0.{name}"]

    dims = tuple(int(layer(i, "norm.bias").shape[0]) for i in range(n))
    ffn = tuple(int(layer(i, "feed_forward2.in_proj.weight").shape[0]) for i in range(n))
    kernels = tuple(int(layer(i, "conv_module1.depthwise_conv.weight").shape[-1]) for i in range(n))
    pos_dim = int(layer(0, "self_attn_weights.linear_pos.weight").shape[1])
    head_dims = {k: _ints(hints.get(k, v))[0] for k, v in DEFAULT_HEAD_DIMS.items()}
    if "num_heads" in hints:
        heads = _ints(hints["num_heads"])
        heads = heads * n if len(heads) == 1 else heads
    else:
        heads = tuple(int(layer(i, "self_attn_weights.linear_pos.weight").shape[0]) // head_dims["pos_head_dim"]
                      for i in range(n))
    dq, dv, dp = head_dims["query_head_dim"], head_dims["value_head_dim"], head_dims["pos_head_dim"]
    for i in range(n):
        h = heads[i]
        got = (layer(i, "self_attn_weights.in_proj.weight").shape[0], layer(i, "self_attn1.in_proj.weight").shape[0],
               layer(i, "self_attn_weights.linear_pos.weight").shape[0])
        want = ((2 * dq + dp) * h, dv * h, dp * h)
        if tuple(got) != want:
            raise ValueError(f"icefall checkpoint stack {i}: attention projections of sizes {tuple(got)} do not fit "
                             f"num_heads={h}, query/value/pos head dims {dq}/{dv}/{dp} (give them as hints)")
    emb = "encoder_embed."
    channels = (int(state[emb + "conv.0.weight"].shape[0]), int(state[emb + "conv.4.weight"].shape[0]),
                int(state[emb + "conv.7.weight"].shape[0]))
    mel = int(num_mel_bins or hints.get("num_mel_bins") or hints.get("feature_dim") or DEFAULT_MEL_BINS)
    width = int(state[emb + "out.weight"].shape[1]) // channels[2]
    if ((mel - 1) // 2 - 1) // 2 != width:
        raise ValueError(f"icefall checkpoint: its subsampling output is {width} frequency bins wide, which "
                         f"{mel} mel bins do not give (set num_mel_bins)")
    out_ds = int(state["encoder.downsample_output.bias"].shape[0]) if "encoder.downsample_output.bias" in state else 1
    if "output_downsampling_factor" in hints and int(hints["output_downsampling_factor"]) != out_ds:
        raise ValueError(f"config says output_downsampling_factor={hints['output_downsampling_factor']}, "
                         f"the weights have {out_ds}")
    return ZipformerConfig(num_mel_bins=mel, downsampling_factor=tuple(ds.get(i, 1) for i in range(n)),
                           num_layers=tuple(stacks[i] for i in range(n)), encoder_dim=dims, feedforward_dim=ffn,
                           num_heads=heads, cnn_module_kernel=kernels, pos_dim=pos_dim, subsampling_channels=channels,
                           output_downsampling_factor=out_ds, **head_dims)


def from_icefall(state: Mapping[str, torch.Tensor], config: Optional[ZipformerConfig] = None,
                 hints: Optional[Mapping[str, Any]] = None, num_mel_bins: Optional[int] = None) -> Conversion:
    """An icefall-layout SPEAR model (``MultiKDModel`` keys, any prefix such as :data:`HF_PREFIX`)
    as our Zipformer2: the config (``config``, or inferred by :func:`infer_config`) and the state
    dict that ``Zipformer2(config).load_state_dict(strict=True)`` takes.

    Raises ValueError for a tensor that is neither an encoder tensor nor a known training head.
    """
    prefix = find_prefix(state)
    inner: dict[str, torch.Tensor] = {}
    ignored: list[str] = []
    for k, v in state.items():
        if not k.startswith(prefix):
            ignored.append(k)
            continue
        name = k[len(prefix):]
        if _HEADS.fullmatch(name):
            ignored.append(k)
        else:
            inner[name] = v
    if config is None:
        config = infer_config(inner, hints, num_mel_bins)
    out: dict[str, torch.Tensor] = {}
    for k, v in inner.items():
        name = our_key(k)
        if name is None:
            continue
        if name == "downsample_output.bias" and config.output_downsampling_factor == 1:
            if v.numel() != 1:
                raise ValueError(f"{k} has {v.numel()} weights but the config has no output downsampling")
            continue  # a softmax over one frame: the identity
        if _QUERY.fullmatch(name):
            v = _rescale_query(k, v, _layer_heads(config, name), config.query_head_dim, 0.5)
        out[name] = v
    filled = []
    if "mask_embedding" not in out and out:  # an encoder-only file: the training mask is not used by inference
        ref = next(iter(out.values()))
        out["mask_embedding"] = torch.zeros(config.num_mel_bins, dtype=ref.dtype, device=ref.device)
        filled.append("mask_embedding")
    return Conversion(out, config, ignored=sorted(ignored), filled=filled, notes=forward_notes(out))


def forward_notes(state: Mapping[str, torch.Tensor]) -> list[str]:
    """Weights whose values this project's forward pass treats unlike icefall's eval forward:
    bypass scales outside [0.2, 1] and BiasNorm log-scales outside [-1.5, 1.5] (clamped here,
    used as they are by icefall at evaluation). Empty for a model trained within those bounds."""
    notes = []
    for k, v in state.items():
        if v.is_meta:  # shapes only: nothing to check
            continue
        if k.endswith("bypass_scale") and v.numel() and (v.min() < 0.2 or v.max() > 1.0):
            notes.append(f"{k}: values in [{v.min().item():.3f}, {v.max().item():.3f}] are clamped to [0.2, 1] here")
        if k.endswith("log_scale") and v.numel() and v.abs().max() > 1.5:
            notes.append(f"{k}: {v.item():.3f} is clamped to [-1.5, 1.5] here")
    return notes


def hf_config(config: ZipformerConfig) -> dict[str, Any]:
    """The ``config.json`` of the transformers-style release for ``config`` (``SpearConfig`` fields,
    per-stack values as comma strings as the authors write them, plus the head dims, which their
    config does not hold and their model fixes to the same values).

    >>> from spear.models.student.encoder import encoder_config
    >>> hf_config(encoder_config("zipformer2", "spear-large"))["num_encoder_layers"]
    '1,2,2,3,1,1,1'
    """
    def csv(values: tuple[int, ...]) -> str:
        return ",".join(str(v) for v in values)

    return {
        "model_type": "spear", "architectures": ["SpearModel"],
        "num_mel_bins": config.num_mel_bins, "pos_dim": config.pos_dim,
        "output_downsampling_factor": config.output_downsampling_factor,
        "downsampling_factor": csv(config.downsampling_factor), "num_encoder_layers": csv(config.num_layers),
        "feedforward_dim": csv(config.feedforward_dim), "encoder_dim": csv(config.encoder_dim),
        # per-frame feature-mask dropout in icefall's training only: no effect on the forward pass
        "encoder_unmasked_dim": csv(tuple(min(d, max(config.encoder_dim) // 2) for d in config.encoder_dim)),
        "cnn_module_kernel": csv(config.cnn_module_kernel), "num_heads": csv(config.num_heads),
        "query_head_dim": config.query_head_dim, "value_head_dim": config.value_head_dim,
        "pos_head_dim": config.pos_head_dim, "causal": False,
    }


def config_from_hf(data: Mapping[str, Any]) -> dict[str, Any]:
    """The hints :func:`infer_config` takes from a release's ``config.json`` (``SpearConfig`` or
    icefall argument names). A causal (streaming) model is refused: this code has no chunked attention.
    """
    if data.get("causal"):
        raise ValueError("a causal (streaming) SPEAR model cannot be loaded: this Zipformer2 has no chunked mode")
    keys = ("num_mel_bins", "feature_dim", "num_heads", "output_downsampling_factor", *DEFAULT_HEAD_DIMS)
    return {k: data[k] for k in keys if data.get(k) is not None}


def check_matches(config: ZipformerConfig, data: Mapping[str, Any]) -> None:
    """Raise ValueError when a release's ``config.json`` disagrees with the config read from its weights."""
    pairs = {"downsampling_factor": config.downsampling_factor, "num_encoder_layers": config.num_layers,
             "encoder_dim": config.encoder_dim, "feedforward_dim": config.feedforward_dim,
             "cnn_module_kernel": config.cnn_module_kernel, "num_heads": config.num_heads}
    n = len(config.downsampling_factor)
    for name, have in pairs.items():
        if data.get(name) is None:
            continue
        want = _ints(data[name])
        want = want * n if len(want) == 1 else want
        if tuple(want) != tuple(have):
            raise ValueError(f"config.json {name}={data[name]!r} disagrees with the weights ({have})")

