"""One vocabulary of hyper-parameters for every method, validated in one place.

Field names are the reference code's (``hparams/ROME/*.json``, ``hparams/MEMIT/*.json``, EasyEdit's
YAML files): ``v_num_grad_steps``, ``v_lr``, ``v_weight_decay``, ``kl_factor``,
``clamp_norm_factor``, ``mom2_*``, ... :class:`EditConfig` holds what every locate-and-edit method
shares (the target-vector optimisation, context templates, second-moment statistics); each method
subclasses it with its own defaults and extra fields.

Each field declares its valid values in its metadata (``check``); :meth:`EditConfig.__post_init__`
enforces them for every method alike: integers that are not booleans, finite numbers, known
choices. ROME's names before 0.2 (``steps``, ``lr``, ``weight_decay``, ``clamp_factor``) still work
for one release, with a ``FutureWarning``.

:meth:`EditConfig.from_reference` reads a reference hyper-parameter file (the reference's JSON,
EasyEdit's YAML) into any config class and reports what maps where and what has no counterpart.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from ..errors import InvalidConfigError

logger = logging.getLogger(__name__)

#: second-moment keys per key dimension when a config does not say: ``C`` averages ``ceil(10 · d_in)`` tokens
#: (``mom2_n_keys``; ``docs/results/minimal_precomputation.md`` compares it with 100,000 tokens on both bundled
#: families)
DEFAULT_N_KEYS = 10.0

#: old name -> reference name (kept working for one release)
ALIASES = {
    "steps": "v_num_grad_steps",
    "lr": "v_lr",
    "weight_decay": "v_weight_decay",
    "clamp_factor": "clamp_norm_factor",
}


def option(default: Any, help: str, check: str | None = None, **kwargs: Any) -> Any:
    """A config field with its help text and validity rule (see :func:`check_value`)."""
    metadata = {"help": help, **({"check": check} if check else {})}
    if isinstance(default, (list, dict, set)):
        return field(default_factory=lambda: type(default)(default), metadata=metadata, **kwargs)
    return field(default=default, metadata=metadata, **kwargs)


def check_value(owner: str, name: str, value: Any, rule: str) -> None:
    """Raise :class:`InvalidConfigError` unless ``value`` obeys ``rule``.

    Rules: ``"int>=N"``; ``"num>0"`` / ``"num>=0"`` (finite int or float); ``"(0,1]"``;
    ``"bool"``; ``"choice:a|b"``; ``"templates"`` (:func:`check_context_templates`); ``"pairs"``
    (:func:`check_length_params`); ``"texts"`` (a non-empty list of non-empty strings); ``"?"`` prefix: ``None``
    is allowed too.
    """
    if rule.startswith("?"):
        if value is None:
            return
        rule = rule[1:]
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if rule.startswith("int>="):
        ok, want = number and isinstance(value, int) and value >= int(rule[5:]), f"an int >= {rule[5:]}"
    elif rule in ("num>0", "num>=0"):
        # an int too large for a float is not finite for the float arithmetic it feeds
        ok = number and _finite(value) and (value > 0 if rule == "num>0" else value >= 0)
        want = "a finite number " + rule[3:]
    elif rule == "(0,1]":
        ok, want = number and 0 < value <= 1, "a number in (0, 1]"
    elif rule == "bool":
        ok, want = isinstance(value, bool), "True or False"
    elif rule == "templates":
        check_context_templates(owner, value)
        return
    elif rule == "pairs":
        check_length_params(owner, value)
        return
    elif rule == "texts":
        ok = isinstance(value, (list, tuple)) and bool(value) and all(isinstance(t, str) and t.strip() for t in value)
        want = "a non-empty list of non-empty texts"
    elif rule.startswith("choice:"):
        choices = rule[7:].split("|")
        ok, want = isinstance(value, str) and value in choices, " or ".join(repr(c) for c in choices)
    else:  # pragma: no cover - a typo in a field declaration
        raise ValueError(f"unknown check rule {rule!r}")
    if not ok:
        shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
        kind = f" ({type(value).__name__})" if isinstance(value, (bool, str)) and "choice" not in rule else ""
        raise InvalidConfigError(f"{owner}.{name} must be {want}, got {shown}{kind}.")


def _finite(value: int | float) -> bool:
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def _is_dataset(value: Any) -> bool:
    return type(value).__module__.split(".")[0] == "datasets"


def check_corpus(owner: str, value: Any) -> None:
    """``mom2_corpus``: ``None``, a non-empty list / tuple of strings, or a ``datasets`` dataset."""
    if value is None or _is_dataset(value):
        return
    if isinstance(value, (list, tuple)) and value and all(isinstance(t, str) for t in value):
        return
    if isinstance(value, (str, bytes)):
        got = "one string"
    elif isinstance(value, (list, tuple)):
        bad = next((t for t in value if not isinstance(t, str)), None)
        got = "an empty list" if not value else f"a list holding a {type(bad).__name__}"
    else:
        got = type(value).__name__
    raise InvalidConfigError(
        f"{owner}.mom2_corpus must be None, a non-empty list of texts or a datasets dataset (not {got})."
    )


#: the named forms ``context_templates`` accepts besides an int and a list
CONTEXT_RECIPES = ("reference",)


def check_context_templates(owner: str, value: Any) -> Any:
    """``context_templates`` validated and normalised: an int >= 0, ``"reference"``, or a list of
    strings with exactly one ``{}`` each, returned as a list with ``"{}"`` first (added if missing)."""
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 0:
            raise InvalidConfigError(f"{owner}.context_templates must be an int >= 0, got {value!r}.")
        return value
    if isinstance(value, str):
        if value not in CONTEXT_RECIPES:
            raise InvalidConfigError(
                f"{owner}.context_templates must be an int >= 0, a list of templates with one '{{}}' each, "
                f"or {' / '.join(repr(n) for n in CONTEXT_RECIPES)}; got {value!r}."
            )
        return value
    if isinstance(value, (list, tuple)):
        bad = [t for t in value if not isinstance(t, str) or t.count("{}") != 1]
        if bad:
            shown = repr(bad[0]) if len(repr(bad[0])) <= 60 else repr(bad[0])[:57] + "..."
            raise InvalidConfigError(
                f"{owner}.context_templates must be a list of strings with exactly one '{{}}' each, where the "
                f"prompt goes (e.g. 'A short prefix. {{}}'); got {shown}."
            )
        return ["{}", *(t for t in value if t != "{}")]
    raise InvalidConfigError(
        f"{owner}.context_templates must be an int >= 0, a list of templates or 'reference', "
        f"got {type(value).__name__}."
    )


def check_length_params(owner: str, value: Any) -> Any:
    """``context_template_length_params``: ``None`` or ``[[length, count], ...]`` of ints >= 1."""
    if value is None:
        return None
    ok = isinstance(value, (list, tuple)) and len(value) > 0
    pairs = []
    for pair in value if ok else ():
        if not (
            isinstance(pair, (list, tuple))
            and len(pair) == 2
            and all(isinstance(x, int) and not isinstance(x, bool) and x >= 1 for x in pair)
        ):
            ok = False
            break
        pairs.append([int(pair[0]), int(pair[1])])
    if not ok:
        shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
        raise InvalidConfigError(
            f"{owner}.context_template_length_params must be None or a non-empty list of [length, count] "
            f"pairs of ints >= 1 (the reference ROME's is [[5, 10], [10, 10]]); got {shown}."
        )
    return pairs


@dataclass
class EditConfig:
    """Hyper-parameters every locate-and-edit method shares; methods subclass it."""

    #: the reference recipe ``context_templates="reference"`` means (:data:`hf_knowedit.methods.context.RECIPES`)
    reference_context: ClassVar[str] = "memit"
    #: the ``context_templates`` :meth:`from_reference` sets (the reference code's recipe, unless a method's
    #: reference uses none: ``0``)
    reference_templates: ClassVar[Any] = "reference"
    #: below this many multiples of d_in keys (``mom2_n_keys``) a warning says C is too coarse for the method
    #: (``docs/results/minimal_precomputation.md``)
    min_n_keys: ClassVar[float] = 2.0

    # target vectors v* / z (ROME compute_v, MEMIT compute_z)
    v_num_grad_steps: int = option(20, "forward passes of the v*/z optimisation at most", "int>=1")
    v_lr: float | None = option(
        None,
        "Adam learning rate of the v*/z optimisation; None: v_lr_relative * RMS of the site's unedited value, "
        "per request (a number: that rate for every model, as the reference's 0.5)",
        "?num>0",
    )
    v_lr_relative: float = option(0.5, "v_lr = this * RMS(init) per request when v_lr is None", "num>0")
    v_weight_decay: float = option(0.5, "weight of ||delta|| / ||init||^2 in the v*/z loss", "num>=0")
    kl_factor: float = option(0.0625, "weight of KL(current || initial) at the essence prompt '{} is a'", "num>=0")
    clamp_norm_factor: float = option(4.0, "delta stays in the ball of radius clamp_norm_factor * ||init||", "num>0")
    early_stop: float = option(0.05, "stop optimising a request once its loss is below this", "num>=0")
    v_position_noise: bool = option(
        False,
        "NAMET (Dai et al. 2025): in each request's v*/z rows, delta goes as many tokens before the subject's last "
        "token as the row is shorter than the request's longest row (none where that is before the row's start), "
        "and the target adds the mean over the context-template rows of (value there - value at the subject) "
        "(hf_knowedit.methods.targets.position_noise)",
        "bool",
    )
    # context templates
    context_templates: int | list[str] | str = option(
        5,
        "int: that many model-generated prefixes (plus the bare prompt); a list: your own templates, one '{}' "
        "each; 'reference': the reference code's recipe (hf_knowedit.methods.context)",
        "templates",
    )
    context_length: int = option(10, "new tokens per generated prefix (int context_templates)", "int>=1")
    chat_context: int = option(
        0,
        "that many chat-form templates besides: the prompt as the start of the assistant's reply to a generic user "
        "turn, through the tokenizer's chat template ('Q: ... A:' without one); their own group "
        "(hf_knowedit.methods.context.chat_templates)",
        "int>=0",
    )
    chat_questions: bool = option(
        False,
        "one more v*/z rewriting row per request: its relation's question (relation_questions.json, by the "
        "request's relation_id or its CounterFact statement) as a user turn of the chat template ('Q: ... A:' "
        "without one), the new object as the answer's first words, written as given; requests whose relation "
        "has no question get none (hf_knowedit.methods.context.question_template)",
        "bool",
    )
    context_template_length_params: list[list[int]] | None = option(
        None,
        "[[length, count], ...] of context_templates='reference' (None: the method's reference pairs)",
        "?pairs",
    )
    # second moment C = E[k kᵀ]
    mom2: str = option("corpus", "'corpus': C = E[k kᵀ] over mom2_corpus; 'identity': C = I", "choice:corpus|identity")
    mom2_corpus: Any = option(
        None,
        "None (default corpus, see hf_knowedit.methods.statistics), a list of texts, "
        "or a datasets dataset with a 'text' column",
    )
    mom2_preserve: Any = option(
        None,
        "texts the edit should leave alone (e.g. ordinary prompts whose MoE routing must hold): the keys of all "
        "their tokens are added to C with weight mom2_preserve_weight",
        "?texts",
    )
    mom2_preserve_weight: float = option(10.0, "w in C + w * E_preserve[k kᵀ] (mom2_preserve)", "num>0")
    mom2_n_tokens: int | None = option(
        None, "tokens averaged into C; None: ceil(mom2_n_keys * d_in) of the edited layer", "?int>=1"
    )
    mom2_n_keys: float | None = option(
        DEFAULT_N_KEYS,
        "when mom2_n_tokens is None, C averages ceil(mom2_n_keys * d_in) tokens: multiples of the key dimension "
        "(minimal precomputation, FastROME / FastMEMIT, ACL 2025); None: the default, 10",
        "?num>0",
    )
    mom2_dtype: str = option("float32", "accumulation dtype of C", "choice:float32|float64")
    mom2_batch_tokens: int = option(
        4096, "memory budget of the statistics pass: padded tokens per forward (docs/memory.md)", "int>=1"
    )

    def __post_init__(self) -> None:
        owner = type(self).__name__
        for f in dataclasses.fields(self):
            rule = f.metadata.get("check")
            if rule:
                check_value(owner, f.name, getattr(self, f.name), rule)
        check_corpus(owner, self.mom2_corpus)
        self.context_templates = check_context_templates(owner, self.context_templates)
        self.context_template_length_params = check_length_params(owner, self.context_template_length_params)

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_reference(cls, source: Any, **overrides: Any) -> ReferenceConfig:
        """This config from a reference hyper-parameter file: kmeng01/rome and kmeng01/memit's
        ``hparams/*/*.json``, unified-model-editing's EMMET JSON, ENCORE's (SasyaTitech/NAS
        ``hparams/ENCORE/*.json``), AlphaEdit's, or EasyEdit's ``hparams/*/*.yaml``.

        ``source``: a path (``.json`` / ``.yaml`` / ``.yml``), the file's text, or the parsed dict. YAML
        needs PyYAML (imported only then). ``**overrides`` set fields afterwards, as for the class itself.

        Returns a :class:`ReferenceConfig`: the ``config``, the file's ``layers`` (pass them to
        ``apply_edits(layers=...)``: they are not a config field), and a report of what maps where
        (``mapped``) and what has no counterpart here and why (``ignored``: module path templates and
        the LM-head / final-norm names come from the architecture table; devices, model names and stats
        directories are run settings; ``mom2_n_samples`` counts Wikipedia articles where
        ``mom2_n_tokens`` counts tokens; ...). The report is also logged as a table (``report.table()``).
        Values are checked like any config value (``InvalidConfigError`` names the field).

        >>> ref = MEMITConfig.from_reference("hparams/MEMIT/EleutherAI_gpt-j-6B.json")
        >>> model.apply_edits(facts, method="memit", config=ref.config, layers=ref.layers)
        """
        data, name = _read_reference(source)
        report = _map_reference(cls, data, name, overrides)
        logger.info("%s.from_reference(%s):\n%s", cls.__name__, name, report.table())
        return report


@dataclass
class ReferenceConfig:
    """What :meth:`EditConfig.from_reference` made of a reference hyper-parameter file.

    Attributes:
        config: the method config (validated).
        layers: the file's ``layers`` (for ``apply_edits(layers=...)``), or None if it has none.
        mapped: reference field -> what it set here (``"field = value"``).
        ignored: reference field -> why it has no counterpart here.
        source: where the values came from.
    """

    config: EditConfig
    layers: list[int] | None
    mapped: dict[str, str] = field(default_factory=dict)
    ignored: dict[str, str] = field(default_factory=dict)
    source: str = ""

    def table(self) -> str:
        """The report as a Markdown table: reference field, value here or why it is ignored."""
        rows = ["| reference field | here |", "|---|---|"]
        rows += [f"| `{k}` | {v} |" for k, v in self.mapped.items()]
        rows += [f"| `{k}` | ignored: {v} |" for k, v in self.ignored.items()]
        return "\n".join(rows)


#: reference fields with the same name and meaning here (where the config class has them)
_SAME = (
    "v_num_grad_steps",
    "v_lr",
    "v_weight_decay",
    "kl_factor",
    "clamp_norm_factor",
    "mom2_update_weight",
    "mom2_dtype",
    "emmet_lambda",
    "update_norm_lambda",
    "add_prev_edits",
    "nullspace_threshold",
    "original_implementation",
    "lambda_reg",
)
_RENAMED = {"L2": "l2"}
_MODULE_PATHS = ("rewrite_module_tmp", "layer_module_tmp", "mlp_module_tmp", "attn_module_tmp")
_WHY = {
    **{
        k: "module paths come from the architecture table (hf_knowedit.architectures)"
        for k in (*_MODULE_PATHS, "ln_f_module", "lm_head_module")
    },
    **{
        k: "a run setting (model, device, files), not a hyper-parameter"
        for k in ("model_name", "device", "stats_dir", "model_parallel", "fp16", "P_loc", "max_length", "batch_size")
    },
    "mom2_n_samples": "counts Wikipedia articles (~44M key vectors at 100,000); mom2_n_tokens counts tokens",
    "mom2_dataset": "mom2_corpus=None uses wikitext-103 when reachable; pass a datasets dataset for another corpus",
    "v_loss_layer": "the loss is read at the model's last layer (every reference file uses num_layers - 1)",
    "calculate_objective_value": "diagnostics (EMMET's objective; ENCORE: recompute the statistics), not the update",
    "prob_cutoff": "unused by the reference's EMMET update",
    "norm_control": "unused by the reference's EMMET and ENCORE updates",
    "dynamic_multiplier": "unused by the reference's ENCORE update",
    "random_vector_preservation": "unused by the reference's ENCORE update",
    "sequential": "the reference ENCORE's switch for its key cache; add_prev_edits decides here",
    "num_passes": "MoEEdit's RP-BCD passes: its objective is solved exactly here (methods/moeedit.py)",
    "optimization_method": "MoEEdit's solver: its objective is solved exactly here (methods/moeedit.py)",
    "projection_threshold": "unused by the reference MoEEdit (its projections use nullspace_threshold, 2e-2)",
    "num_samples": "counts Wikipedia articles; mom2_n_tokens counts tokens",
    "target_layer_for_unified_vector": "z is optimised at the last edited layer (the reference's default)",
    **{
        k: "read from the model"
        for k in ("num_layers", "num_experts", "num_experts_per_tok", "d_model", "d_hidden", "auto_infer_dims")
    },
}
_NUMBER = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


def _read_reference(source: Any) -> tuple[dict[str, Any], str]:
    """The reference file's fields and a name for the report."""
    if isinstance(source, Mapping):
        return dict(source), "dict"
    if isinstance(source, (str, os.PathLike)):
        text, name, suffix = str(source), "text", ""
        path = Path(source)
        is_text = isinstance(source, str) and any(c in source for c in "\n{:")
        if not is_text or (len(text) < 4096 and "\n" not in text and _is_file(path)):
            if not _is_file(path):
                raise InvalidConfigError(f"from_reference: no file {text!r}; pass a path, the file's text or a dict.")
            text, name, suffix = path.read_text(), str(path), path.suffix.lower()
        data = _parse_reference(text, suffix)
        if not isinstance(data, Mapping):
            raise InvalidConfigError(f"from_reference: {name} holds a {type(data).__name__}, not a mapping of fields.")
        return dict(data), name
    raise InvalidConfigError(f"from_reference takes a path, a file's text or a dict, got {type(source).__name__}.")


def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except (OSError, ValueError):  # a name too long, a NUL character, ...
        return False


def _parse_reference(text: str, suffix: str) -> Any:
    if suffix != ".yaml" and suffix != ".yml":
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            if suffix == ".json":
                raise InvalidConfigError("from_reference: the .json file is not valid JSON.") from None
    try:
        import yaml
    except ImportError:
        raise InvalidConfigError(
            "from_reference: reading YAML needs PyYAML (pip install pyyaml); or pass JSON or a dict."
        ) from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise InvalidConfigError(f"from_reference: not valid JSON or YAML ({err}).") from None


def _number(value: Any) -> Any:
    """YAML 1.1 reads ``5e-1`` as a string: numbers written that way become numbers."""
    if isinstance(value, str) and _NUMBER.match(value.strip()):
        number = float(value)
        return int(number) if number.is_integer() and re.fullmatch(r"[+-]?\d+", value.strip()) else number
    return value


def _map_reference(cls: type, data: dict[str, Any], source: str, overrides: dict[str, Any]) -> ReferenceConfig:
    names = set(cls.field_names())
    values: dict[str, Any] = {}
    mapped: dict[str, str] = {}
    ignored: dict[str, str] = {}
    layers = None
    for key, raw in data.items():
        value = _number(raw)
        target = _RENAMED.get(key, key)
        if key == "layers":
            items = value if isinstance(value, (list, tuple)) else [value]
            if not all(isinstance(x, int) and not isinstance(x, bool) for x in items):
                raise InvalidConfigError(f"from_reference: layers must be a list of ints, got {value!r}.")
            layers = [int(x) for x in items]
            mapped[key] = f"returned as `layers` = {layers} (apply_edits(layers=...))"
        elif key in _SAME or key in _RENAMED:
            if target in names:
                if target == "v_num_grad_steps" and isinstance(value, float) and value.is_integer():
                    value = int(value)
                values[target] = value
                mapped[key] = f"`{target}` = {value!r}"
            else:
                ignored[key] = f"{cls.__name__} has no counterpart (this method does not use it)"
        elif key == "prob_cutoff" and "prob_cutoff" in names:  # ENCORE's MPES rule; 0: no MPES
            if value == 0:
                values["most_probable_stop"] = False
                mapped[key] = "`most_probable_stop` = False (0: no early stopping by probability)"
            else:
                values["prob_cutoff"], values["most_probable_stop"] = value, True
                mapped[key] = f"`prob_cutoff` = {value!r} (with `most_probable_stop` = True)"
        elif key == "mom2_adjustment":
            if not isinstance(value, bool):
                raise InvalidConfigError(f"from_reference: mom2_adjustment must be true or false, got {value!r}.")
            values["mom2"] = "corpus" if value else "identity"
            mapped[key] = f"`mom2` = {values['mom2']!r}"
        elif key == "context_template_length_params":
            values["context_template_length_params"] = value
            mapped[key] = f"`context_template_length_params` = {value!r} (with `context_templates` = 'reference')"
        elif key == "fact_token":
            if value == "subject_last":
                mapped[key] = "the subject's last token (the only lookup position here)"
            else:
                ignored[key] = f"{value!r} is not supported: keys and targets are read at the subject's last token"
                logger.warning(
                    "from_reference(%s): fact_token=%r is not supported; subject_last is used.", source, value
                )
        elif key == "layer_selection":
            if value == "all":
                mapped[key] = "every given layer is edited (the only selection here)"
            else:
                ignored[key] = f"{value!r} is not supported: every given layer is edited"
                logger.warning("from_reference(%s): layer_selection=%r is not supported.", source, value)
        elif key == "alg_name":
            ignored[key] = f"{value!r}: the method is the config class ({cls.__name__}) / apply_edits(method=...)"
        elif key in _WHY:
            ignored[key] = _WHY[key]
        else:
            ignored[key] = "unknown to hf_knowedit"
    values["context_templates"] = cls.reference_templates  # the reference code's recipe (hard-coded in MEMIT's)
    mapped.setdefault(
        "(context templates)",
        f"`context_templates` = {cls.reference_templates!r} "
        + ("(the reference code's recipe)" if cls.reference_templates == "reference" else "(as the reference code)"),
    )
    if "original_implementation" in names and "original_implementation" not in values:
        ignored["(original_implementation)"] = (
            "absent: the reference ROME code is the original implementation; pass original_implementation=True "
            "to reproduce it exactly (default here: r-ROME)"
        )
    for key, value in overrides.items():
        mapped[f"(override) {key}"] = f"`{key}` = {value!r}"
    try:
        config = make_config(cls, values, overrides, f"from_reference({source})")
    except InvalidConfigError as err:
        raise InvalidConfigError(f"{cls.__name__}.from_reference({source}): {err}") from None
    return ReferenceConfig(config, layers, mapped, ignored, source)


def _old_name(self: EditConfig, old: str, new: str) -> Any:
    warnings.warn(
        f"{type(self).__name__}.{old} is now {new}; the old name goes away in the next release.",
        FutureWarning,
        stacklevel=3,
    )
    return getattr(self, new)


for _old, _new in ALIASES.items():  # reading an old name still works, with a warning
    setattr(EditConfig, _old, property(functools.partial(_old_name, old=_old, new=_new)))


def with_aliases(cls: type) -> type:
    """Let ``cls(...)`` (a config dataclass) accept the old names in :data:`ALIASES`, with a warning."""
    init = cls.__init__

    @functools.wraps(init)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        names = [f.name for f in dataclasses.fields(cls) if f.init]
        unknown = sorted(repr(k) for k in kwargs if k not in names and k not in ALIASES)
        if unknown:
            raise InvalidConfigError(f"Unknown option(s) {', '.join(unknown)} for {cls.__name__}; valid: {names}.")
        if len(args) > len(names):
            raise InvalidConfigError(f"{cls.__name__} takes at most {len(names)} positional values; name them.")
        twice = sorted(n for n in names[: len(args)] if n in kwargs)
        if twice:
            raise InvalidConfigError(f"{cls.__name__}: {twice} given both by position and by name.")
        kwargs = _new_names(kwargs, cls.__name__, "")
        init(self, *args, **kwargs)

    cls.__init__ = __init__
    return cls


with_aliases(EditConfig)


def _new_names(given: dict[str, Any], cls_name: str, where: str) -> dict[str, Any]:
    """``given`` with the old names of :data:`ALIASES` replaced by the new ones (with a warning)."""
    out = dict(given)
    for old in [k for k in given if k in ALIASES]:
        new = ALIASES[old]
        if new in given:
            raise InvalidConfigError(f"{cls_name}: pass {new} only ({old} is its old name){where}.")
        warnings.warn(
            f"{cls_name}({old}=...) is now {new}=...; the old name goes away in the next release.",
            FutureWarning,
            stacklevel=4,
        )
        out[new] = out.pop(old)
    return out


def make_config(config_cls: type, config: Any, overrides: dict[str, Any], method: str) -> Any:
    """A ``config_cls`` instance from ``None``, a dict, or an instance, plus keyword overrides; unknown
    names (in the dict, the overrides, or set as attributes on an instance) are an
    :class:`InvalidConfigError` that lists the valid ones, and so is every invalid value."""
    names = [f.name for f in dataclasses.fields(config_cls)]
    aliases = set(ALIASES) if issubclass(config_cls, EditConfig) else set()
    valid = set(names) | aliases
    if config is None:
        config = {}
    if isinstance(config, Mapping):
        given = dict(config)
    elif isinstance(config, config_cls):
        extra = sorted(k for k in getattr(config, "__dict__", {}) if k not in names and not k.startswith("_"))
        if extra:
            raise InvalidConfigError(
                f"Unknown option(s) {extra} set on the {config_cls.__name__} for {method!r}; valid: {sorted(names)}."
            )
        given = {n: getattr(config, n) for n in names}
    else:
        raise InvalidConfigError(
            f"config for {method!r} must be a {config_cls.__name__} or a dict, got {type(config).__name__}."
        )
    unknown = sorted(repr(k) for k in [*given, *overrides] if k not in valid)
    if unknown:
        raise InvalidConfigError(f"Unknown option(s) {', '.join(unknown)} for {method!r}; valid: {sorted(names)}.")
    if aliases:
        given = _new_names(given, config_cls.__name__, " in config")
        overrides = _new_names(overrides, config_cls.__name__, " in the keyword arguments")
    return config_cls(**{**given, **overrides})
