"""``make models-doc``: writes ``docs/models.md``, what works on every supported model family.

For each row of the architecture table (:data:`hf_knowedit.architectures.ARCHITECTURES`) the tiny random
model of the tests (``tests/tiny_models.py``) is built and each capability is run on it: ``attach``,
``trace_fact``, a ROME edit, every MEMIT-family method (the registered methods whose config is a
``MassEditConfig``; MoEEdit on the routed-experts rows only), the edit saved as an adapter and loaded with
``peft.PeftModel.from_pretrained``
(same logits as the hooked edit), and a ROME edit on the model dispatched by accelerate with the edited
layer offloaded to disk (same logits as on the undispatched model). A cell is ✓, the class name of the
typed error the library raised, or ✗ and what went wrong otherwise.

    python benchmarks/gen_models.py [--out docs/models.md] [--only llama gpt2 ...]

The edits use the settings of the behaviour matrix (``tests/test_behaviour_matrix.py``), which give an edit
of visible size on every tiny model; the fact, the probe and the logits helper are the tests' too.
"""

from __future__ import annotations

import argparse
import copy
import logging
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import transformers
from huggingface_hub.utils import disable_progress_bars

from benchlib import ROOT

if str(ROOT) not in sys.path:  # the tiny models and the test settings live with the tests
    sys.path.insert(0, str(ROOT))

from tests.helpers import ROUTED_ONLY_METHODS, logits  # noqa: E402
from tests.test_behaviour_matrix import FACT, PROBE, settings  # noqa: E402
from tests.tiny_models import make_tiny_model  # noqa: E402

import hf_knowedit  # noqa: E402
from hf_knowedit.architectures import (  # noqa: E402
    ARCHITECTURES,
    EXPERT_LAYOUTS,
    attention_layers,
    get_architecture,
    layer_path,
    num_layers,
)
from hf_knowedit.errors import KnowEditError  # noqa: E402
from hf_knowedit.methods.memit import MassEditConfig  # noqa: E402
from hf_knowedit.methods.registry import get_method  # noqa: E402

OUT = ROOT / "docs" / "models.md"
COMMAND = "make models-doc  # or: python benchmarks/gen_models.py"
TRACE = ("The Eiffel Tower is in", "Eiffel Tower")
MEMIT_FAMILY = [m for m in hf_knowedit.available_methods() if issubclass(get_method(m).config_cls, MassEditConfig)]
#: the kind of model, from the table's columns: (label, the columns any of which says so)
KINDS = [
    ("multimodal wrapper", ("text_config",)),
    ("scaled logits", ("logit_scale", "logit_divisor", "residual_multiplier")),
    ("post-MLP norm", ("mlp_post_norm",)),
    ("mixture-of-experts", ("experts",)),
]


class Mismatch(Exception):
    """A capability ran but gave the wrong result (a bug, not a refusal)."""


def kind(model_type: str) -> str:
    """Labels from the table's columns; "recurrent state" for rows whose caches hold more than keys and values
    (``prefix_cache="off"``: the hybrid stacks)."""
    spec = ARCHITECTURES[model_type]
    labels = [label for label, columns in KINDS if any(getattr(spec, c) is not None for c in columns)]
    labels += ["recurrent state (hybrid)"] if spec.prefix_cache == "off" else []
    return ", ".join(labels) or "text decoder"


def edited_logits(model, tok, method: str = "rome"):
    """The probe's logits after a hooked edit of ``model`` (the edit must change them), and the edit set."""
    base = logits(model, tok, PROBE)
    es = hf_knowedit.apply_edits(model, tok, FACT, method, merge=False, **settings(method))
    after = logits(model, tok, PROBE)
    if not (after - base).abs().max() > 1e-4:
        raise Mismatch("the edit changes nothing")
    return after, es


def check_close(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    if not torch.allclose(got, want, atol=1e-4, rtol=1e-4):
        raise Mismatch(f"{what}: logits differ by {float((got - want).abs().max()):.1e}")


def check_attach(model, tok) -> None:
    hf_knowedit.attach(model, tok)
    if model.list_edits() != []:
        raise Mismatch("a fresh model has edits")


def check_trace(model, tok) -> None:
    """Finite scores, but for attention cells whose window holds no attention block (hybrid stacks: NaN)."""
    result = hf_knowedit.trace_fact(model, tok, *TRACE, samples=2, window=2, noise=0.5)
    attention = set(attention_layers(model, get_architecture(model)))
    with_attention = [l for l in range(result.scores["attn"].shape[1]) if {l - 1, l} & attention]
    scores = dict(result.scores, attn=result.scores["attn"][:, with_attention])
    if not all(torch.isfinite(s).all() for s in scores.values()):
        raise Mismatch("non-finite scores")


def check_rome(model, tok) -> None:
    edited_logits(model, tok, "rome")


def check_peft(model, tok) -> None:
    from peft import PeftModel

    fresh = copy.deepcopy(model)
    want, es = edited_logits(model, tok)
    with tempfile.TemporaryDirectory() as folder:
        es.save_pretrained(folder)
        check_close(logits(PeftModel.from_pretrained(fresh, folder), tok, PROBE), want, "PEFT")


def device_map(model, offloaded: set[int]) -> dict[str, str]:
    """Every module (and parameter held outside a module of its own, e.g. LLaVA-NeXT's ``image_newline``) on
    the CPU but the decoder blocks in ``offloaded``, which go to disk."""
    spec, out = get_architecture(model), {}
    layers = {layer_path(spec, i): "disk" if i in offloaded else "cpu" for i in range(num_layers(model, spec))}

    def place(prefix: str, module: torch.nn.Module) -> None:
        out.update({prefix + name: "cpu" for name, _ in module.named_parameters(recurse=False)})
        for name, child in module.named_children():
            path = prefix + name
            if path == spec.layers:
                out.update(layers)
            elif spec.layers.startswith(path + "."):
                place(path + ".", child)
            else:
                out[path] = "cpu"

    place("", model)
    return out


def check_dispatched(model, tok) -> None:
    from accelerate import dispatch_model

    with tempfile.TemporaryDirectory() as folder:
        offloaded = device_map(model, set(settings("rome")["layers"]))
        disp = dispatch_model(copy.deepcopy(model), device_map=offloaded, offload_dir=folder)
        check_close(edited_logits(disp, tok)[0], edited_logits(model, tok)[0], "dispatched")


def outcome(check: Callable, model_type: str) -> str:
    """✓, the typed error's class name, or ✗ and what went wrong, for ``check`` on a fresh tiny model."""
    try:
        check(*make_tiny_model(model_type))
    except KnowEditError as err:
        return type(err).__name__
    except Mismatch as err:
        return f"✗ {err}"
    except Exception as err:  # not a typed error: a bug to report
        return f"✗ {type(err).__name__}"
    return "✓"


def family_for(model_type: str) -> list[str]:
    """The MEMIT-family methods run on ``model_type``'s row (routed-experts-only methods on routed rows only)."""
    routed = ARCHITECTURES[model_type].mlp_out_layout in EXPERT_LAYOUTS
    return [m for m in MEMIT_FAMILY if routed or m not in ROUTED_ONLY_METHODS]


def memit_family(model_type: str) -> str:
    """✓ when every MEMIT-family method edits the model, else the outcomes and the methods that had them. Methods
    for routed experts only (MoEEdit) are run on the rows whose table layout is routed experts."""
    failed: dict[str, list[str]] = {}
    for method in family_for(model_type):
        result = outcome(lambda model, tok: edited_logits(model, tok, method), model_type)
        if result != "✓":
            failed.setdefault(result, []).append(method)
    return "; ".join(f"{result} ({', '.join(methods)})" for result, methods in failed.items()) or "✓"


CHECKS: dict[str, Callable[[str], str]] = {
    "attach": lambda t: outcome(check_attach, t),
    "trace": lambda t: outcome(check_trace, t),
    "ROME": lambda t: outcome(check_rome, t),
    "MEMIT family": memit_family,
    "PEFT load": lambda t: outcome(check_peft, t),
    "dispatched": lambda t: outcome(check_dispatched, t),
}


def row(model_type: str) -> dict[str, str]:
    """One row of the page: the model type, its kind, its transformers class, the capabilities, GGUF export."""
    try:
        cls = type(make_tiny_model(model_type)[0]).__name__
    except Exception as err:  # e.g. no tiny model for a new row
        cls = f"✗ {type(err).__name__}"
    cells = {"model_type": f"`{model_type}`", "kind": kind(model_type), "transformers class": f"`{cls}`"}
    cells |= {name: check(model_type) for name, check in CHECKS.items()}
    return cells | {"GGUF export": ARCHITECTURES[model_type].gguf_arch or "—"}


def page(rows: list[dict[str, str]]) -> str:
    import accelerate
    import peft

    cols = list(rows[0])
    table = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    table += ["| " + " | ".join(r[c] for c in cols) + " |" for r in rows]
    return f"""# Supported models

Every model family in the architecture table (`hf_knowedit.architectures.ARCHITECTURES`, one row per
`config.model_type`) and what works on it. This page is generated, not written by hand: each cell comes from
running the capability on the family's tiny random model (`tests/tiny_models.py`: 4 layers, hidden size 32)
with the cheap settings of the behaviour matrix (`tests/test_behaviour_matrix.py`: `C = I`, two optimisation
steps), so it says what runs and agrees, not how well an edit takes on a real model (`docs/results/`).
**attach**: `hf_knowedit.attach`; **trace**: `trace_fact` on a short prompt; **ROME**: one edit that changes
the logits; **MEMIT family**: the same with each of {", ".join(MEMIT_FAMILY)}
({", ".join(ROUTED_ONLY_METHODS)}: routed-experts rows only); **PEFT load**: the ROME edit saved as an adapter
and loaded with `peft.PeftModel.from_pretrained` gives the hooked edit's logits;
**dispatched**: the ROME edit on the model dispatched by `accelerate.dispatch_model`, the edited layer
offloaded to disk, gives the undispatched edit's logits. ✓: it works; a class name: the typed error
(`hf_knowedit.errors`) it raised; ✗: a wrong result or an untyped error, a bug. **kind** is read from the
table's columns (`text_config`, `logit_scale` / `logit_divisor` / `residual_multiplier`, `mlp_post_norm`,
`experts`); **GGUF export**: the llama.cpp architecture `hf-knowedit export --gguf-lora` writes for it
(`gguf_arch`), — for none. Regenerate it after changing the table:

    {COMMAND}

Versions: torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__},
accelerate {accelerate.__version__}.

{chr(10).join(table)}
"""


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help=f"default: {OUT.relative_to(ROOT)}, or nothing with --only")
    parser.add_argument("--only", nargs="+", metavar="MODEL_TYPE", help="these rows only, printed (a quick look)")
    args = parser.parse_args(argv)
    out = args.out or (None if args.only else OUT)
    torch.set_num_threads(1)  # tiny matrices: one thread is fastest, and leaves the other cores alone
    # the cells are the report: no progress bars, no warnings about the tiny models' weak edits
    disable_progress_bars()
    transformers.logging.set_verbosity_error()
    for name in ("hf_knowedit", "accelerate"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.simplefilter("ignore")
    start, rows = time.perf_counter(), []
    for model_type in args.only or list(ARCHITECTURES):
        rows.append(row(model_type))
        print(f"{time.perf_counter() - start:6.1f}s  " + " | ".join(rows[-1].values()), flush=True)
    if out is not None:
        out.write_text(page(rows), encoding="utf-8")
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
