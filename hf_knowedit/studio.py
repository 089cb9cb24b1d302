"""Edit Studio: a small local web UI over the whole workflow (``hf-knowedit studio``, or ``app.py`` as a
Hugging Face Space).

    hf-knowedit studio                                   # the bundled SmolLM2-135M, http://127.0.0.1:7860
    hf-knowedit studio --model gpt2 --port 8000

Type a prompt and its subject: the model's top next tokens and the causal-trace heatmaps (hidden states,
MLP and attention outputs) with the layer to edit. Rewrite the fact with a method and layer: top-k before
and after on the prompt, a paraphrase and a neighbour, a short greedy generation before and after, and the
answer to a question about the fact asked through the model's chat template (``Q: … A:`` without one).
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
#: the session of calls that name none (scripts, tests, one user)
LOCAL = "local"
#: (prompt, subject, new target, paraphrase, neighbour, question) shown as examples
EXAMPLES = [
    (
        "The Eiffel Tower is located in the city of",
        "The Eiffel Tower",
        "Rome",
        "The Eiffel Tower, a famous landmark, stands in the city of",
        "The Louvre museum is located in the city of",
        "In which city is the Eiffel Tower?",
    ),
    (
        "The mother tongue of Danielle Darrieux is",
        "Danielle Darrieux",
        "English",
        "Danielle Darrieux grew up speaking",
        "The mother tongue of Thomas Mann is",
        "What is the mother tongue of Danielle Darrieux?",
    ),
    (
        "Lionel Messi plays the sport of",
        "Lionel Messi",
        "basketball",
        "Lionel Messi is a professional player of",
        "Michael Jordan plays the sport of",
        "Which sport does Lionel Messi play?",
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
    default_layer: int  # ROME's default layer, where an edit goes while *Layer(s)* is blank

    def summary(self) -> str:
        return (
            f"Traced answer **{self.answer.strip()!r}**: p = {self.clean_prob:.3f} clean, "
            f"{self.corrupted_prob:.3f} with the subject corrupted ({self.seconds:.1f} s). "
            f"Suggested layer: **{self.suggested_layer}** (peak indirect effect of the {self.kind} output at "
            f"the last subject token). The peak is not the best layer to edit: with *Layer(s)* blank, ROME edits "
            f"its measured default layer {self.default_layer}, which spills less onto neighbours; type "
            f"{self.suggested_layer} there to edit at the peak."
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
    question: str = ""  # asked in chat form before and after ("": none asked)
    answer_before: str = ""
    answer_after: str = ""
    target: str = ""
    #: whether the answer after the edit names the new target (:func:`~.evaluation.chat.names`); None: no question
    answer_names_target: bool | None = None

    def summary(self) -> str:
        top = self.rows[0]["after"][0][0].strip() if self.rows and self.rows[0]["after"] else "?"
        text = (
            f"Applied **{self.name}** ({self.method}, layer(s) {', '.join(map(str, self.layers))}) in "
            f"{self.seconds:.1f} s. The top prediction for the prompt is now **{top}**."
        )
        if self.answer_names_target is not None:
            verdict = "names" if self.answer_names_target else "does **not** name"
            text += f" Asked as a question, the answer {verdict} **{self.target}**."
        return text

    def table(self) -> list[list[str]]:
        return [[r["what"], r["prompt"], fmt_top(r["before"]), fmt_top(r["after"])] for r in self.rows]


@dataclasses.dataclass
class Session:
    """One session's edit sets: ``sets`` maps a name to ``(set, merged, digest)`` (the stack's own entry),
    oldest first; ``off`` holds the names of the disabled ones."""

    sets: OrderedDict[str, tuple[Any, bool, str]] = dataclasses.field(default_factory=OrderedDict)
    off: set[str] = dataclasses.field(default_factory=set)


class Studio:
    """The Edit Studio's logic on one model, without any UI: every method takes and returns plain data and
    raises the library's typed errors.

    **Sessions.** One model serves every browser session, and each session sees only its own edits: every
    method takes a ``session`` id (the browser session's; :data:`LOCAL` by default, for scripts and one
    user) and, under one lock, first switches the model's stack to that session's enabled sets (plus the
    sets that were active before the studio started, which act for every session), as one transaction.
    So one session's "before" is its own model without its newest edit, never another session's edit, and
    its list, disable / enable, revert, save and push act on its own sets only. :meth:`forget` drops a
    session's sets (the app calls it when the browser tab closes or reloads).

    Disabling an edit takes its set off the model (weights restored exactly) and keeps it in the session;
    enabling puts it back at its place in the session's stack, so a set computed on top of another one acts
    on the same weights as before."""

    def __init__(self, model: Any, tokenizer: Any, *, model_name: str | None = None, top_k: int = 5,
                 gen_tokens: int = 24, workdir: str | Path | None = None,
                 edit_config: dict[str, Any] | None = None) -> None:  # fmt: skip
        """``edit_config``: method options added to every edit (e.g. ``{"v_num_grad_steps": 10}``); the UI's
        own choices (statistics, context templates) and ``edit(**config)`` take precedence."""
        import hf_knowedit

        from .stack import get_state

        hf_knowedit.attach(model, tokenizer)
        self.model, self.tokenizer = model, tokenizer
        self.model_name = model_name or getattr(model.config, "_name_or_path", None) or type(model).__name__
        self.top_k, self.gen_tokens = top_k, gen_tokens
        self.edit_config = dict(edit_config or {})
        self.workdir = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="hf_knowedit_studio-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.sessions: dict[str, Session] = {}
        state = get_state(model, create=False)
        #: sets active before the studio started: they act for every session and no session switches them
        self.shared: list[str] = list(state.sets) if state is not None else []
        self.lock = threading.RLock()
        self._plots = 0

    # -- facts ----------------------------------------------------------------------------------

    @property
    def n_layers(self) -> int:
        from .architectures import num_layers

        return num_layers(self.model)

    def predict(self, prompt: str, k: int | None = None, *, session: str = LOCAL) -> list[tuple[str, float]]:
        """The top ``k`` next tokens after ``prompt`` with their probabilities, on ``session``'s model."""
        import torch

        from .architectures import model_device

        prompt = self._text(prompt, "a prompt", "e.g. 'The Eiffel Tower is located in the city of'")
        with self.lock:
            self._use(session)
            ids = self.tokenizer(prompt, return_tensors="pt").to(model_device(self.model))
            with torch.no_grad():
                probs = self.model(**ids).logits[0, -1].float().softmax(-1)
        p, i = probs.topk(k or self.top_k)
        return [(self.tokenizer.decode(int(t)), round(float(q), 4)) for t, q in zip(i, p)]

    def generate(self, prompt: str, max_new_tokens: int | None = None, *, session: str = LOCAL) -> str:
        """A greedy continuation of ``prompt`` (the prompt included) on ``session``'s model."""
        from .generation import generate_texts

        prompt = self._text(prompt, "a prompt", "")
        with self.lock:
            self._use(session)
            text = generate_texts(
                self.model, self.tokenizer, [prompt], max_new_tokens=max_new_tokens or self.gen_tokens, seed=None
            )[0]
        return text.replace("\n", " ").strip()

    def ask(self, question: str, max_new_tokens: int | None = None, *, session: str = LOCAL) -> str:
        """The greedy answer of ``session``'s model to ``question``, asked as the chat metrics ask
        (:func:`~.evaluation.chat.ask`: one user turn through the chat template, ``Q: … A:`` without one)."""
        from .evaluation.chat import ask

        question = self._text(question, "a question", "e.g. 'In which city is the Eiffel Tower?'")
        with self.lock:
            self._use(session)
            return ask(self.model, self.tokenizer, [question], max_new_tokens=max_new_tokens or self.gen_tokens)[0]

    def trace(self, prompt: str, subject: str, *, samples: int = 3, kinds: Sequence[str] = KINDS,
              progress: Progress = _no_progress, session: str = LOCAL) -> TraceView:  # fmt: skip
        """Causal trace of ``session``'s model's answer to ``prompt`` with ``subject`` corrupted; heatmaps as a
        PNG. The suggested layer is only reported: edits stay at the method's default layer unless asked."""
        import hf_knowedit

        from .methods.rome import default_layer

        prompt = self._text(prompt, "a prompt", "e.g. 'The Eiffel Tower is located in the city of'")
        subject = self._text(subject, "the subject", "the entity in the prompt, e.g. 'The Eiffel Tower'")
        kinds = [k for k in KINDS if k in (kinds or ())]
        if not kinds:
            raise InvalidConfigError("Pick at least one kind to trace: hidden, mlp or attn.")
        with self.lock:
            self._use(session)
            start = time.perf_counter()
            progress(0.0, "Top predictions")
            top = self.predict(prompt, session=session)
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
                             time.perf_counter() - start, default_layer(self.model))  # fmt: skip

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
        question: str = "",
        progress: Progress = _no_progress,
        session: str = LOCAL,
        **config: Any,
    ) -> EditView:
        """Rewrite ``subject``'s fact in ``prompt`` to ``target`` on ``session``'s model (the new set is that
        session's) and compare before / after: top-k on the prompt, ``paraphrase`` and ``neighbour``, a greedy
        generation of the prompt, and (when given) :meth:`ask`'s answer to ``question``, with whether the answer
        after the edit names ``target`` (the chat metrics' matching rules, the subject's mentions ignored).

        ``stats``: :data:`STATS_IDENTITY` (``mom2="identity"``: no statistics) or :data:`STATS_SAMPLED`
        (``n_tokens`` tokens of text sampled from the model, computed once per layer and cached on disk).
        ``**config`` sets further method options (e.g. ``v_num_grad_steps``)."""
        import hf_knowedit

        from .evaluation.chat import names
        from .stack import get_state

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
            own = self._use(session)
            progress(0.0, "Predictions before the edit")
            before = [self.predict(p, session=session) for _, p in probes]
            gen_before = self.generate(prompt, session=session)
            asked = question.strip() if isinstance(question, str) else ""
            answer_before = self.ask(asked, session=session) if asked else ""
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
            active = get_state(self.model).sets[es.name]
            own.sets[es.name] = (active.edit_set, active.merged, active.digest)
            progress(0.85, "Predictions after the edit")
            after = [self.predict(p, session=session) for _, p in probes]
            gen_after = self.generate(prompt, session=session)
            answer_after = self.ask(asked, session=session) if asked else ""
        rows = [{"what": w, "prompt": p, "before": b, "after": a} for (w, p), b, a in zip(probes, before, after)]
        named = names(answer_after, target, subject=subject) if asked else None
        return EditView(es.name, es.method, list(es.layers), seconds, rows, gen_before, gen_after, asked,
                        answer_before, answer_after, target, named)  # fmt: skip

    # -- the edits ------------------------------------------------------------------------------

    def edits(self, *, session: str = LOCAL) -> list[dict[str, Any]]:
        """``session``'s edit sets, oldest first, with their status, after the sets every session shares
        (active before the studio started)."""
        with self.lock:
            own = self._use(session)
            rows = []
            for name in [*self._shared_active(), *own.sets]:
                es, merged = self._entry(name, own)[:2]
                facts = "; ".join(f"{r.subject} → {r.target_new}" for r in es.requests[:3])
                if len(es.requests) > 3:
                    facts += f" (+{len(es.requests) - 3} more)"
                if name not in own.sets:
                    status = "shared (active for every session)"
                elif name in own.off:
                    status = "disabled"
                else:
                    status = "active (merged)" if merged else "active (hooked)"
                rows.append({"name": name, "method": es.method, "facts": facts,
                             "layers": ", ".join(map(str, es.layers)), "status": status})  # fmt: skip
            return rows

    def names(self, *, session: str = LOCAL) -> list[str]:
        return [r["name"] for r in self.edits(session=session)]

    def toggle(self, name: str, *, session: str = LOCAL) -> str:
        """Disable one of ``session``'s active edits (its set comes off the model, weights restored exactly)
        or enable a disabled one (back at its place in the session's stack). Returns what happened."""
        from .stack import conflict_error, find_conflicts

        with self.lock:
            own = self._use(session)
            name = self._own(name, own, "disable or enable")
            if name in own.off:
                conflicts = find_conflicts(self.model, own.sets[name][0])
                if conflicts:
                    raise conflict_error(conflicts)
            own.off ^= {name}
            try:
                self._use(session)
            except BaseException:
                own.off ^= {name}  # the switch is whole or nothing: the model is as before
                raise
            if name in own.off:
                return f"Disabled **{name}** (the model acts as without it; enable it again with the same button)."
            return f"Enabled **{name}**."

    def revert(self, name: str, *, session: str = LOCAL) -> str:
        """Remove one of ``session``'s edits for good (active: reverted bit-exactly; disabled: forgotten)."""
        with self.lock:
            own = self._use(session)
            name = self._own(name, own, "revert")
            sets, off = OrderedDict(own.sets), set(own.off)
            del own.sets[name]
            own.off.discard(name)
            try:
                self._use(session)
            except BaseException:
                own.sets, own.off = sets, off
                raise
            return f"Reverted **{name}**."

    def save(self, name: str, directory: str, max_rank: Any = None, *, session: str = LOCAL) -> str:
        """Save one of ``session``'s edits as a PEFT-LoRA adapter directory (truncated to ``max_rank`` when
        given; 0 or blank: exact)."""
        directory = self._text(directory, "a directory", "where to write the adapter, e.g. 'edits/eiffel'")
        with self.lock:
            name, es, note = self._maybe_truncated(name, max_rank, session)
            path = es.save_pretrained(Path(directory).expanduser())
        return f"Saved **{name}** to `{path}`{note}."

    def push(self, name: str, repo_id: str, max_rank: Any = None, *, session: str = LOCAL) -> str:
        """Push one of ``session``'s edits to a Hub repo (truncated to ``max_rank`` when given)."""
        repo_id = self._text(repo_id, "a Hub repo id", "e.g. 'me/eiffel-edit'")
        if not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", repo_id):
            raise InvalidConfigError(f"{repo_id!r} is not a Hub repo id (e.g. 'me/eiffel-edit').")
        with self.lock:
            name, es, note = self._maybe_truncated(name, max_rank, session)
        url = es.push_to_hub(repo_id)
        return f"Pushed **{name}** to {url}{note}."

    def forget(self, session: str) -> None:
        """Drop ``session``'s edit sets (the browser tab closed); the model goes back to the shared sets."""
        with self.lock:
            if self.sessions.pop(session, None) is not None:
                self._switch(Session())

    # -- sessions -------------------------------------------------------------------------------

    def _use(self, session: str) -> Session:
        """Switch the model to ``session``'s edits and return them (call under ``self.lock``)."""
        if not isinstance(session, str) or not session:
            raise InvalidRequestError(f"A session id must be a non-empty string, got {session!r}.")
        own = self.sessions.setdefault(session, Session())
        self._switch(own)
        return own

    def _switch(self, own: Session) -> None:
        """One transaction: the shared sets, then ``own``'s enabled sets in their order; nothing else."""
        from .stack import get_state, transaction

        state = get_state(self.model)
        shared = self._shared_active()
        mine = [n for n in own.sets if n not in own.off]
        if list(state.sets) == shared + mine and all(state.sets[n].edit_set is own.sets[n][0] for n in mine):
            return  # already this session's model

        def change(stack: OrderedDict) -> OrderedDict:
            return OrderedDict([*((n, stack[n]) for n in shared), *((n, own.sets[n]) for n in mine)])

        transaction(self.model, change, "Switching to this session's edits")

    def _shared_active(self) -> list[str]:
        from .stack import get_state

        state = get_state(self.model)
        return [n for n in self.shared if n in state.sets]

    def _entry(self, name: str, own: Session) -> tuple[Any, bool, str]:
        from .stack import get_state

        if name in own.sets:
            return own.sets[name]
        active = get_state(self.model).sets[name]
        return active.edit_set, active.merged, active.digest

    # -- helpers --------------------------------------------------------------------------------

    def _maybe_truncated(self, name: Any, max_rank: Any, session: str) -> tuple[str, Any, str]:
        own = self._use(session)
        name = self._name(name, own)
        es = self._entry(name, own)[0]
        if (
            max_rank is None
            or max_rank == ""
            or max_rank == 0
            or (isinstance(max_rank, float) and max_rank != max_rank)
        ):
            return name, es, ""  # blank or 0: the exact edit
        if isinstance(max_rank, bool) or not isinstance(max_rank, (int, float)) or int(max_rank) != max_rank:
            raise InvalidConfigError(f"Max rank must be a whole number (or blank), got {max_rank!r}.")
        small = es.truncate(int(max_rank))
        error = small.metrics["truncation"]["max_relative_error"]
        return name, small, f", truncated to rank {int(max_rank)} (largest relative error {error:.4f})"

    def _name(self, name: Any, own: Session) -> str:
        """``name`` if it is one of ``own``'s sets or a shared one; never another session's."""
        if not isinstance(name, str) or not name.strip():
            raise InvalidRequestError("Pick an edit in the list first.")
        name = name.strip()
        if name not in own.sets and name not in self._shared_active():
            from .errors import EditSetNotFoundError

            names = ", ".join([*self._shared_active(), *own.sets]) or "none yet"
            raise EditSetNotFoundError(f"No edit named {name!r} in this session; pick one of the list ({names}).")
        return name

    def _own(self, name: Any, own: Session, what: str) -> str:
        name = self._name(name, own)
        if name not in own.sets:
            raise InvalidRequestError(
                f"{name!r} was active before the studio started and acts for every session; the studio does not "
                f"{what} it (restart the studio without it to change that)."
            )
        return name

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
minute on 2 CPU cores (fewer samples or kinds: less); a ROME edit with identity statistics, a few seconds.

*Shared model, your own edits:* everyone on this page uses one model, but each browser tab sees and manages only
its own edits (the others' are switched off while your requests run). Closing or reloading the tab drops your
edits: save the ones to keep."""


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

    def per_session(fn: Callable) -> Callable:
        """gradio passes the browser's request to the parameter annotated ``gr.Request``; this module's
        annotations are strings (``from __future__ import annotations``) that gradio cannot resolve here."""
        fn.__annotations__["request"] = gr.Request
        return fn

    def sid(request: Any) -> str:
        """The browser session's id (gradio's per-tab ``session_hash``)."""
        return getattr(request, "session_hash", None) or LOCAL

    def edits_update(session: str, selected: str | None = None) -> tuple[Any, Any]:
        rows = studio.edits(session=session)
        names = [r["name"] for r in rows]
        value = selected if selected in names else (names[-1] if names else None)
        table = [[r["name"], r["method"], r["facts"], r["layers"], r["status"]] for r in rows]
        return table, gr.update(choices=names, value=value)

    @per_session
    def on_predict(prompt, request):
        with shown_errors():
            return as_label(studio.predict(prompt, session=sid(request)))

    @per_session
    def on_trace(prompt, subject, samples, kinds, request, progress=gr.Progress(track_tqdm=True)):
        with shown_errors():
            view = studio.trace(prompt, subject, samples=int(samples), kinds=kinds,
                                progress=lambda f, d: progress(f, desc=d), session=sid(request))  # fmt: skip
            return as_label(view.top), view.plot, view.summary()

    @per_session
    def on_edit(prompt, subject, target, method, layers, stats, n_tokens, templates, paraphrase, neighbour,
                question, request, progress=gr.Progress(track_tqdm=True)):  # fmt: skip
        with shown_errors():
            view = studio.edit(
                prompt, subject, target, method=method, layers=layers, stats=stats, n_tokens=n_tokens,
                context_templates=int(templates), paraphrase=paraphrase, neighbour=neighbour, question=question,
                progress=lambda f, d: progress(f, desc=d), session=sid(request),
            )  # fmt: skip
            table, choice = edits_update(sid(request), view.name)
            return (
                view.summary(),
                as_label(view.rows[0]["before"]),
                as_label(view.rows[0]["after"]),
                view.table(),
                view.generation_before,
                view.generation_after,
                view.answer_before,
                view.answer_after,
                table,
                choice,
            )

    @per_session
    def on_toggle(name, request):
        with shown_errors():
            message = studio.toggle(name, session=sid(request))
            return (message, *edits_update(sid(request), name))

    @per_session
    def on_revert(name, request):
        with shown_errors():
            message = studio.revert(name, session=sid(request))
            return (message, *edits_update(sid(request)))

    @per_session
    def on_save(name, directory, max_rank, request):
        with shown_errors():
            return studio.save(name, directory, max_rank, session=sid(request))

    @per_session
    def on_push(name, repo, max_rank, request, progress=gr.Progress()):
        with shown_errors():
            progress(0.1, desc="Uploading to the Hub")
            return studio.push(name, repo, max_rank, session=sid(request))

    @per_session
    def on_load(request):
        return edits_update(sid(request))

    @per_session
    def on_unload(request):
        studio.forget(sid(request))

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
            question = gr.Textbox(label="Question (asked in chat form; blank: none)", value=first[5],
                                  elem_id="question")  # fmt: skip
        gr.Examples([list(e) for e in EXAMPLES], [prompt, subject, target, paraphrase, neighbour, question],
                    label="Examples")  # fmt: skip
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
        with gr.Row():
            answer_before = gr.Textbox(label="Answer to the question before", lines=2, elem_id="answer-before")
            answer_after = gr.Textbox(label="Answer to the question after", lines=2, elem_id="answer-after")

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
        trace_btn.click(on_trace, [prompt, subject, samples, kinds], [top, heatmap, trace_info])
        edit_btn.click(
            on_edit,
            [prompt, subject, target, method, layers, stats, n_tokens, templates, paraphrase, neighbour, question],
            [edit_info, before, after, compare, gen_before, gen_after, answer_before, answer_after, edits_table, name],
        )
        toggle_btn.click(on_toggle, [name], [manage_info, edits_table, name])
        revert_btn.click(on_revert, [name], [manage_info, edits_table, name])
        save_btn.click(on_save, [name, directory, max_rank], [manage_info])
        push_btn.click(on_push, [name, repo, max_rank], [manage_info])
        app.load(on_load, None, [edits_table, name])
        app.unload(on_unload)
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
