"""Registries of named components: encoders, models, objectives, datasets.

Configs refer to components by their registered name, as in timm's
``register_model`` / ``create_model``. A registered component is a callable
(class or function) whose keyword arguments are its config options: the config
loader validates a config section against that signature, so a user's
component gets the same checks (unknown keys, wrong types, did-you-mean) as
mmptm's own.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable, Iterable, Mapping
from typing import Annotated, Any, TypeVar

T = TypeVar("T", bound=Callable[..., Any])


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """Return a " did you mean 'x'?" suffix for the closest choice, or ""."""
    match = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.5)
    return f" did you mean '{match[0]}'?" if match else ""


class UnknownNameError(KeyError):
    """A config named a component that is not registered."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class Registry:
    """A name -> callable table with a decorator to fill it."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, Callable[..., Any]] = {}

    def register(self, name: str | None = None) -> Callable[[T], T]:
        """Decorator: ``@REGISTRY.register("name")`` (default: the object's ``__name__``)."""

        def decorator(obj: T) -> T:
            key = name or obj.__name__
            existing = self._entries.get(key)
            if existing is not None and existing is not obj and _qualname(existing) != _qualname(obj):
                raise ValueError(
                    f"{self.kind} '{key}' is already registered by {_qualname(existing)}; "
                    f"choose another name for {_qualname(obj)}"
                )
            self._entries[key] = obj
            return obj

        return decorator

    def get(self, name: str) -> Callable[..., Any]:
        try:
            return self._entries[name]
        except KeyError:
            raise UnknownNameError(
                f"unknown {self.kind} '{name}';{did_you_mean(name, self._entries)} "
                f"registered {self.kind}s: {', '.join(sorted(self._entries)) or '(none)'}"
            ) from None

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def describe(self, name: str) -> str:
        """One line: the name, its options and the first line of its docstring."""
        obj = self.get(name)
        doc = (inspect.getdoc(obj) or "").split("\n", 1)[0]
        return f"{name}{_signature(obj)}  {doc}".rstrip()


def _qualname(obj: Any) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', repr(obj))}"


def _signature(obj: Callable[..., Any]) -> str:
    try:
        return str(inspect.signature(obj))
    except (TypeError, ValueError):
        return "(...)"


# A constructor parameter annotated ``EncoderSpec`` takes a nested config section
# ``{"name": <registered encoder>, **options}``; the config loader validates it
# against that encoder's signature, and the constructor builds it with
# ``build(ENCODERS, spec, ...)``.
EncoderSpec = Annotated[dict[str, Any], "mmptm.encoder"]
# A model's tower section: an encoder section that also takes the tower options of
# ``mmptm.config.TowerOptions`` (``init_from``, ``frozen``, ``unfreeze_at_step``),
# which the model applies with :mod:`mmptm.encoders.towers`.
TowerSpec = Annotated[dict[str, Any], "mmptm.encoder", "mmptm.tower"]


def accepted_parameters(obj: Callable[..., Any]) -> dict[str, inspect.Parameter]:
    """Keyword parameters of a component's constructor (``self``/``*args``/``**kw`` excluded)."""
    params = inspect.signature(obj).parameters
    return {
        n: p
        for n, p in params.items()
        if n != "self" and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    }


def build(registry: Registry, spec: Mapping[str, Any], **context: Any) -> Any:
    """Build the component named by ``spec["name"]`` with the other keys as options.

    ``context`` holds run-time values (``embed_dim``, ``vocab_size``, a data
    context, ...) passed only to components whose signature accepts them and
    only where the config did not set them explicitly.
    """
    options = dict(spec)
    name = options.pop("name", None)
    if name is None:
        raise ValueError(f"{registry.kind} config {dict(spec)} has no 'name'; choices: {', '.join(registry.names())}")
    factory = registry.get(name)
    accepted = accepted_parameters(factory)
    takes_var_kw = any(p.kind is p.VAR_KEYWORD for p in inspect.signature(factory).parameters.values())
    for key, value in context.items():
        if key not in options and (key in accepted or takes_var_kw):
            options[key] = value
    return factory(**options)


ENCODERS = Registry("encoder")
MODELS = Registry("model")
OBJECTIVES = Registry("objective")
DATASETS = Registry("dataset")
EVALUATORS = Registry("evaluator")

register_encoder = ENCODERS.register
register_model = MODELS.register
register_objective = OBJECTIVES.register
register_evaluator = EVALUATORS.register
register_dataset = DATASETS.register
