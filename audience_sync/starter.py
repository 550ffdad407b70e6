"""``audience-sync init``: a starter project written from templates that ship in the package.

The templates (``audience_sync/templates/``) are package data, so a ``pip install`` user has
them. The written config runs as is: JSONL destination, SQLite state, one sample audience.
"""

from __future__ import annotations

import importlib.resources
from pathlib import Path

__all__ = ["STARTER_FILES", "existing", "write_starter"]

#: Template (under ``audience_sync/templates``) -> where it goes in the project folder.
STARTER_FILES: dict[str, str] = {
    "audience-sync.toml": "config/audience-sync.toml",
    "snapshots/newsletter_subscribers.csv": "config/snapshots/newsletter_subscribers.csv",
    "gitignore": ".gitignore",  # a dotfile is easy to lose from package data: renamed here
}


def existing(folder: Path) -> list[Path]:
    """The starter files that already exist in ``folder``."""
    return [folder / target for target in STARTER_FILES.values() if (folder / target).exists()]


def write_starter(folder: Path) -> list[Path]:
    """Write the starter files into ``folder`` (overwriting); returns the paths written."""
    templates = importlib.resources.files("audience_sync") / "templates"
    written = []
    for template, target in STARTER_FILES.items():
        path = folder / target
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(templates.joinpath(template).read_bytes())
        written.append(path)
    return written
