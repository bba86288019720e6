"""`hone fetch-data`: the Debian-packaged demo corpora, without the rest of Hone's imports."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from hone.cli.common import log as _log
from hone.corpus.sources import fetch_debian_data


def fetch_data(dest: Optional[Path] = typer.Option(None, "--dest",
                                                   help="Where to unpack (default: $HONE_DATA_DIR or "
                                                        "~/.cache/hone/data).")):
    """Download the Debian-packaged demo corpora (Gene Ontology, Jane Austen) and unpack them."""
    _log(f"demo data in {fetch_debian_data(dest)}")
