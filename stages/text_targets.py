"""Semantic targets: one sentence embedding per distinct target text, cached beside the prepared data.

A semantic attribute (``kind: semantic``) aligns each utterance's embedding with the embedding of its
target text: the manifest's ``pivot`` (a translation into one pivot language, so that translations of a
sentence share one target) or, without it, its ``text`` (:func:`target_texts`; ``target_field: text``
uses the transcript only). The embedding comes from

- the weight-free pivot embedding (:func:`spear.models.posttrain.pivot_text_embedding`: feature hashing,
  ``attribute.dim`` wide) when ``text_encoder`` is unset;
- a transformers sentence encoder in a local or s3:// folder (``AutoTokenizer`` / ``AutoModel``, read with
  ``local_files_only``: nothing is downloaded), mean-pooled over the attention mask
  (:func:`~spear.models.posttrain.masked_mean`) and L2-normalised; its hidden size fixes the width.

Targets are cached as ``targets-<attr>.npy`` + ``.json`` under the data folder, keyed by each text's
hash and the encoder's identity (:func:`~spear.schemas.posttrain_data.targets_record`): a resumed run,
or a run that adds manifests, embeds only the texts it has not seen with that encoder.

Example::

    from spear.cluster.storage import Storage
    from spear.config import AttributeConfig

    attr = AttributeConfig(name="semantic", kind="semantic", dim=256)
    targets = build_text_targets(["good day", "hello there"], attr, 1, "out/posttrain/data", Storage())
    targets.vectors.shape          # (2, 256)
    targets.lookup(["hello there", None]).tolist()   # [1, -1]
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional, Sequence

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F

from spear.cluster.console import console_log
from spear.cluster.storage import Storage, StorageError, join_uri, normalize_uri, relative_uri, split_uri
from spear.config import ConfigError
from spear.models.posttrain import masked_mean, pivot_text_embedding
from spear.schemas.posttrain_data import parse_targets_record, targets_files, targets_record, text_key
from spear.schemas.versioning import FormatError

#: Texts per forward pass of a transformers encoder.
ENCODE_BATCH = 32

#: The longest input a transformers encoder gets (tokens; less when its position table is shorter).
MAX_TOKENS = 512


@dataclass(frozen=True)
class TextTargets:
    """The target embeddings of one semantic attribute: ``vectors[i]`` (unit norm, float32) is the target of
    ``texts[i]`` (distinct, sorted); ``encoder`` names what embedded them; ``cached``: how many came from the
    cache."""

    texts: list[str]
    vectors: np.ndarray
    encoder: str
    cached: int = 0

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])

    def lookup(self, texts: Iterable[Optional[str]]) -> np.ndarray:
        """Row of each text in :attr:`vectors` (int64; -1 for None). KeyError names a text without a target."""
        index = {t: i for i, t in enumerate(self.texts)}
        out = []
        for t in texts:
            if t is None:
                out.append(-1)
            elif t in index:
                out.append(index[t])
            else:
                raise KeyError(f"no semantic target for text {t!r}")
        return np.asarray(out, dtype=np.int64)


def target_texts(table: pa.Table, target_field: str = "pivot") -> list[Optional[str]]:
    """Each prepared row's target text: ``pivot``, else ``text`` (``target_field="pivot"``), or ``text`` only
    (``"text"``); None where the row has none (it does not train the semantic attribute).

    >>> target_texts(pa.table({"pivot": ["hi", None, None], "text": ["hallo", "bye", None]}))
    ['hi', 'bye', None]
    """
    texts = table["text"].to_pylist()
    if target_field == "text":
        return texts
    if target_field != "pivot":
        raise ValueError(f"target_field must be pivot or text, got {target_field!r}")
    return [p if p is not None else t for p, t in zip(table["pivot"].to_pylist(), texts)]


# --------------------------------------------------------------------------- transformers encoders


class SentenceEncoder:
    """A transformers encoder read from a local folder: ``encode(texts)`` -> [N, hidden] unit vectors
    (mean pooling over the attention mask). Raises ValueError when the folder is not a transformers model."""

    def __init__(self, folder: str):
        # transformers is optional and slow to import: only a configured text encoder loads it.
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
            self.model = AutoModel.from_pretrained(folder, local_files_only=True).eval()
        except Exception as exc:  # transformers raises OSError, ValueError, KeyError ... for a foreign folder
            raise ValueError(f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}") from None
        positions = getattr(self.model.config, "max_position_embeddings", None) or MAX_TOKENS
        self.max_length = int(min(MAX_TOKENS, positions, getattr(self.tokenizer, "model_max_length", MAX_TOKENS)))

    @property
    def dim(self) -> int:
        return int(self.model.config.hidden_size)

    @torch.inference_mode()
    def encode(self, texts: Sequence[str], batch: int = ENCODE_BATCH) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))   # similar lengths pad little
        for at in range(0, len(order), batch):
            idx = order[at:at + batch]
            enc = self.tokenizer([texts[i] for i in idx], padding=True, truncation=True, max_length=self.max_length,
                                 return_tensors="pt")
            hidden = self.model(**enc).last_hidden_state
            pooled = F.normalize(masked_mean(hidden, enc["attention_mask"]).float(), dim=-1)
            out[idx] = pooled.numpy()
        return out


def _fetch_folder(uri: str, storage: Storage, field_name: str) -> tuple[str, Optional[str], list[tuple[str, int]]]:
    """(local folder, temp folder to remove or None, [(file name, size)]) of an encoder folder."""
    try:
        entries = storage.list_files(uri)
    except StorageError:
        raise ConfigError(f"{field_name}: {uri} does not exist (a folder of a transformers sentence encoder)") from None
    files = [(relative_uri(uri, e.uri), e) for e in entries]
    files = [(name, e) for name, e in files if name is not None]
    if not files:
        raise ConfigError(f"{field_name}: {uri} is not a folder of a transformers sentence encoder")
    listing = sorted((name, int(e.size)) for name, e in files)
    if split_uri(uri)[0] == "file":
        return split_uri(uri)[1], None, listing
    tmp = tempfile.mkdtemp(prefix="spear-text-encoder-")
    for name, e in files:
        local = os.path.join(tmp, *name.split("/"))
        os.makedirs(os.path.dirname(local), exist_ok=True)
        with open(local, "wb") as f:
            f.write(storage.read_bytes(e.uri))
    return tmp, tmp, listing


def load_text_encoder(uri: str, storage: Storage, field_name: str) -> tuple[SentenceEncoder, str]:
    """The encoder in folder ``uri`` (local, ``~``, relative or s3://) and its identity (a hash of its
    ``config.json`` and its files' names and sizes). ConfigError naming ``field_name`` (such as
    ``posttrain.attributes[1].text_encoder``) for a missing folder or one that is not a transformers model."""
    try:
        uri = normalize_uri(uri)
    except StorageError as exc:
        raise ConfigError(f"{field_name}: {exc}") from None
    folder, tmp, listing = _fetch_folder(uri, storage, field_name)
    try:
        config_path = os.path.join(folder, "config.json")
        if not os.path.isfile(config_path):
            raise ConfigError(f"{field_name}: {uri} is not a transformers model folder (no config.json)")
        try:
            encoder = SentenceEncoder(folder)
        except ValueError as exc:
            raise ConfigError(f"{field_name}: {uri} is not a transformers model folder ({exc})") from None
        with open(config_path, "rb") as f:
            h = hashlib.sha256(f.read())
        h.update(json.dumps(listing).encode())
        identity = f"transformers:{h.hexdigest()[:16]}:mean"
        return encoder, identity
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


# --------------------------------------------------------------------------- the cached targets


def _read_cache(data_uri: str, name: str, storage: Storage) -> Optional[tuple[dict[str, Any], np.ndarray]]:
    npy_name, json_name = targets_files(name)
    rec_uri, npy_uri = join_uri(data_uri, json_name), join_uri(data_uri, npy_name)
    try:
        rec = parse_targets_record(storage.read_text(rec_uri), rec_uri)
        vectors = np.load(io.BytesIO(storage.read_bytes(npy_uri)), allow_pickle=False)
    except (FileNotFoundError, FormatError, StorageError, ValueError, OSError):
        return None   # none yet, or unreadable: embedded again
    if vectors.ndim != 2 or vectors.shape[0] != len(rec["keys"]):
        return None
    return rec, vectors


def build_text_targets(texts: Iterable[Optional[str]], attribute: Any, attribute_index: int, data_uri: str,
                       storage: Storage, *, progress: bool | Callable[[str], None] = False) -> TextTargets:
    """The targets of semantic ``attribute`` (an :class:`~spear.config.AttributeConfig`, the
    ``attribute_index``-th of ``posttrain.attributes``) for the distinct non-null ``texts``, read from the
    cache under ``data_uri`` where it holds them for the same encoder, the rest embedded and the cache
    rewritten. ConfigError (naming ``posttrain.attributes[i].text_encoder``) for an unusable encoder folder;
    ValueError naming a text the weight-free embedding cannot embed (no word in it)."""
    say = console_log(progress)
    distinct = sorted({t for t in texts if t is not None})
    field_name = f"posttrain.attributes[{attribute_index}].text_encoder"
    encoder: Optional[SentenceEncoder] = None
    if attribute.text_encoder:
        encoder, identity = load_text_encoder(attribute.text_encoder, storage, field_name)
    else:
        identity = f"pivot-hash:{int(attribute.dim)}"
    data_uri = normalize_uri(data_uri)
    cache = _read_cache(data_uri, attribute.name, storage)
    known: dict[str, np.ndarray] = {}
    if cache is not None and cache[0]["encoder"] == identity:
        known = {k: cache[1][i] for i, k in enumerate(cache[0]["keys"])}
    keys = [text_key(t) for t in distinct]
    todo = [t for t, k in zip(distinct, keys) if k not in known]
    if todo:
        say(f"[posttrain targets] {attribute.name}: embedding {len(todo)} texts with {identity} "
            f"({len(distinct) - len(todo)} cached)")
        if encoder is not None:
            new = encoder.encode(todo)
        else:
            try:
                new = pivot_text_embedding(todo, dim=int(attribute.dim)).numpy()
            except ValueError as exc:
                raise ValueError(f"semantic attribute {attribute.name!r}: {exc}") from None
        known.update({text_key(t): v for t, v in zip(todo, new.astype(np.float32))})
    dim = encoder.dim if encoder is not None else int(attribute.dim)
    vectors = (np.stack([known[k] for k in keys]).astype(np.float32) if keys
               else np.zeros((0, dim), dtype=np.float32))
    if todo or cache is None or cache[0]["keys"] != keys or cache[0]["encoder"] != identity:
        npy_name, json_name = targets_files(attribute.name)
        buf = io.BytesIO()
        np.save(buf, vectors, allow_pickle=False)
        # the old record first, the new one last: a record never names the rows of another .npy
        storage.delete(join_uri(data_uri, json_name))
        storage.write_bytes(join_uri(data_uri, npy_name), buf.getvalue())
        storage.write_text(join_uri(data_uri, json_name),
                           json.dumps(targets_record(identity, dim, distinct), ensure_ascii=False) + "\n")
    return TextTargets(texts=distinct, vectors=vectors, encoder=identity, cached=len(distinct) - len(todo))
