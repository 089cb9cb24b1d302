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
"""

from __future__ import annotations

import dataclasses
import functools
import math
import warnings
from dataclasses import dataclass, field
from typing import Any

from ..errors import InvalidConfigError

#: second-moment tokens when a config does not say (``mom2_n_tokens``)
DEFAULT_N_TOKENS = 100_000

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
    ``"bool"``; ``"choice:a|b"``; ``"?"`` prefix: ``None`` is allowed too.
    """
    if rule.startswith("?"):
        if value is None:
            return
        rule = rule[1:]
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if rule.startswith("int>="):
        ok, want = number and isinstance(value, int) and value >= int(rule[5:]), f"an int >= {rule[5:]}"
    elif rule in ("num>0", "num>=0"):
        ok = number and math.isfinite(value) and (value > 0 if rule == "num>0" else value >= 0)
        want = "a finite number " + rule[3:]
    elif rule == "(0,1]":
        ok, want = number and 0 < value <= 1, "a number in (0, 1]"
    elif rule == "bool":
        ok, want = isinstance(value, bool), "True or False"
    elif rule.startswith("choice:"):
        choices = rule[7:].split("|")
        ok, want = isinstance(value, str) and value in choices, " or ".join(repr(c) for c in choices)
    else:  # pragma: no cover - a typo in a field declaration
        raise ValueError(f"unknown check rule {rule!r}")
    if not ok:
        raise InvalidConfigError(f"{owner}.{name} must be {want}, got {value!r}.")


@dataclass
class EditConfig:
    """Hyper-parameters every locate-and-edit method shares; methods subclass it."""

    # target vectors v* / z (ROME compute_v, MEMIT compute_z)
    v_num_grad_steps: int = option(20, "forward passes of the v*/z optimisation at most", "int>=1")
    v_lr: float = option(0.5, "Adam learning rate of the v*/z optimisation", "num>0")
    v_weight_decay: float = option(0.5, "weight of ||delta|| / ||init||^2 in the v*/z loss", "num>=0")
    kl_factor: float = option(0.0625, "weight of KL(current || initial) at the essence prompt '{} is a'", "num>=0")
    clamp_norm_factor: float = option(4.0, "delta stays in the ball of radius clamp_norm_factor * ||init||", "num>0")
    early_stop: float = option(0.05, "stop optimising a request once its loss is below this", "num>=0")
    # context templates
    context_templates: int = option(
        5, "model-generated prefixes averaged over for keys and targets (plus the bare prompt)", "int>=0"
    )
    context_length: int = option(10, "tokens per generated prefix", "int>=1")
    # second moment C = E[k kᵀ]
    mom2: str = option("corpus", "'corpus': C = E[k kᵀ] over mom2_corpus; 'identity': C = I", "choice:corpus|identity")
    mom2_corpus: Any = option(
        None,
        "None (default corpus, see hf_knowedit.methods.statistics), a list of texts, "
        "or a datasets dataset with a 'text' column",
    )
    mom2_n_tokens: int = option(DEFAULT_N_TOKENS, "tokens averaged into C", "int>=1")
    mom2_dtype: str = option("float32", "accumulation dtype of C", "choice:float32|float64")

    def __post_init__(self) -> None:
        owner = type(self).__name__
        for f in dataclasses.fields(self):
            rule = f.metadata.get("check")
            if rule:
                check_value(owner, f.name, getattr(self, f.name), rule)
        if isinstance(self.mom2_corpus, (str, bytes)):
            raise InvalidConfigError(
                f"{owner}.mom2_corpus must be None, a list of texts or a datasets dataset (not one string)."
            )

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]


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
        for old in [k for k in kwargs if k in ALIASES]:
            new = ALIASES[old]
            if new in kwargs:
                raise InvalidConfigError(f"{cls.__name__}: pass {new} only ({old} is its old name).")
            warnings.warn(
                f"{cls.__name__}({old}=...) is now {new}=...; the old name goes away in the next release.",
                FutureWarning,
                stacklevel=2,
            )
            kwargs[new] = kwargs.pop(old)
        init(self, *args, **kwargs)

    cls.__init__ = __init__
    return cls


with_aliases(EditConfig)


def make_config(config_cls: type, config: Any, overrides: dict[str, Any], method: str) -> Any:
    """A ``config_cls`` instance from ``None``, a dict, or an instance, plus keyword overrides; unknown
    names are an :class:`InvalidConfigError` that lists the valid ones."""
    names = {f.name for f in dataclasses.fields(config_cls)}
    valid = set(names) | (set(ALIASES) if issubclass(config_cls, EditConfig) else set())
    if config is None:
        config = {}
    if isinstance(config, dict):
        given = {**config, **overrides}
    elif isinstance(config, config_cls):
        given = {**{n: getattr(config, n) for n in names}, **overrides}
    else:
        raise InvalidConfigError(
            f"config for {method!r} must be a {config_cls.__name__} or a dict, got {type(config).__name__}."
        )
    unknown = sorted(repr(k) for k in given if k not in valid)
    if unknown:
        raise InvalidConfigError(f"Unknown option(s) {unknown} for {method!r}; valid: {sorted(names)}.")
    return config_cls(**given)
