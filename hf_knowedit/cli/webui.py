"""``hf-knowedit studio``: the Edit Studio, a local web UI (:mod:`hf_knowedit.studio`; gradio is imported only
when the command runs)."""

from __future__ import annotations

import argparse
import importlib.util

from ..errors import InvalidConfigError
from .common import BUNDLED, Output, _check_model_arg, _model, logger


def cmd_studio(args: argparse.Namespace, out: Output) -> int:
    if importlib.util.find_spec("gradio") is None:
        raise InvalidConfigError(
            "The studio needs gradio: pip install 'hf_knowedit[studio]' (or pip install gradio); "
            "'make studio-deps' installs it with the browser-test tools."
        )
    from .. import studio

    studio.check_port(args.host, args.port)  # before the model loads
    _check_model_arg(args)
    model, tok = _model(args)
    name = "SmolLM2-135M-Instruct (bundled)" if args.model == BUNDLED else args.model
    app = studio.Studio(model, tok, model_name=name)
    logger.info("Starting the Edit Studio on http://%s:%d (Ctrl-C stops it) ...", args.host, args.port)
    studio.launch(app, host=args.host, port=args.port, block=True, quiet=args.quiet)
    return 0
