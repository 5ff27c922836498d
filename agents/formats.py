"""The formats of the files a run writes (policy files and checkpoints), and which of them
this version reads: the bottom of the run machinery, imported by :mod:`divo.agents.checkpoints`
(writing and resuming) and :mod:`divo.agents.policy_io` (loading a deployed policy).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from divo.errors import CheckpointError
from divo.files import damaged_file_error

# v2: the file carries the SHA-256 of its contents (divo.files.content_sha256), checked on load
POLICY_FORMAT = "divo-policy-v2"
# written by an older divo, without a checksum: they load, unchecked (`divo convert` adds one)
OLDER_POLICY_FORMATS = ("divo-policy-v1",)

# v2: every RNG state as plain data, so that a checkpoint loads with weights_only=True;
# v3: the file carries the SHA-256 of its contents (divo.files.content_sha256), checked on load
CHECKPOINT_FORMAT = "divo-checkpoint-v3"
# written by an older divo as plain data, without a checksum: they load, unchecked (`divo
# convert` adds one)
OLDER_CHECKPOINT_FORMATS = ("divo-checkpoint-v2",)


def accept_checkpoint(payload: Any, checked: bool, path: Path) -> dict[str, Any]:
    """``payload`` read from ``path`` if it is a checkpoint divo reads: this format with its
    checksum, or an older plain-data format (no checksum to check)."""
    found = payload.get("format") if isinstance(payload, dict) else None
    if found == CHECKPOINT_FORMAT:
        if not checked:
            raise damaged_file_error(
                path, f"a {found} file carries the checksum of its contents, and it has none"
            )
        return payload
    if found in OLDER_CHECKPOINT_FORMATS:
        return payload
    if found == "divo-checkpoint-v1":
        raise CheckpointError(f"{path} is a {found} file; convert it with `divo convert {path}`")
    if isinstance(found, str) and found.startswith("divo-checkpoint"):
        raise CheckpointError(
            f"{path} is a {found} file, which this divo version does not read (it reads "
            f"{CHECKPOINT_FORMAT}); use the divo version that wrote it"
        )
    raise CheckpointError(f"{path} is not a divo checkpoint")
