"""A training checkpoint folder (pre-training and post-training), ``OUTPUT/train/checkpoint_<time>/``:

- ``model.pt``: the objective's state dict (``torch.save``; loaded with ``weights_only=True``);
- ``optim.pt``: ``{"optimizer", "scheduler", "kind"}`` state dicts;
- ``metrics.csv``: every step so far (:mod:`spear.schemas.train_metrics`);
- ``train_state.json``: ``step``, ``world_sizes``, every rank's data position (``data_states``) and random
  streams (``random_states``), and ``files``: the byte size of each file above. It is written last.

Ray Train uploads a checkpoint's files in no set order, so a driver stopped during an upload can leave a
folder with some files missing or cut short. A checkpoint is complete when its state file parses and
every file it lists has the size it records; checkpoints written before ``files`` existed count as
complete once their state file parses.
"""

from __future__ import annotations

import json
from typing import Any, Mapping, Optional

STATE_FILE = "train_state.json"
MODEL_FILE = "model.pt"
OPTIM_FILE = "optim.pt"
#: The state file's key holding the byte size of every other file of the checkpoint.
FILE_SIZES_KEY = "files"


def incomplete_reason(state_text: Optional[str], sizes: Mapping[str, int]) -> Optional[str]:
    """Why the checkpoint whose state file reads ``state_text`` (None: absent) and whose folder holds files
    of ``sizes`` (name -> bytes) is not complete, in a few words; None when it is complete.

    >>> incomplete_reason('{"step": 4, "files": {"model.pt": 10}}', {"model.pt": 10, "train_state.json": 40})
    >>> incomplete_reason('{"step": 4, "files": {"model.pt": 10}}', {"model.pt": 3})
    'model.pt has 3 of its 10 bytes'
    >>> incomplete_reason('{"step": 4, "files": {"model.pt": 10, "optim.pt": 5}}', {"model.pt": 10})
    'optim.pt is missing'
    >>> incomplete_reason('{"step": ', {})
    'train_state.json cannot be read (Expecting value: line 1 column 10 (char 9))'
    >>> incomplete_reason(None, {"model.pt": 10})
    'train_state.json is missing'
    """
    if state_text is None or not state_text.strip():
        return f"{STATE_FILE} is missing"
    try:
        state = parse_state(state_text)
    except ValueError as exc:
        return f"{STATE_FILE} cannot be read ({str(exc).splitlines()[0]})"
    for name, size in sorted(state.get(FILE_SIZES_KEY, {}).items()):
        if name not in sizes:
            return f"{name} is missing"
        if sizes[name] != size:
            return f"{name} has {sizes[name]} of its {size} bytes"
    return None


def parse_state(text: str) -> dict[str, Any]:
    """A state file's content; ValueError when it is not a JSON object with an integer ``step``.

    >>> parse_state('{"step": 3}')["step"]
    3
    """
    state = json.loads(text)
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise ValueError(f"{STATE_FILE} has no integer step")
    return state
