"""The folder this copy of docmix lives in: the repository's own files (gin configs, requirements, the demo cache,
the code archive a TPU launch ships, train.py for subprocesses) are found from here, never from the working
directory."""
from __future__ import annotations

import pathlib

ROOT = pathlib.Path(__file__).resolve().parent
