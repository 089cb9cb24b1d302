"""Edit Studio: a small local web UI over the whole workflow (``hf-knowedit studio``, or ``app.py`` as a
Hugging Face Space).

    hf-knowedit studio                                   # the bundled SmolLM2-135M, http://127.0.0.1:7860
    hf-knowedit studio --model gpt2 --port 8000

Type a prompt and its subject: the model's top next tokens and the causal-trace heatmaps (hidden states,
MLP and attention outputs) with the layer to edit. Rewrite the fact with a method and layer: top-k before
and after on the prompt, a paraphrase and a neighbour, and a short greedy generation before and after.
List the edits, disable / enable each one, revert it, save it as a PEFT-LoRA adapter (optionally
truncated to a maximum rank) or push it to the Hub.

The UI logic is :class:`Studio`: plain methods that take and return plain data, which tests call without
a browser. :func:`build_app` wires them into a ``gradio.Blocks`` (library errors become a ``gr.Error``
with the library's message, never a traceback; long steps report through ``gr.Progress``) and
:func:`launch` serves it. gradio is imported only there: this module is imported by the ``studio``
subcommand and ``app.py`` alone, and the rest of hf_knowedit never imports it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import re
import socket
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .errors import InvalidConfigError, InvalidRequestError, KnowEditError

logger = logging.getLogger(__name__)

KINDS = ("hidden", "mlp", "attn")
METHODS = ("rome", "memit", "alphaedit", "emmet")
#: second-moment statistics choices in the UI: skip them, or sample text from the model once and cache them
STATS_IDENTITY = "identity (instant; demo quality)"
STATS_SAMPLED = "sampled from the model (computed once per layer, cached)"
DEFAULT_N_TOKENS = 5000
#: (prompt, subject, new target, paraphrase, neighbour) shown as examples
EXAMPLES = [
    (
        "The Eiffel Tower is located in the city of",
        "The Eiffel Tower",
        "Rome",
        "The Eiffel Tower, a famous landmark, stands in the city of",
        "The Louvre museum is located in the city of",
    ),
    (
        "The mother tongue of Danielle Darrieux is",
        "Danielle Darrieux",
        "English",
        "Danielle Darrieux grew up speaking",
        "The mother tongue of Thomas Mann is",
    ),
    (
        "Lionel Messi plays the sport of",
        "Lionel Messi",
        "basketball",
        "Lionel Messi is a professional player of",
        "Michael Jordan plays the sport of",
    ),
]

Progress = Callable[[float, str], None]


def _no_progress(fraction: float, desc: str) -> None:
    pass


def parse_layers(text: Any) -> list[int] | str | None:
    """``None`` (blank: the method's default), ``"auto"``, or layer indices from ``6``, ``4,5,6`` or ``4-8``."""
    if text is None or (isinstance(text, float) and text != text):
        return None
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        return [int(text)]
    text = str(text).strip()
    if not text:
        return None
    if text.lower() == "auto":
        return "auto"
    layers: list[int] = []
    for part in text.split(","):
        part = part.strip()
        m = re.fullmatch(r"(\d+)\s*-\s*(\d+)", part)
        if m and int(m.group(1)) <= int(m.group(2)):
            layers.extend(range(int(m.group(1)), int(m.group(2)) + 1))
        elif re.fullmatch(r"-?\d+", part):
            layers.append(int(part))
        else:
            raise InvalidConfigError(
                f"Layers: cannot read {text!r}; write one index (6), a list (4,5,6), a range (4-8), 'auto', or "
                "leave it blank for the method's default."
            )
    return layers


def _label(token: str, taken: dict[str, float]) -> str:
    """A readable, unique label for a token (leading spaces dropped unless that makes it collide)."""
    label = token.strip() or repr(token)
    return repr(token) if label in taken else label


def as_label(top: Sequence[tuple[str, float]]) -> dict[str, float]:
    """``[(token, p), ...]`` as ``{label: p}`` (what ``gr.Label`` shows)."""
    out: dict[str, float] = {}
    for token, p in top:
        out[_label(token, out)] = float(p)
    return out


def fmt_top(top: Sequence[tuple[str, float]], n: int = 3) -> str:
    return ", ".join(f"{t.strip() or repr(t)} {p:.1%}" for t, p in top[:n])


def ui_message(err: BaseException) -> str:
    """What the UI shows for an error: the library's own message for a :class:`KnowEditError` (it says how to
    fix the problem), else the exception's type and message, on one line; never a traceback."""
    text = " ".join(str(err).split())
    if isinstance(err, KnowEditError):
        return text or type(err).__name__
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def port_in_use(host: str, port: int) -> bool:
    """Whether ``host:port`` cannot be bound (another server listens there)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: TIME_WAIT is no conflict
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@dataclasses.dataclass
class TraceView:
    """What the trace panel shows."""

    top: list[tuple[str, float]]
    plot: str  # PNG path
    suggested_layer: int
    kind: str  # the kind whose peak chose the layer
    answer: str
    clean_prob: float
    corrupted_prob: float
    seconds: float

    def summary(self) -> str:
        return (
            f"Traced answer **{self.answer.strip()!r}**: p = {self.clean_prob:.3f} clean, "
            f"{self.corrupted_prob:.3f} with the subject corrupted ({self.seconds:.1f} s). "
            f"Suggested layer: **{self.suggested_layer}** (peak indirect effect of the {self.kind} output at "
            "the last subject token); it is now in *Layer(s)* below."
        )


@dataclasses.dataclass
class EditView:
    """What the edit panel shows after an edit."""

    name: str
    method: str
    layers: list[int]
    seconds: float
    rows: list[dict[str, Any]]  # what, prompt, before, after (top-k lists)
    generation_before: str
    generation_after: str

    def summary(self) -> str:
        top = self.rows[0]["after"][0][0].strip() if self.rows and self.rows[0]["after"] else "?"
        return (
            f"Applied **{self.name}** ({self.method}, layer(s) {', '.join(map(str, self.layers))}) in "
            f"{self.seconds:.1f} s. The top prediction for the prompt is now **{top}**."
        )

    def table(self) -> list[list[str]]:
        return [[r["what"], r["prompt"], fmt_top(r["before"]), fmt_top(r["after"])] for r in self.rows]


class Studio:
    """The Edit Studio's logic on one model, without any UI: every method takes and returns plain data and
    raises the library's typed errors. One lock serialises the calls (one model, possibly many browser tabs).

    Disabling an edit takes its set off the model (weights restored exactly) and keeps it here; enabling
    puts it back at its place in the stack, so a set computed on top of another one acts on the same weights
    as before."""

    def __init__(self, model: Any, tokenizer: Any, *, model_name: str | None = None, top_k: int = 5,
                 gen_tokens: int = 24, workdir: str | Path | None = None,
                 edit_config: dict[str, Any] | None = None) -> None:  # fmt: skip
        """``edit_config``: method options added to every edit (e.g. ``{"v_num_grad_steps": 10}``); the UI's
        own choices (statistics, context templates) and ``edit(**config)`` take precedence."""
        import hf_knowedit

        hf_knowedit.attach(model, tokenizer)
        self.model, self.tokenizer = model, tokenizer
        self.model_name = model_name or getattr(model.config, "_name_or_path", None) or type(model).__name__
        self.top_k, self.gen_tokens = top_k, gen_tokens
        self.edit_config = dict(edit_config or {})
        self.workdir = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="hf_knowedit_studio-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.order: list[str] = []  # names of the sets made or loaded here, oldest first
        self.disabled: OrderedDict[str, Any] = OrderedDict()  # name -> EditSet taken off the model
        self.lock = threading.RLock()
        self._plots = 0

    # -- facts ----------------------------------------------------------------------------------

    @property
    def n_layers(self) -> int:
        from .architectures import num_layers

        return num_layers(self.model)

    def predict(self, prompt: str, k: int | None = None) -> list[tuple[str, float]]:
        """The model's top ``k`` next tokens after ``prompt`` with their probabilities."""
        import torch

        from .architectures import model_device

        prompt = self._text(prompt, "a prompt", "e.g. 'The Eiffel Tower is located in the city of'")
        with self.lock:
            ids = self.tokenizer(prompt, return_tensors="pt").to(model_device(self.model))
            with torch.no_grad():
                probs = self.model(**ids).logits[0, -1].float().softmax(-1)
        p, i = probs.topk(k or self.top_k)
        return [(self.tokenizer.decode(int(t)), round(float(q), 4)) for t, q in zip(i, p)]

    def generate(self, prompt: str, max_new_tokens: int | None = None) -> str:
        """A greedy continuation of ``prompt`` (the prompt included)."""
        from .generation import generate_texts

        prompt = self._text(prompt, "a prompt", "")
        with self.lock:
            text = generate_texts(
                self.model, self.tokenizer, [prompt], max_new_tokens=max_new_tokens or self.gen_tokens, seed=None
            )[0]
        return text.replace("\n", " ").strip()

    def trace(self, prompt: str, subject: str, *, samples: int = 3, kinds: Sequence[str] = KINDS,
              progress: Progress = _no_progress) -> TraceView:  # fmt: skip
        """Causal trace of the model's answer to ``prompt`` with ``subject`` corrupted; heatmaps as a PNG."""
        import hf_knowedit

        prompt = self._text(prompt, "a prompt", "e.g. 'The Eiffel Tower is located in the city of'")
        subject = self._text(subject, "the subject", "the entity in the prompt, e.g. 'The Eiffel Tower'")
        kinds = [k for k in KINDS if k in (kinds or ())]
        if not kinds:
            raise InvalidConfigError("Pick at least one kind to trace: hidden, mlp or attn.")
        with self.lock:
            start = time.perf_counter()
            progress(0.0, "Top predictions")
            top = self.predict(prompt)
            progress(0.05, f"Causal tracing: {len(kinds)} kind(s) x {self.n_layers} layers x {int(samples)} samples")
            result = hf_knowedit.trace_fact(self.model, self.tokenizer, prompt, subject, samples=int(samples),
                                            kinds=tuple(kinds))  # fmt: skip
            progress(0.9, "Plotting the heatmaps")
            kind = next(k for k in ("mlp", "hidden", "attn") if k in result.scores)
            layer = hf_knowedit.suggest_layers(result, kind=kind)[0]
            self._plots += 1
            path = self.workdir / f"trace-{self._plots}.png"
            result.plot(path)
            # matplotlib figures made without pyplot are freed with the object; nothing global to close
            return TraceView(top, str(path), layer, kind, result.answer, result.clean_prob, result.corrupted_prob,
                             time.perf_counter() - start)  # fmt: skip

    # -- editing --------------------------------------------------------------------------------

    def edit(
        self,
        prompt: str,
        subject: str,
        target: str,
        *,
        method: str = "rome",
        layers: Any = None,
        stats: str = STATS_IDENTITY,
        n_tokens: int = DEFAULT_N_TOKENS,
        context_templates: int = 0,
        paraphrase: str = "",
        neighbour: str = "",
        progress: Progress = _no_progress,
        **config: Any,
    ) -> EditView:
        """Rewrite ``subject``'s fact in ``prompt`` to ``target`` and compare before / after.

        ``stats``: :data:`STATS_IDENTITY` (``mom2="identity"``: no statistics) or :data:`STATS_SAMPLED`
        (``n_tokens`` tokens of text sampled from the model, computed once per layer and cached on disk).
        ``**config`` sets further method options (e.g. ``v_num_grad_steps``)."""
        import hf_knowedit

        prompt = self._text(prompt, "a prompt", "the fact to rewrite, e.g. 'The Eiffel Tower is located in'")
        subject = self._text(subject, "the subject", "the entity in the prompt, e.g. 'The Eiffel Tower'")
        target = self._text(target, "the new target", "e.g. 'Rome'")
        if method not in METHODS:
            raise InvalidConfigError(f"Unknown method {method!r}; pick one of {', '.join(METHODS)}.")
        cfg: dict[str, Any] = {**self.edit_config, "context_templates": int(context_templates), **config}
        if stats == STATS_IDENTITY:
            cfg["mom2"] = "identity"
        elif stats == STATS_SAMPLED:
            if not isinstance(n_tokens, (int, float)) or n_tokens != n_tokens or int(n_tokens) < 1:
                raise InvalidConfigError(f"Statistics tokens must be a positive number, got {n_tokens!r}.")
            cfg["mom2"], cfg["mom2_n_tokens"] = "corpus", int(n_tokens)
        else:
            raise InvalidConfigError(f"Statistics: pick {STATS_IDENTITY!r} or {STATS_SAMPLED!r}.")
        request = {"prompt": prompt, "subject": subject, "target_new": target}
        probes = [("edit prompt", prompt)]
        probes += [("paraphrase", p.strip()) for p in [paraphrase] if p and p.strip()]
        probes += [("neighbour", p.strip()) for p in [neighbour] if p and p.strip()]
        with self.lock:
            progress(0.0, "Predictions before the edit")
            before = [self.predict(p) for _, p in probes]
            gen_before = self.generate(prompt)
            what = (
                "statistics skipped"
                if stats == STATS_IDENTITY
                else f"statistics from {int(n_tokens):,} sampled tokens: computed once per layer, then cached"
            )
            progress(0.15, f"Computing the {method} edit ({what})")
            start = time.perf_counter()
            es = hf_knowedit.apply_edits(self.model, self.tokenizer, request, method, layers=parse_layers(layers),
                                         config=cfg)  # fmt: skip
            seconds = time.perf_counter() - start
            self.order.append(es.name)
            progress(0.85, "Predictions after the edit")
            after = [self.predict(p) for _, p in probes]
            gen_after = self.generate(prompt)
        rows = [{"what": w, "prompt": p, "before": b, "after": a} for (w, p), b, a in zip(probes, before, after)]
        return EditView(es.name, es.method, list(es.layers), seconds, rows, gen_before, gen_after)

    # -- the edits ------------------------------------------------------------------------------

    def edits(self) -> list[dict[str, Any]]:
        """Every edit set made or loaded here (and any other active one), oldest first, with its status."""
        import hf_knowedit

        with self.lock:
            active = {e.name: e for e in hf_knowedit.list_edits(self.model)}
            names = [n for n in self.order if n in active or n in self.disabled]
            names += [n for n in active if n not in names]
            rows = []
            for name in names:
                es = self._edit_set(name)
                facts = "; ".join(f"{r.subject} → {r.target_new}" for r in es.requests[:3])
                if len(es.requests) > 3:
                    facts += f" (+{len(es.requests) - 3} more)"
                if name in active:
                    status = "active (merged)" if active[name].merged else "active (hooked)"
                else:
                    status = "disabled"
                rows.append({"name": name, "method": es.method, "facts": facts,
                             "layers": ", ".join(map(str, es.layers)), "status": status})  # fmt: skip
            return rows

    def names(self) -> list[str]:
        return [r["name"] for r in self.edits()]

    def toggle(self, name: str) -> str:
        """Disable an active edit (its set comes off the model, weights restored exactly) or enable a disabled
        one (back at its place in the stack). Returns what happened."""
        import hf_knowedit

        from .stack import conflict_error, find_conflicts, get_edit_set, get_state, transaction

        name = self._name(name)
        with self.lock:
            if name in self.disabled:
                es = self.disabled[name]
                conflicts = find_conflicts(self.model, es)
                if conflicts:
                    raise conflict_error(conflicts)
                rank = {n: i for i, n in enumerate(self.order)}
                from .deltas import deltas_digest

                digest = deltas_digest(es.deltas, es.layouts)

                def put_back(stack: OrderedDict) -> OrderedDict:
                    items = list(stack.items()) + [(name, (es, True, digest))]
                    items.sort(key=lambda kv: rank.get(kv[0], len(rank)))  # sorted() is stable
                    return OrderedDict(items)

                transaction(self.model, put_back, "Enabling an edit set")
                del self.disabled[name]
                return f"Enabled **{name}**."
            state = get_state(self.model, create=False)
            if state is None or name not in state.sets:
                raise self._unknown(name)
            es = get_edit_set(self.model, name)
            hf_knowedit.revert_edits(self.model, name)
            self.disabled[name] = es
            if name not in self.order:
                self.order.append(name)
            return f"Disabled **{name}** (the model acts as without it; enable it again with the same button)."

    def revert(self, name: str) -> str:
        """Remove an edit for good (active: reverted bit-exactly; disabled: forgotten)."""
        import hf_knowedit

        name = self._name(name)
        with self.lock:
            if name in self.disabled:
                del self.disabled[name]
            else:
                hf_knowedit.revert_edits(self.model, name)
            if name in self.order:
                self.order.remove(name)
            return f"Reverted **{name}**."

    def save(self, name: str, directory: str, max_rank: Any = None) -> str:
        """Save an edit as a PEFT-LoRA adapter directory (truncated to ``max_rank`` when given; 0 or blank:
        exact)."""
        name = self._name(name)
        directory = self._text(directory, "a directory", "where to write the adapter, e.g. 'edits/eiffel'")
        es, note = self._maybe_truncated(name, max_rank)
        with self.lock:
            path = es.save_pretrained(Path(directory).expanduser())
        return f"Saved **{name}** to `{path}`{note}."

    def push(self, name: str, repo_id: str, max_rank: Any = None) -> str:
        """Push an edit to a Hub repo (truncated to ``max_rank`` when given)."""
        name = self._name(name)
        repo_id = self._text(repo_id, "a Hub repo id", "e.g. 'me/eiffel-edit'")
        if not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", repo_id):
            raise InvalidConfigError(f"{repo_id!r} is not a Hub repo id (e.g. 'me/eiffel-edit').")
        es, note = self._maybe_truncated(name, max_rank)
        with self.lock:
            url = es.push_to_hub(repo_id)
        return f"Pushed **{name}** to {url}{note}."

    # -- helpers --------------------------------------------------------------------------------

    def _maybe_truncated(self, name: str, max_rank: Any) -> tuple[Any, str]:
        with self.lock:
            es = self._edit_set(name)
        if (
            max_rank is None
            or max_rank == ""
            or max_rank == 0
            or (isinstance(max_rank, float) and max_rank != max_rank)
        ):
            return es, ""  # blank or 0: the exact edit
        if isinstance(max_rank, bool) or not isinstance(max_rank, (int, float)) or int(max_rank) != max_rank:
            raise InvalidConfigError(f"Max rank must be a whole number (or blank), got {max_rank!r}.")
        small = es.truncate(int(max_rank))
        error = small.metrics["truncation"]["max_relative_error"]
        return small, f", truncated to rank {int(max_rank)} (largest relative error {error:.4f})"

    def _edit_set(self, name: str) -> Any:
        from .stack import get_edit_set

        if name in self.disabled:
            return self.disabled[name]
        return get_edit_set(self.model, name)

    def _name(self, name: Any) -> str:
        from .stack import list_edits

        if not isinstance(name, str) or not name.strip():
            raise InvalidRequestError("Pick an edit in the list first.")
        name = name.strip()
        with self.lock:
            known = {e.name for e in list_edits(self.model)} | set(self.disabled)
        if name not in known:
            raise self._unknown(name)
        return name

    def _unknown(self, name: str) -> KnowEditError:
        from .errors import EditSetNotFoundError

        names = ", ".join(self.names()) or "none yet"
        return EditSetNotFoundError(f"No edit named {name!r}; pick one of the list ({names}).")

    @staticmethod
    def _text(value: Any, what: str, hint: str) -> str:
        if not isinstance(value, str) or not value.strip():
            raise InvalidRequestError(f"Type {what} first{': ' + hint if hint else ''}.")
        return value.strip()


# =============================================================================================
# the gradio app


HEADER = """# hf_knowedit Edit Studio
**Model:** `{model}` ({layers} layers). **1 · Look**: type a prompt and its subject, see what the model predicts and
where it recalls the fact (causal tracing). **2 · Rewrite** the fact with a method at a layer and compare before /
after. **3 · Manage** the edits: disable, revert, save as a PEFT-LoRA adapter, push to the Hub.

*Cheap settings for a CPU:* statistics **identity** skips ROME's second-moment statistics (instant; the edit spills
more onto neighbours, fine for a demo); **sampled** computes them once per layer from a few thousand tokens of text
sampled from the model (a minute or more per layer on a CPU the first time, then cached). Context templates are
0 by default (each adds text to optimise over). Tracing a 30-layer model with 3 corrupted samples takes 15 s to a
minute on 2 CPU cores (fewer samples or kinds: less); a ROME edit with identity statistics, a few seconds."""


def build_app(studio: Studio, *, title: str = "hf_knowedit Edit Studio") -> Any:
    """The gradio ``Blocks`` of ``studio`` (not launched)."""
    import gradio as gr

    def ui_error(message: str) -> Exception:
        try:  # gradio >= 5.x: no traceback on the console for an error the user is shown
            return gr.Error(message, print_exception=False)
        except TypeError:  # pragma: no cover (older gradio)
            return gr.Error(message)

    @contextlib.contextmanager
    def shown_errors():
        try:
            yield
        except gr.Error:
            raise
        except KnowEditError as err:  # the library's message says how to fix it: one line, here and in the log
            logger.warning("%s", ui_message(err))
            raise ui_error(ui_message(err)) from None
        except Exception as err:  # files, the Hub, transformers: one line; the traceback with -v (debug logs)
            logger.error("%s", ui_message(err), exc_info=logger.isEnabledFor(logging.DEBUG))
            raise ui_error(ui_message(err)) from None

    def edits_update(selected: str | None = None) -> tuple[Any, Any]:
        rows = studio.edits()
        names = [r["name"] for r in rows]
        value = selected if selected in names else (names[-1] if names else None)
        table = [[r["name"], r["method"], r["facts"], r["layers"], r["status"]] for r in rows]
        return table, gr.update(choices=names, value=value)

    def on_predict(prompt):
        with shown_errors():
            return as_label(studio.predict(prompt))

    def on_trace(prompt, subject, samples, kinds, progress=gr.Progress(track_tqdm=True)):
        with shown_errors():
            view = studio.trace(
                prompt, subject, samples=int(samples), kinds=kinds, progress=lambda f, d: progress(f, desc=d)
            )
            return as_label(view.top), view.plot, view.summary(), str(view.suggested_layer)

    def on_edit(prompt, subject, target, method, layers, stats, n_tokens, templates, paraphrase, neighbour,
                progress=gr.Progress(track_tqdm=True)):  # fmt: skip
        with shown_errors():
            view = studio.edit(
                prompt, subject, target, method=method, layers=layers, stats=stats, n_tokens=n_tokens,
                context_templates=int(templates), paraphrase=paraphrase, neighbour=neighbour,
                progress=lambda f, d: progress(f, desc=d),
            )  # fmt: skip
            table, choice = edits_update(view.name)
            return (
                view.summary(),
                as_label(view.rows[0]["before"]),
                as_label(view.rows[0]["after"]),
                view.table(),
                view.generation_before,
                view.generation_after,
                table,
                choice,
            )

    def on_toggle(name):
        with shown_errors():
            message = studio.toggle(name)
            return (message, *edits_update(name))

    def on_revert(name):
        with shown_errors():
            message = studio.revert(name)
            return (message, *edits_update())

    def on_save(name, directory, max_rank):
        with shown_errors():
            return studio.save(name, directory, max_rank)

    def on_push(name, repo, max_rank, progress=gr.Progress()):
        with shown_errors():
            progress(0.1, desc="Uploading to the Hub")
            return studio.push(name, repo, max_rank)

    first = EXAMPLES[0]
    with gr.Blocks(title=title, analytics_enabled=False) as app:
        gr.Markdown(HEADER.format(model=studio.model_name, layers=studio.n_layers))
        gr.Markdown("## 1 · Look: what does the model predict, and where is the fact?")
        with gr.Row():
            prompt = gr.Textbox(label="Prompt", value=first[0], elem_id="prompt", scale=3)
            subject = gr.Textbox(label="Subject (as it appears in the prompt)", value=first[1], elem_id="subject")
        with gr.Row():
            samples = gr.Slider(1, 10, value=3, step=1, label="Corrupted samples per cell", elem_id="samples")
            kinds = gr.CheckboxGroup(list(KINDS), value=list(KINDS), label="Trace", elem_id="kinds")
            predict_btn = gr.Button("Top predictions", elem_id="predict-btn")
            trace_btn = gr.Button("Causal trace", variant="primary", elem_id="trace-btn")
        with gr.Row():
            top = gr.Label(num_top_classes=5, label="Top next tokens", elem_id="top", scale=1)
            heatmap = gr.Image(label="Causal trace", type="filepath", elem_id="heatmap", scale=3, interactive=False)
        trace_info = gr.Markdown(elem_id="trace-info")

        gr.Markdown("## 2 · Rewrite the fact")
        with gr.Row():
            target = gr.Textbox(label="New target", value=first[2], elem_id="target")
            method = gr.Dropdown(list(METHODS), value="rome", label="Method", elem_id="method")
            layers = gr.Textbox(label="Layer(s): 6 | 4-8 | blank = method default", value="", elem_id="layers")
            templates = gr.Slider(0, 5, value=0, step=1, label="Context templates", elem_id="templates")
        with gr.Row():
            stats = gr.Radio([STATS_IDENTITY, STATS_SAMPLED], value=STATS_IDENTITY, label="Second-moment statistics",
                             elem_id="stats", scale=2)  # fmt: skip
            n_tokens = gr.Number(value=DEFAULT_N_TOKENS, precision=0, label="Statistics tokens (sampled)",
                                 elem_id="n-tokens")  # fmt: skip
        with gr.Row():
            paraphrase = gr.Textbox(label="Paraphrase (should change too)", value=first[3], elem_id="paraphrase")
            neighbour = gr.Textbox(label="Neighbour (should not change)", value=first[4], elem_id="neighbour")
        gr.Examples([list(e) for e in EXAMPLES], [prompt, subject, target, paraphrase, neighbour], label="Examples")
        edit_btn = gr.Button("Apply edit", variant="primary", elem_id="edit-btn")
        edit_info = gr.Markdown(elem_id="edit-info")
        with gr.Row():
            before = gr.Label(num_top_classes=5, label="Before the edit", elem_id="before")
            after = gr.Label(num_top_classes=5, label="After the edit", elem_id="after")
        compare = gr.Dataframe(
            headers=["", "prompt", "before (top 3)", "after (top 3)"],
            interactive=False,
            elem_id="compare",
            wrap=True,
            column_widths=["11%", "35%", "27%", "27%"],
        )  # fmt: skip
        with gr.Row():
            gen_before = gr.Textbox(label="Greedy generation before", lines=3, elem_id="gen-before")
            gen_after = gr.Textbox(label="Greedy generation after", lines=3, elem_id="gen-after")

        gr.Markdown("## 3 · Manage the edits")
        edits_table = gr.Dataframe(headers=["name", "method", "facts", "layers", "status"], interactive=False,
                                   elem_id="edits", value=[])  # fmt: skip
        with gr.Row():
            name = gr.Dropdown([], label="Edit", elem_id="edit-name", allow_custom_value=True)
            toggle_btn = gr.Button("Disable / enable", elem_id="toggle-btn")
            revert_btn = gr.Button("Revert", variant="stop", elem_id="revert-btn")
        with gr.Row():
            directory = gr.Textbox(label="Save to directory", placeholder="edits/eiffel", elem_id="save-dir")
            max_rank = gr.Number(label="Max rank (0: exact)", precision=0, value=0, minimum=0, elem_id="max-rank")
            save_btn = gr.Button("Save adapter", elem_id="save-btn")
            repo = gr.Textbox(label="Hub repo id", placeholder="me/eiffel-edit", elem_id="repo")
            push_btn = gr.Button("Push to Hub", elem_id="push-btn")
        manage_info = gr.Markdown(elem_id="manage-info")

        predict_btn.click(on_predict, [prompt], [top])
        trace_btn.click(on_trace, [prompt, subject, samples, kinds], [top, heatmap, trace_info, layers])
        edit_btn.click(
            on_edit,
            [prompt, subject, target, method, layers, stats, n_tokens, templates, paraphrase, neighbour],
            [edit_info, before, after, compare, gen_before, gen_after, edits_table, name],
        )
        toggle_btn.click(on_toggle, [name], [manage_info, edits_table, name])
        revert_btn.click(on_revert, [name], [manage_info, edits_table, name])
        save_btn.click(on_save, [name, directory, max_rank], [manage_info])
        push_btn.click(on_push, [name, repo, max_rank], [manage_info])
        app.load(lambda: edits_update(), None, [edits_table, name])
    return app


def check_port(host: str, port: int) -> None:
    if port_in_use(host, port):
        raise InvalidConfigError(
            f"--port {port}: {host}:{port} is already in use (another studio or server?); pass another --port, "
            f"e.g. --port {port + 1}."
        )


def launch(studio: Studio, *, host: str = "127.0.0.1", port: int = 7860, block: bool = True,
           quiet: bool = False) -> tuple[Any, str]:  # fmt: skip
    """Serve ``studio`` on ``host:port``; with ``block=False`` return at once (the server runs in a thread;
    ``app.close()`` stops it). Returns ``(app, url)``."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    check_port(host, port)
    app = build_app(studio)
    app.queue(default_concurrency_limit=1)
    _, url, _ = app.launch(
        server_name=host,
        server_port=port,
        prevent_thread_lock=True,
        quiet=quiet,
        allowed_paths=[str(studio.workdir)],
    )
    if block:
        with contextlib.suppress(KeyboardInterrupt):
            app.block_thread()
    return app, url
