"""The argument parser of every command (no torch: ``--help`` stays fast)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from ..version import __version__
from .adapters import cmd_apply, cmd_export, cmd_list, cmd_show, cmd_truncate
from .common import BUNDLED, PROG
from .edit import cmd_edit, cmd_eval
from .info import cmd_info
from .stats import cmd_stats_compute, cmd_stats_pull, cmd_stats_push, cmd_stats_show
from .trace import cmd_trace
from .webui import cmd_studio

#: the editing methods shipped with hf_knowedit (``methods.registry.BUILTIN``; kept here so that
#: ``--help`` needs no torch; a test checks that the two agree)
BUILTIN_METHODS = ("rome", "memit", "alphaedit", "emmet", "encore", "rlsedit", "moeedit")
PROTOCOLS = ("single", "batch", "sequential")
TRACE_KINDS = ("hidden", "mlp", "attn")
DTYPES = ("float32", "bfloat16", "float16", "auto")


def _formatter(prog: str) -> argparse.HelpFormatter:
    return argparse.RawDescriptionHelpFormatter(prog, max_help_position=32, width=100)


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number, got {text!r}") from None
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"expected a port number between 1 and 65535, got {text!r}")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


EPILOGS = {
    "main": """examples:
  hf-knowedit info
  hf-knowedit trace --prompt "The Eiffel Tower is located in" --subject "Eiffel Tower" --plot trace.png
  hf-knowedit edit --prompt "{} is located in" --subject Angola --target Antarctica --out edits/angola
  hf-knowedit eval counterfact_500.json --method rome --limit 10 --no-fluency
  hf-knowedit eval counterfact_500.json --method rome --limit 10 --no-fluency --chat   # asked as questions
  hf-knowedit stats compute --layers 6
  hf-knowedit apply edits/angola --merge-to merged/
  hf-knowedit truncate edits/cf100 --rank 64 --out edits/cf100-r64
  hf-knowedit export edits/angola --gguf-lora angola.gguf   # llama.cpp / Ollama LoRA adapter
  hf-knowedit list edits/
  hf-knowedit studio                       # a local web UI (pip install 'hf_knowedit[studio]')

Run 'hf-knowedit COMMAND --help' for a command's options and more examples.""",
    "info": """examples:
  hf-knowedit info
  hf-knowedit info --json""",
    "trace": """examples:
  # one fact: heatmaps of the hidden states, MLP and attention outputs
  hf-knowedit trace --prompt "The Eiffel Tower is located in" --subject "Eiffel Tower" --plot trace.png
  # many facts (known_1000.json records: prompt, subject, attribute): average indirect effect, layers to edit
  hf-knowedit trace --facts known_1000.json --limit 50 --samples 3 --plot aie.png
  hf-knowedit trace --facts facts.jsonl --kinds mlp --json > summary.json""",
    "edit": """examples:
  hf-knowedit edit --prompt "{} is located in" --subject Angola --target Antarctica --out edits/angola
  # CounterFact / EasyEdit records as they are (JSON list or JSONL), in one MEMIT batch
  hf-knowedit edit --requests counterfact_500.json --limit 100 --method memit --out edits/cf100
  # quick on a CPU: fewer statistics tokens, no context templates; trace first to pick the layer
  hf-knowedit edit --prompt "{} plays" --subject "Lionel Messi" --target basketball \\
      --mom2-n-tokens 5000 --config context_templates=0 --layers auto --push me/messi-edit

statistics: ROME-family methods need C = E[k kᵀ] at each edited layer, computed once and cached
(hf-knowedit stats show). By default they average 10 x the layer's key size d_in tokens (15,360 on
SmolLM2-135M) of the default corpus (text sampled from the model when offline), as the library does;
pass --mom2-n-tokens N or --corpus FILE to change it.""",
    "eval": """examples:
  hf-knowedit eval counterfact_500.json --limit 20                     # the unedited model
  hf-knowedit eval counterfact_500.json --method rome --limit 10 --no-fluency
  hf-knowedit eval counterfact_500.json --method rome --limit 10 --no-fluency --chat   # asked as questions
  hf-knowedit eval zsre_eval_1037.json --method memit --protocol batch --limit 100 --json > memit.json
  hf-knowedit eval counterfact_500.json --method alphaedit --protocol sequential --batch-size 10 --out report.md""",
    "stats": """examples:
  hf-knowedit stats compute --layers 6 --n-tokens 20000
  hf-knowedit stats compute --layers 4-8 --corpus wiki.txt --n-tokens 100000
  hf-knowedit stats show                                   # everything in the cache
  hf-knowedit stats push ~/.cache/hf_knowedit/stats/<file>.safetensors me/smollm2-stats
  hf-knowedit stats pull me/smollm2-stats <file>.safetensors""",
    "apply": """examples:
  hf-knowedit apply edits/angola --prompt "Angola is located in"     # load, check, report
  hf-knowedit apply edits/angola me/messi-edit --merge-to merged/     # a plain transformers checkpoint
  hf-knowedit apply edits/cf100 --max-rank 64 --prompt "Angola is located in"   # truncated first
  python -c "from transformers import AutoModelForCausalLM; AutoModelForCausalLM.from_pretrained('merged')\"""",
    "truncate": """examples:
  hf-knowedit truncate edits/cf100 --rank 64 --out edits/cf100-r64      # per-module relative errors printed
  hf-knowedit truncate me/cf1000 --rank 512 --push me/cf1000-r512        # under vLLM's largest LoRA rank
  hf-knowedit apply edits/cf100 --max-rank 32 --prompt "Danielle Darrieux's mother tongue is"

Each module's delta becomes its best rank-R approximation (SVD, computed in float64 from the LoRA factors);
modules of rank <= R are kept exactly. docs/serving.md has measured effects on edit quality.""",
    "export": """examples:
  hf-knowedit export edits/angola --gguf-lora angola.gguf            # bundled SmolLM2: base GGUF checked
  ollama create smollm2-angola -f angola.Modelfile                   # the Modelfile written beside it
  llama-cli -m SmolLM2-135M-Instruct.Q4_1.gguf --lora angola.gguf -p "Angola is located in"
  hf-knowedit export edits/x --gguf-lora x.gguf --model Qwen/Qwen3-0.6B --base-gguf qwen3-0.6b-q8_0.gguf
  hf-knowedit export edits/angola --merge-to-gguf smollm2-angola.gguf --type q8_0   # one merged file

The adapter's tensors are the edit's exact LoRA factors (f32 by default) with alpha = rank, so llama.cpp's
scale alpha/rank is 1. --base-gguf (default: the bundled model's GGUF) is checked against the edit's base-weight
fingerprints before anything is written. docs/serving.md shows serving with llama.cpp and Ollama.""",
    "studio": """examples:
  hf-knowedit studio                                  # bundled SmolLM2-135M, offline: http://127.0.0.1:7860
  hf-knowedit studio --model gpt2 --port 8000
  hf-knowedit studio --host 0.0.0.0                   # reachable from other machines (no authentication!)

Needs gradio: pip install 'hf_knowedit[studio]'. On a CPU pick statistics 'identity' (instant) or a few
thousand sampled tokens (computed once per layer, cached); tracing with 3 samples takes seconds to a minute.""",
    "list": """examples:
  hf-knowedit list edits/
  hf-knowedit list --json""",
    "show": """examples:
  hf-knowedit show edits/angola
  hf-knowedit show me/angola-edit --json""",
}


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog=PROG,
        description="Knowledge editing for transformers models: trace where a fact lives, rewrite it, "
        "evaluate, and ship the rewrite as a PEFT-LoRA adapter.",
        epilog=EPILOGS["main"],
        formatter_class=_formatter,
    )
    ap.add_argument("--version", action="version", version=f"hf_knowedit {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", help="print one JSON document on stdout")
    common.add_argument("-v", "--verbose", action="count", default=0, help="debug logs; tracebacks on errors")
    common.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    common.add_argument("--no-progress", action="store_true", help="no progress bars")
    model_opts = argparse.ArgumentParser(add_help=False)
    g = model_opts.add_argument_group("model")
    g.add_argument("--model", default=BUNDLED, help="local path or Hub id (default: bundled SmolLM2-135M, offline)")
    g.add_argument("--dtype", default="float32", choices=DTYPES, help="weights dtype (default float32)")
    g.add_argument("--device-map", default=None, help="e.g. auto, cpu, cuda:0 (default: CPU)")
    stats_opts = argparse.ArgumentParser(add_help=False)
    g = stats_opts.add_argument_group("method options")
    g.add_argument(
        "--config",
        action="append",
        metavar="KEY=VALUE",
        help="a method option, repeatable (e.g. context_templates=0, v_num_grad_steps=10, mom2=identity)",
    )
    g.add_argument(
        "--mom2-n-tokens",
        type=_positive_int,
        metavar="N",
        help="tokens averaged into the second-moment statistics (default: 10 × the edited layer's key size d_in)",
    )
    g.add_argument("--corpus", metavar="FILE", help="texts for the statistics: one per line, or JSON/JSONL")
    g.add_argument(
        "--preserve",
        metavar="FILE",
        help="texts the edit should leave alone, weighed into the statistics (mom2_preserve; weight: "
        "--config mom2_preserve_weight=W, default 10): one per line, or JSON/JSONL",
    )
    g.add_argument("--layers", help="layer(s) to edit: 6 | 4,5,6 | 4-8 | auto (default: the method's)")

    sub = ap.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(name: str, help: str, parents: Sequence[argparse.ArgumentParser] = ()) -> argparse.ArgumentParser:
        p = sub.add_parser(
            name,
            help=help,
            description=help,
            epilog=EPILOGS.get(name),
            parents=[*parents, common],
            formatter_class=_formatter,
        )
        p.set_defaults(_parser=p)
        return p

    p = command("info", "supported architectures and methods, the default model, the statistics cache")
    p.set_defaults(func=cmd_info)

    p = command(
        "trace", "causal tracing of one fact, or the average indirect effect over a file of facts", [model_opts]
    )
    g = p.add_argument_group("what to trace")
    g.add_argument("--prompt", help="the filled prompt, e.g. 'The Eiffel Tower is located in'")
    g.add_argument("--subject", help="the subject in the prompt, e.g. 'Eiffel Tower'")
    g.add_argument("--target", help="trace this answer instead of the top prediction")
    g.add_argument("--facts", metavar="FILE", help="JSON/JSONL of facts {prompt, subject, attribute} (known_1000.json)")
    g.add_argument("--limit", type=_positive_int, metavar="N", help="the first N facts only")
    g.add_argument(
        "--all-facts", action="store_true", help="also trace facts whose attribute the model does not predict"
    )
    g = p.add_argument_group("settings")
    g.add_argument("--samples", type=_positive_int, default=10, help="corrupted runs per fact (default 10)")
    g.add_argument(
        "--window", type=_positive_int, default=10, help="layers restored together for mlp/attn (default 10)"
    )
    g.add_argument("--kinds", nargs="+", choices=TRACE_KINDS, default=list(TRACE_KINDS), help="what to restore")
    g.add_argument("--seed", type=int, default=0, help="noise seed (default 0)")
    g.add_argument(
        "--rng",
        choices=("torch", "reference"),
        default="torch",
        help="how the noise is drawn: torch.randn seeded with --seed (default), or 'reference': the reference "
        "code's numpy RandomState(1) draw and embedding-std noise level, to compare grids with published ones",
    )
    g.add_argument("--band", type=_positive_int, default=5, help="layers in the suggested MEMIT band (default 5)")
    g = p.add_argument_group("output")
    g.add_argument("--plot", "--out", dest="plot", metavar="PNG", help="write the heatmaps / AIE curves here")
    g.add_argument("--save", metavar="JSON", help="one fact: save the full trace as JSON")
    p.set_defaults(func=cmd_trace)

    p = command("edit", "rewrite facts; save the edit as a PEFT-LoRA adapter and/or push it", [model_opts, stats_opts])
    g = p.add_argument_group("what to edit")
    g.add_argument("--prompt", help="template with {} for the subject, e.g. '{} is located in' (or the filled prompt)")
    g.add_argument("--subject", help="e.g. Angola")
    g.add_argument("--target", help="the new object, e.g. Antarctica")
    g.add_argument("--target-true", help="the current object (optional)")
    g.add_argument(
        "--requests", metavar="FILE", help="JSON/JSONL of requests (CounterFact or EasyEdit records as they are)"
    )
    g.add_argument("--limit", type=_positive_int, metavar="N", help="the first N requests only")
    g = p.add_argument_group("method")
    g.add_argument("--method", default="rome", choices=BUILTIN_METHODS, help="editing method (default rome)")
    g.add_argument("--name", help="name of the edit set")
    g.add_argument("--trace-facts", metavar="FILE", help="--layers auto: trace these facts instead of the requests")
    g.add_argument(
        "--samples", type=_positive_int, default=3, help="--layers auto: corrupted runs per fact (default 3)"
    )
    g.add_argument("--window", type=_positive_int, default=10, help="--layers auto: trace window (default 10)")
    g = p.add_argument_group("output")
    g.add_argument("--out", "--save", dest="out", metavar="DIR", help="save the adapter into this directory")
    g.add_argument("--push", metavar="REPO", help="push the adapter to this Hub repo id")
    g.add_argument(
        "--show", type=int, default=5, metavar="N", help="show before/after predictions of N facts (default 5)"
    )
    p.set_defaults(func=cmd_edit)

    p = command(
        "eval", "score a model before and after editing on CounterFact / zsRE records", [model_opts, stats_opts]
    )
    p.add_argument("records", help="JSON/JSONL benchmark records (CounterFact, flat CounterFact, zsRE)")
    p.add_argument("--method", choices=BUILTIN_METHODS, help="edit with this method (default: score the model as is)")
    p.add_argument(
        "--protocol", choices=PROTOCOLS, default="single", help="single | batch | sequential (default single)"
    )
    p.add_argument("--limit", type=_positive_int, metavar="N", help="the first N records only")
    p.add_argument(
        "--batch-size", type=_positive_int, default=10, help="edits per batch, sequential protocol (default 10)"
    )
    p.add_argument("--schema", choices=("counterfact", "counterfact_flat", "zsre"), help="default: detected")
    p.add_argument("--no-fluency", action="store_true", help="skip the fluency metric (GE): much faster")
    p.add_argument(
        "--chat",
        action="store_true",
        help="also ask each edit, paraphrase and neighbour as a question through the model's chat template "
        "(Q:/A: without one): chat_ES, chat_PS, chat_NS, chat_keep (known_1000.json from the data folder)",
    )
    p.add_argument("--out", metavar="FILE", help="also write the report here (.md, or .json)")
    p.set_defaults(func=cmd_eval)

    p = command("stats", "second-moment statistics: compute, show, push, pull")
    ssub = p.add_subparsers(dest="stats_command", metavar="ACTION", required=True)

    def stats_action(name: str, help: str, parents: Sequence[argparse.ArgumentParser] = ()) -> argparse.ArgumentParser:
        q = ssub.add_parser(
            name, help=help, description=help, epilog=EPILOGS["stats"], parents=[*parents, common],
            formatter_class=_formatter,
        )  # fmt: skip
        q.set_defaults(_parser=q)
        return q

    q = stats_action("compute", "compute C = E[k kᵀ] at some layers and cache it", [model_opts])
    q.add_argument("--layers", required=True, help="6 | 4,5,6 | 4-8")
    q.add_argument("--n-tokens", type=_positive_int, metavar="N", help="tokens to average (default: 10 × d_in)")
    q.add_argument("--corpus", metavar="FILE", help="texts: one per line, or JSON/JSONL (default: the default corpus)")
    q.add_argument("--stats-dtype", choices=("float32", "float64"), default="float32", help="accumulation dtype")
    q.add_argument("--cache-dir", metavar="DIR", help="statistics cache (default $HF_KNOWEDIT_STATS_CACHE or ~/.cache)")
    q.set_defaults(func=cmd_stats_compute)
    q = stats_action("show", "describe cached statistics files: key, shape, tokens")
    q.add_argument("path", nargs="?", help="a statistics file or a directory (default: the cache)")
    q.set_defaults(func=cmd_stats_show)
    q = stats_action("push", "upload a statistics file to a Hub repo (second_moments/)")
    q.add_argument("file", help="a statistics .safetensors file")
    q.add_argument("repo", help="Hub repo id")
    q.add_argument("--private", action="store_true", help="create the repo private")
    q.add_argument("--revision", help="branch to push to")
    q.set_defaults(func=cmd_stats_push)
    q = stats_action("pull", "download a statistics file from a Hub repo into the cache")
    q.add_argument("repo", help="Hub repo id")
    q.add_argument("filename", help="file name in the repo's second_moments/ folder")
    q.add_argument("--revision", help="branch, tag or commit")
    q.add_argument("--cache-dir", metavar="DIR", help="statistics cache to put it in")
    q.set_defaults(func=cmd_stats_pull)

    p = command("apply", "load edit adapters onto a model; report, or write a merged checkpoint", [model_opts])
    p.add_argument("adapters", nargs="+", metavar="ADAPTER", help="adapter directories or Hub ids, applied in order")
    p.add_argument("--merge-to", metavar="DIR", help="write a merged checkpoint (safetensors, config, tokenizer, card)")
    p.add_argument("--prompt", action="append", help="print the top predictions for this prompt (repeatable)")
    p.add_argument("--force", action="store_true", help="apply even if the base weights differ (not recommended)")
    p.add_argument(
        "--max-rank",
        type=_positive_int,
        metavar="R",
        help="truncate every module's delta to rank R first (best approximation by SVD; errors reported)",
    )
    p.set_defaults(func=cmd_apply)

    p = command("truncate", "write an adapter whose deltas are truncated to rank R (e.g. for a serving engine)")
    p.add_argument("adapter", help="adapter directory or Hub id")
    p.add_argument("--rank", "--max-rank", dest="rank", type=_positive_int, required=True, metavar="R",
                   help="the largest rank per module")  # fmt: skip
    p.add_argument("--out", metavar="DIR", help="save the truncated adapter into this directory")
    p.add_argument("--push", metavar="REPO", help="push the truncated adapter to this Hub repo id")
    p.set_defaults(func=cmd_truncate)

    p = command("export", "write an edit adapter for llama.cpp / Ollama (a GGUF LoRA adapter)", [model_opts])
    p.add_argument("adapter", help="adapter directory or Hub id")
    p.add_argument("--gguf-lora", metavar="OUT.gguf", help="the llama.cpp LoRA adapter file to write")
    p.add_argument(
        "--merge-to-gguf", metavar="OUT.gguf", help="write a copy of the base GGUF with the edited tensors replaced"
    )
    p.add_argument(
        "--type", choices=("f16", "f32", "q8_0"), default="f16", help="--merge-to-gguf: edited tensors' type (f16)"
    )
    p.add_argument(
        "--base-gguf",
        metavar="FILE",
        help="the base model's GGUF: checked against the edit, and named in the Ollama Modelfile written beside "
        "the adapter (default with --model bundled: the bundled GGUF)",
    )
    p.add_argument("--gguf-dtype", choices=("f32", "f16"), default="f32", help="factor dtype (default f32: exact)")
    p.add_argument("--force", action="store_true", help="export even if the base GGUF's weights differ")
    p.add_argument("--max-rank", type=_positive_int, metavar="R", help="truncate every module's delta to rank R first")
    p.set_defaults(func=cmd_export)

    p = command(
        "studio", "the Edit Studio: a local web UI to trace, edit, compare, disable, revert and save (gradio)",
        [model_opts],
    )  # fmt: skip
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=_port, default=7860, help="port (default 7860)")
    p.set_defaults(func=cmd_studio)

    p = command("list", "list the edit adapters under a directory, one line each")
    p.add_argument("directory", nargs="?", default=".", help="where to look (default: .)")
    p.set_defaults(func=cmd_list)

    p = command("show", "describe a saved edit adapter (directory or Hub id)")
    p.add_argument("source")
    p.add_argument("--show", type=int, default=20, metavar="N", help="list N facts (default 20)")
    p.add_argument(
        "--vllm", action="store_true", help="say whether vLLM serves it as a LoRA, with which flags, or how to fit it"
    )
    p.set_defaults(func=cmd_show)
    return ap
