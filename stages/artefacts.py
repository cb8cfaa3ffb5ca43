"""Model artefacts on storage: checkpoints fetched into a local cache, MVQ codebooks and student
exports written and read (local paths, ``file://`` and ``s3://``).

The models (:mod:`spear.models`) take and return tensors, state dicts and local paths; the
formats (:mod:`spear.schemas.codebooks`, :mod:`spear.schemas.student_export`) turn them into
bytes and back; this module moves the bytes through :class:`~spear.cluster.storage.Storage`.

- :func:`fetch_checkpoint`: a local path is used in place; an ``s3://`` object or prefix is
  copied into a local cache first, once per version. The cache lives in
  ``$SPEAR_CACHE_DIR/teachers`` (default ``~/.cache/spear/teachers``), one folder per
  checkpoint URI; a file is fetched again when its storage ETag changes. Files are streamed to
  a temporary name and renamed, so concurrent actors on one node never read a half-written file.
- :func:`save_quantizer` / :func:`load_quantizer`: the versioned codebook artefact.
- :func:`export_student` / :func:`load_student`: a trained student as safetensors + config.json.
- :func:`export_posttrained` / :func:`load_posttrained`: a post-trained model (``spear posttrain``):
  the student export plus the attribute heads (:mod:`spear.schemas.posttrain_export`).
- :func:`load_spear_release` / :func:`save_spear_release`: the SPEAR authors' released models
  (an icefall ``.pt`` holding ``{"model": state_dict}``, or the transformers-style
  ``model.safetensors`` + ``config.json``) to and from this project's Zipformer2, through the key
  map of :mod:`spear.models.student.convert`; :func:`load_any_student` takes either kind of model;
  :func:`initialise_encoder` copies one into a fresh student (``train.init_from``). Checkpoints
  are read with ``torch.load(weights_only=True)`` or safetensors only: loading never runs code.

Example::

    >>> import tempfile, torch
    >>> from spear.models.student import build_encoder
    >>> from spear.stages.artefacts import export_student, load_student
    >>> d = tempfile.mkdtemp()
    >>> _ = export_student(build_encoder("zipformer2", "tiny", num_mel_bins=80), d, metadata={"step": 1000})
    >>> load_student(d, device="cpu").config["metadata"]
    {'step': 1000}
    >>> local_dir = fetch_checkpoint("s3://models/wavlm-large/", storage)  # doctest: +SKIP
    >>> sorted(p.name for p in local_dir.iterdir())  # doctest: +SKIP
    ['config.json', 'config.json.etag', 'model.safetensors', 'model.safetensors.etag']
"""

from __future__ import annotations

import fnmatch
import hashlib
import io
import json
import os
import uuid
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Union

import torch
from safetensors.torch import load_file
from torch import nn

from spear.cluster.storage import Storage, StorageError, is_remote, join_uri, split_uri
from spear.models.frontend import KaldiFbank
from spear.models.mvq import MultiCodebookQuantizer
from spear.models.student import StudentModel, build_student, export_fields, export_state
from spear.models.student.configs import ZipformerConfig, config_from_dict, config_to_dict
from spear.models.student.convert import (HF, HF_PREFIX, ICEFALL, check_matches, config_from_hf, from_icefall,
                                          hf_config, to_icefall)
from spear.models.student.export import encoder_of
from spear.models.teachers.base import file_sha256
from spear.models.posttrain import AttributeSpec, PostTrainModel
from spear.schemas import codebooks as codebook_format
from spear.schemas import posttrain_export as posttrain_format
from spear.schemas import student_export as student_format
from spear.schemas.tensor_file import save_tensors
from spear.schemas.versioning import parse_json_object

# --------------------------------------------------------------------------- checkpoints


def default_cache_dir() -> Path:
    root = os.environ.get("SPEAR_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "spear")
    return Path(root) / "teachers"


def fetch_checkpoint(path: str, storage: Storage | None = None, cache_dir: str | os.PathLike | None = None,
                     patterns: Iterable[str] = ("*",)) -> Path:
    """Local path of the checkpoint file or directory at ``path`` (local, file:// or s3://).

    For a remote prefix, only files whose name matches one of ``patterns`` are fetched.
    Raises FileNotFoundError when nothing is there, StorageError when storage fails.
    """
    if not is_remote(path):
        local = Path(split_uri(path)[1])
        if not local.exists():
            raise FileNotFoundError(f"checkpoint {path} does not exist")
        return local
    storage = storage or Storage()
    base = path.rstrip("/")
    entries = storage.list_files(base)  # a single object lists itself
    if not entries:
        raise FileNotFoundError(f"checkpoint {path}: nothing stored there")
    single = len(entries) == 1 and entries[0].uri.rstrip("/") == base
    target = Path(cache_dir) if cache_dir else default_cache_dir()
    target = target / hashlib.sha256(base.encode()).hexdigest()[:16]
    pats = tuple(patterns)
    fetched = 0
    for e in entries:
        rel = Path(e.uri).name if single else e.uri[len(base):].lstrip("/")
        if not single and not any(fnmatch.fnmatch(Path(rel).name, p) for p in pats):
            continue
        _fetch_file(storage, e.uri, e.etag, e.size, target / rel)
        fetched += 1
    if not fetched:
        raise FileNotFoundError(f"checkpoint {path}: no file matching {list(pats)}")
    return target / Path(entries[0].uri).name if single else target


def _fetch_file(storage: Storage, uri: str, etag: str, size: int, dest: Path) -> None:
    stamp = dest.with_name(dest.name + ".etag")
    if dest.exists() and stamp.exists() and stamp.read_text() == f"{etag}:{size}" and dest.stat().st_size == size:
        return
    dest.parent.mkdir(parents=True, exist_ok=True)
    fs, rpath = storage.filesystem(uri)
    tmp = dest.with_name(f"{dest.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        fs.get_file(rpath, str(tmp))  # streamed: a multi-GB checkpoint never sits in memory whole
        if tmp.stat().st_size != size:
            raise StorageError(f"fetching {uri}: got {tmp.stat().st_size} bytes, expected {size}")
        os.replace(tmp, dest)
        stamp.write_text(f"{etag}:{size}")
    except StorageError:
        raise
    except Exception as exc:  # noqa: BLE001 - any transport failure becomes a StorageError naming the object
        raise StorageError(f"failed to fetch {uri} into {dest}: {type(exc).__name__}: {exc}") from exc
    finally:
        if tmp.exists():
            tmp.unlink()


# --------------------------------------------------------------------------- MVQ codebooks


def save_quantizer(q: MultiCodebookQuantizer, uri: str, storage: Optional[Storage] = None) -> str:
    """Write ``q`` as a codebook artefact under ``uri``: the tensors, then ``meta.json`` (each object
    atomically; the metadata last marks a complete artefact). Returns :attr:`q.version`."""
    storage = storage or Storage()
    storage.write_bytes(join_uri(uri, codebook_format.TENSORS_NAME),
                        codebook_format.encode_tensors(q.codebooks, q.mean, q.std, q.version))
    storage.write_text(join_uri(uri, codebook_format.META_NAME), codebook_format.encode_meta(q.metadata))
    return q.version


def load_quantizer(uri: str, storage: Optional[Storage] = None,
                   device: Union[str, torch.device, None] = None) -> MultiCodebookQuantizer:
    """Read and verify the codebook artefact at ``uri`` (format, shapes, content hash).

    Raises :class:`~spear.schemas.codebooks.ArtefactError` (a ValueError) when it is missing,
    incomplete, corrupt or of another format version.
    """
    storage = storage or Storage()
    meta_uri, tensors_uri = join_uri(uri, codebook_format.META_NAME), join_uri(uri, codebook_format.TENSORS_NAME)
    try:
        meta = codebook_format.decode_meta(storage.read_text(meta_uri), meta_uri)
    except FileNotFoundError:
        raise codebook_format.ArtefactError(f"no MVQ codebook artefact at {uri}: {codebook_format.META_NAME} "
                                            f"is missing") from None
    try:
        blob = storage.read_bytes(tensors_uri)
    except FileNotFoundError:
        raise codebook_format.ArtefactError(f"incomplete MVQ artefact at {uri}: {codebook_format.TENSORS_NAME} "
                                            f"is missing") from None
    tensors = codebook_format.decode_tensors(blob, meta, tensors_uri)
    q = MultiCodebookQuantizer.from_state(tensors["codebooks"], tensors["mean"], tensors["std"], meta, device=device)
    if q.version != meta.get("version"):  # recomputed from the tensors and fields it now holds
        raise codebook_format.ArtefactError(
            f"MVQ artefact at {uri} fails its content hash: computed {q.version[:16]}..., "
            f"{codebook_format.META_NAME} says {str(meta.get('version'))[:16]}... (modified or mixed objects)")
    return q


# --------------------------------------------------------------------------- student exports


def export_student(model: nn.Module, path: Union[str, Path], metadata: Optional[Mapping[str, Any]] = None,
                   storage: Optional[Storage] = None, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """Write ``model``'s encoder (a ``StudentEncoder``, or e.g. a ``SpearObjective``: its
    ``.encoder``; prediction heads are not exported) to ``path``; returns the config written.

    ``metadata`` (JSON-serialisable: training step, token versions, ...) is stored as is.
    """
    storage = storage or Storage()
    blob, config = student_format.encode_export(export_state(model, dtype), export_fields(model), metadata)
    base = str(path)
    storage.makedirs(base)
    storage.write_bytes(join_uri(base, student_format.WEIGHTS_FILE), blob)
    storage.write_text(join_uri(base, student_format.CONFIG_FILE), student_format.encode_config(config))
    return config


def load_student(path: Union[str, Path], storage: Optional[Storage] = None,
                 device: Optional[Union[str, torch.device]] = None, cache_dir: Optional[str] = None) -> StudentModel:
    """Load an exported student from a local directory or an ``s3://`` prefix (cached locally), on
    ``device`` (default: CUDA if present). Weights are read with ``safetensors`` only.

    Raises FileNotFoundError when the files are missing and ValueError for a directory that
    is not a SPEAR student export (or whose weights do not match the config).
    """
    local = Path(fetch_checkpoint(str(path), storage, cache_dir, patterns=student_format.FILES))
    config, state = student_format.read_export(local, where=str(path))
    try:
        return build_student(config, state, device)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None


# --------------------------------------------------------------------------- the authors' SPEAR releases

#: Files a released SPEAR model may consist of: an icefall ``.pt`` ({"model": state_dict}), or the
#: transformers-style release (``model.safetensors`` + ``config.json``; its Python files are never read).
RELEASE_FILES = ("*.pt", "*.pth", "*.safetensors", "config.json")
#: Where :func:`save_spear_release` puts our encoder config in an icefall ``.pt`` (plain types only,
#: so it loads with ``weights_only=True``; icefall reads only ``"model"``).
ICEFALL_CONFIG_KEY = "spear_encoder_config"
ICEFALL_FILE = "pretrained.pt"
#: The authors' fbank is lhotse's ``Fbank(FbankConfig(num_mel_bins=128))`` (marcoyang1998/icefall's SPEAR
#: inference scripts): its mel band ends 400 Hz below Nyquist, which a converted release keeps.
LHOTSE_HIGH_FREQ = -400.0
#: What a converted release's input features still do not share with the authors' (said in its notes).
FRONTEND_NOTE = ("input features: the mel band is the authors' (lhotse Fbank, 20 Hz to Nyquist - 400 Hz), but "
                 "frames are cut with Kaldi's snip_edges true (lhotse: false, frames 7.5 ms earlier and about 2 more "
                 "per utterance) and log energies floored at 1.2e-7 (lhotse: 1e-10, only digital silence differs)")


def _load_pt(path: Path) -> Any:
    """``torch.load`` that never runs code from the file: ``weights_only=True`` (tensors and plain
    containers only). A pickle holding anything else is refused with ValueError."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - UnpicklingError, RuntimeError...: the file is refused either way
        raise ValueError(
            f"{path}: refused to load: it holds Python objects beyond tensors and plain containers, and "
            f"checkpoints are only read with torch.load(weights_only=True), which never runs code from "
            f"the file ({str(exc).splitlines()[0][:200]}). A full icefall training checkpoint (with "
            f"optimizer, sampler and params) must be exported to {{'model': state_dict}} first "
            f"(icefall's export.py)") from None


def read_spear_release(local: Union[str, Path]) -> dict[str, Any]:
    """The tensors and settings of a released SPEAR model at a local path (no code is executed).

    ``local``: an icefall ``.pt`` file, a ``.safetensors`` file, or a folder holding either (the
    transformers-style release: ``model.safetensors`` and ``config.json``). Returns a dict with
    ``layout`` ("icefall" | "hf"), ``state`` (the tensors as stored), ``hf_config`` (the release's
    config.json or None), ``config`` (our encoder config stored by :func:`save_spear_release`, or
    None) and ``files`` (the weight files read). Raises FileNotFoundError / ValueError.
    """
    local = Path(local)
    if local.is_dir():
        candidates = sorted(local.glob("*.safetensors")) or sorted(list(local.glob("*.pt")) + list(local.glob("*.pth")))
        if len(candidates) != 1:
            raise FileNotFoundError(f"{local}: expected one model.safetensors or one .pt/.pth file, found "
                                    f"{[p.name for p in candidates] or 'none'}")
        weights = candidates[0]
    elif local.exists():
        weights = local
    else:
        raise FileNotFoundError(f"{local} does not exist")
    config_json = weights.parent / "config.json"
    hf_config = None
    if weights.suffix == ".safetensors":
        state, layout = load_file(str(weights)), HF
        if config_json.exists():
            hf_config = parse_json_object(str(config_json), config_json.read_text())
            if hf_config.get("format") == student_format.FORMAT:
                raise ValueError(f"{weights.parent} is a spear student export, not a SPEAR release: use load_student")
        return {"layout": layout, "state": state, "hf_config": hf_config, "config": None, "files": [weights]}
    obj = _load_pt(weights)
    ours = None
    if isinstance(obj, Mapping) and isinstance(obj.get("model"), Mapping):
        if isinstance(obj.get(ICEFALL_CONFIG_KEY), Mapping):
            ours = config_from_dict(obj[ICEFALL_CONFIG_KEY])
        obj = obj["model"]
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{weights}: not a SPEAR / icefall checkpoint (expected {{'model': state_dict}} or a state dict)")
    return {"layout": ICEFALL, "state": dict(obj), "hf_config": None, "config": ours, "files": [weights]}


def spear_release_student(release: Mapping[str, Any], device: Optional[Union[str, torch.device]] = None,
                          num_mel_bins: Optional[int] = None, where: str = "") -> StudentModel:
    """A :class:`StudentModel` from :func:`read_spear_release`'s result: the weights converted to this
    project's Zipformer2 (:mod:`spear.models.student.convert`). Its ``config`` holds the export fields,
    ``weights_sha256`` (of the files read) and ``conversion`` (layout, ignored and filled tensors, notes)."""
    hints = config_from_hf(release["hf_config"]) if release["hf_config"] else None
    try:
        conv = from_icefall(release["state"], config=release["config"], hints=hints, num_mel_bins=num_mel_bins)
        if release["hf_config"]:
            check_matches(conv.config, release["hf_config"])
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None
    notes = conv.notes + [FRONTEND_NOTE]
    config = {"encoder": config_to_dict(conv.config), "weights_sha256": file_sha256(release["files"]),
              "frontend": KaldiFbank(num_mel_bins=conv.config.num_mel_bins, high_freq=LHOTSE_HIGH_FREQ).settings(),
              "conversion": {"layout": release["layout"], "source": where, "ignored": conv.ignored,
                             "filled": conv.filled, "notes": notes},
              "metadata": {"converted_from": where, "layout": release["layout"]}}
    try:
        student = build_student(config, conv.state, device)
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None
    student.config.update({k: v for k, v in export_fields(student).items() if k != "encoder"})
    return student


def load_spear_release(path: Union[str, Path], storage: Optional[Storage] = None,
                       device: Optional[Union[str, torch.device]] = None, cache_dir: Optional[str] = None,
                       num_mel_bins: Optional[int] = None) -> StudentModel:
    """Load a released SPEAR model (the authors' icefall ``.pt`` or transformers-style folder; local or
    ``s3://``, cached locally) as a :class:`StudentModel` of this project's Zipformer2, on ``device``.

    Weights are read with ``torch.load(weights_only=True)`` or safetensors only; the release's
    Python files are never imported. ``num_mel_bins`` (default: the release's config, else 128).

    >>> student = load_spear_release("models/spear-base-speech-audio")  # doctest: +SKIP
    >>> student.frame_rate, student.num_layers  # doctest: +SKIP
    (50.0, 12)
    """
    local = fetch_checkpoint(str(path), storage, cache_dir, patterns=RELEASE_FILES)
    return spear_release_student(read_spear_release(local), device, num_mel_bins, where=str(path))


def is_student_export(local: Union[str, Path]) -> bool:
    """Whether a local folder is a spear student export (config.json with this project's format)."""
    cfg = Path(local) / student_format.CONFIG_FILE
    if not cfg.is_file():
        return False
    try:
        return json.loads(cfg.read_text()).get("format") == student_format.FORMAT
    except ValueError:
        return False


def load_any_student(path: Union[str, Path], storage: Optional[Storage] = None,
                     device: Optional[Union[str, torch.device]] = None, cache_dir: Optional[str] = None,
                     num_mel_bins: Optional[int] = None) -> StudentModel:
    """A spear student export (:func:`load_student`) or a released SPEAR model
    (:func:`load_spear_release`), whichever ``path`` holds."""
    local = fetch_checkpoint(str(path), storage, cache_dir, patterns=RELEASE_FILES)
    if local.is_dir() and is_student_export(local):
        return load_student(local, device=device)
    return spear_release_student(read_spear_release(local), device, num_mel_bins, where=str(path))


def save_spear_release(model: nn.Module, dest: Union[str, Path], layout: str = "icefall",
                       storage: Optional[Storage] = None) -> list[str]:
    """Write a Zipformer2 student (a StudentEncoder, a StudentModel or a module with ``.encoder``) in
    the authors' layout; returns the URIs written.

    ``layout="icefall"``: ``dest`` is the ``.pt`` file (a folder: ``dest/pretrained.pt``), holding
    ``{"model": state_dict}`` in ``MultiKDModel`` names plus our config under
    :data:`ICEFALL_CONFIG_KEY` (plain types). ``layout="hf"``: ``dest`` is a folder with
    ``model.safetensors`` (keys under ``model.model.``) and ``config.json`` (``SpearConfig`` fields);
    the authors' modeling files are not written: copy them from their release to load it with
    transformers.
    """
    enc = encoder_of(model)
    if not isinstance(enc.config, ZipformerConfig):
        raise ValueError(f"only Zipformer2 students have the authors' layout, not {enc.config.architecture}")
    storage = storage or Storage()
    state = export_state(enc)
    base = str(dest)
    if layout == ICEFALL:
        if base.endswith("/") or storage.isdir(base) or not Path(base).suffix:
            base = join_uri(base, ICEFALL_FILE)
        buf = io.BytesIO()
        torch.save({"model": to_icefall(state, enc.config), ICEFALL_CONFIG_KEY: config_to_dict(enc.config)}, buf)
        storage.write_bytes(base, buf.getvalue())
        return [base]
    if layout == HF:
        storage.makedirs(base)
        tensors = {k: v.contiguous() for k, v in to_icefall(state, enc.config, prefix=HF_PREFIX).items()}
        weights, cfg = join_uri(base, "model.safetensors"), join_uri(base, "config.json")
        storage.write_bytes(weights, save_tensors(tensors, metadata={"format": "pt"}))
        storage.write_text(cfg, json.dumps(hf_config(enc.config), indent=2) + "\n")
        return [weights, cfg]
    raise ValueError(f"unknown layout {layout!r}: use {ICEFALL} or {HF}")


def initialise_encoder(encoder: nn.Module, path: Union[str, Path], storage: Optional[Storage] = None,
                       cache_dir: Optional[str] = None) -> dict[str, Any]:
    """Copy the encoder weights of a released SPEAR model or a spear export at ``path`` into
    ``encoder`` (a freshly built student encoder); returns what was loaded (source, layout, hash).

    The architecture must be the same (every config field but dropout): a ValueError names the
    fields that differ.
    """
    student = load_any_student(path, storage, device="cpu", cache_dir=cache_dir,
                               num_mel_bins=getattr(encoder.config, "num_mel_bins", None))
    have, want = config_to_dict(student.encoder.config), config_to_dict(encoder.config)
    have.pop("dropout", None), want.pop("dropout", None)
    diff = sorted(k for k in set(have) | set(want) if have.get(k) != want.get(k))
    if diff:
        raise ValueError(f"init_from {path}: its encoder differs from train.student in "
                         + ", ".join(f"{k} ({have.get(k)} there, {want.get(k)} here)" for k in diff))
    encoder.load_state_dict(student.encoder.state_dict(), strict=True)
    return {"init_from": str(path), "weights_sha256": student.config.get("weights_sha256"),
            "layout": student.config.get("conversion", {}).get("layout", "spear")}


# --------------------------------------------------------------------------- post-trained models


def export_posttrained(model: PostTrainModel, path: Union[str, Path], metadata: Optional[Mapping[str, Any]] = None,
                       storage: Optional[Storage] = None) -> dict[str, Any]:
    """Write a :class:`~spear.models.posttrain.PostTrainModel` to ``path``: its encoder as a student
    export (``model.safetensors`` + ``config.json``), then the heads (``posttrain.safetensors``) and
    ``posttrain.json`` (attributes, freezing, ``metadata``) last. Returns ``posttrain.json``'s object.

    >>> import tempfile, torch
    >>> from spear.models.posttrain import AttributeSpec, PostTrainModel
    >>> from spear.models.student import build_encoder, build_student, export_fields, export_state
    >>> enc = build_encoder("zipformer2", "tiny", num_mel_bins=80)
    >>> model = PostTrainModel(build_student(export_fields(enc), export_state(enc), device="cpu"),
    ...                        [AttributeSpec("spk", "speaker", dim=8, num_classes=3)])
    >>> d = tempfile.mkdtemp()
    >>> _ = export_posttrained(model, d, metadata={"speakers": ["a", "b", "c"]})
    >>> loaded = load_posttrained(d, device="cpu")
    >>> list(loaded.attributes), is_posttrained_export(d)
    (['spk'], True)
    """
    storage = storage or Storage()
    student_meta = {"posttrained": True, **dict(metadata or {})}
    export_student(model.student, path, metadata=student_meta, storage=storage)
    blob, config = posttrain_format.encode_heads(model.heads_state_dict(), model.config(), metadata)
    base = str(path)
    storage.write_bytes(join_uri(base, posttrain_format.HEADS_FILE), blob)
    storage.write_text(join_uri(base, posttrain_format.CONFIG_FILE), posttrain_format.encode_config(config))
    return config


def is_posttrained_export(local: Union[str, Path]) -> bool:
    """Whether a local folder holds a post-trained export (:func:`export_posttrained`)."""
    return posttrain_format.is_posttrained(Path(local))


def load_posttrained(path: Union[str, Path], storage: Optional[Storage] = None,
                     device: Optional[Union[str, torch.device]] = None,
                     cache_dir: Optional[str] = None) -> PostTrainModel:
    """Load a post-trained export from a local folder or an ``s3://`` prefix (cached locally), in eval
    mode on ``device`` (default: CUDA if present). Safetensors only: nothing executes from the files.
    ``model.posttrain_info`` holds ``posttrain.json`` (its ``metadata``: speakers, target info, input model).

    Raises FileNotFoundError when files are missing and ValueError for a folder that is not a
    post-trained export (a plain student export names :func:`load_student`) or whose weights do not fit.
    """
    local = Path(fetch_checkpoint(str(path), storage, cache_dir, patterns=posttrain_format.FILES))
    if not local.is_dir() or not (local / posttrain_format.CONFIG_FILE).is_file():
        hint = " (a student export: load it with load_student)" if local.is_dir() and is_student_export(local) else ""
        raise FileNotFoundError(f"{path}: no post-trained export there: {posttrain_format.CONFIG_FILE} is missing{hint}")
    config, heads = posttrain_format.read_heads(local, where=str(path))
    student = load_student(local, device=device)
    m = config["model"]
    try:
        specs = [AttributeSpec.from_dict(a) for a in m["attributes"]]
        model = PostTrainModel(student, specs, freeze=m.get("freeze", "frozen"),
                               trainable_layers=int(m.get("trainable_layers", 0)),
                               input_layer=bool(m.get("input_layer", False)))
        model.to(next(student.parameters()).device)
        model.load_heads_state_dict({k: v.to(next(student.parameters()).device) for k, v in heads.items()})
    except (ValueError, TypeError, KeyError, RuntimeError) as exc:
        raise ValueError(f"{path}: {posttrain_format.CONFIG_FILE} does not fit its weights: {exc}") from None
    model.posttrain_info = config
    return model.eval()
