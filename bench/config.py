"""The run configuration: one validated object per (variant, seed) run.

A spec (see ``bench/spec.py``) resolves to one :class:`Config` per run.  Sections that
name a registry entry (``model``, ``optim``, ``sched``, ``loss``) are plain dicts
``{"name": ..., **kwargs}`` whose kwargs are checked against the factory's signature
(``bench/factories.py``); the fixed sections are the dataclasses below.  A number with a
valid range says so in its type (``Annotated[float, Range(...)]``), here and in the
factories' signatures, and :func:`check_value` enforces it: a spec cannot ask for a
negative learning rate or a dropout of 1.5.  ``Config.to_dict`` is what a run saves;
``bench.spec.config_from_dict`` builds the Config back from it; ``config_hash`` keys a
run by its resolved content.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import inspect
import json
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from bench.registry import closest_first


class ConfigError(ValueError):
    """A spec or config value is wrong; the message names the file and key path."""


@dataclass(frozen=True)
class Range:
    """The allowed interval of a number: ``low``/``high`` (None: unbounded), each end included
    unless ``*_open``.  Used as ``Annotated[float, Range(0, low_open=True)]``."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def contains(self, v: float) -> bool:
        if self.low is not None and (v <= self.low if self.low_open else v < self.low):
            return False
        return not (self.high is not None and (v >= self.high if self.high_open else v > self.high))

    def __str__(self) -> str:
        if self.low is not None and self.high is not None:
            return f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"
        if self.low is not None:
            return f"{'>' if self.low_open else '>='} {self.low:g}"
        return f"{'<' if self.high_open else '<='} {self.high:g}"


def later(default: Any) -> Any:
    """A key added after runs were published: left out of a saved config (and so of the run key) while it
    holds ``default``, so that every run recorded before the key existed keeps its key and stays current.
    Its default must therefore mean what the code did before the key existed."""
    return field(default=default, metadata={"later": True})


class RangeError(ConfigError):
    """A number of the right type outside its :class:`Range`."""


# The ranges used across the harness, named for what they mean.
Positive = Range(0, low_open=True)  # learning rates, weights, scales
NonNegative = Range(0)  # decays, magnitudes, counts that may be 0
AtLeastOne = Range(1)  # epochs, sizes, widths
Probability = Range(0, 1, high_open=True)  # dropout, momentum, label smoothing: 1 would be degenerate
OpenUnit = Range(0, 1, low_open=True, high_open=True)  # a share of something, a threshold

PosFloat = Annotated[float, Positive]
NonNegFloat = Annotated[float, NonNegative]
NonNegInt = Annotated[int, NonNegative]
PosInt = Annotated[int, AtLeastOne]
UnitFloat = Annotated[float, Probability]


@dataclass
class DataCfg:
    root: str | None = None  # data root; None -> --data-root, $BENCH_DATA, ./data
    val_fraction: Annotated[float, OpenUnit] | None = (
        None  # share of the training images held out; None -> task default
    )
    split_seed: NonNegInt = 0  # the validation split is fixed by this seed, not by the run seed
    train_subset: PosInt | None = None  # use only this many training images (quick profiles, tests)
    channels: list[NonNegInt] | None = None  # input channels to keep; None -> task default
    # The folder tasks' own keys (image_folder, mask_folder; see docs/data.md).
    image_size: PosInt | list[PosInt] | None = later(
        None
    )  # image_folder: resize to [H, W] (or N: N x N); None: as the files
    color: Literal["grey", "rgb"] | None = later(
        None
    )  # decode images as greyscale or RGB; None: RGB when any file is colour
    test_fraction: Annotated[float, OpenUnit] | None = later(
        None
    )  # one folder, no train/ + test/: share drawn as the test split
    images: str | None = later(
        None
    )  # mask_folder: where an image is, e.g. "images/*" or "image_*.png"; * is the pair's id
    masks: str | None = later(None)  # mask_folder: where its mask is, e.g. "masks/*" or "label_*.png"


FOLDER_KEYS = ("image_size", "color", "test_fraction", "images", "masks")


@dataclass
class TrainCfg:
    epochs: PosInt = 26
    batch_size: PosInt = 64
    patience: PosInt | None = None  # early stopping: epochs without a better validation metric
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    deterministic: bool = False  # bitwise repeatable on CPU (slower)
    amp: bool = True  # bf16 autocast on CUDA and on CPUs with native bf16 (bench.train.amp_enabled)
    eval_batch_size: PosInt = 1000
    threads: PosInt | None = None  # torch CPU threads; None -> torch default
    # How fast, not what: threads and these two change only floating-point rounding, so they are left out of the run
    # key (bench.spec.SPEED_KEYS).
    channels_last: bool = (
        True  # NHWC memory layout for the network and its inputs (faster convolutions: results/perf.md)
    )
    # torch.compile the training step ("none": not; not "off", which YAML reads as false); reduce-overhead: + CUDA graphs
    compile: Literal["none", "default", "reduce-overhead"] = "none"
    # Exponential moving average of the weights (and BN buffers) with this decay per optimizer step; validation, the
    # best epoch's weights (best.pt, export) and the test use the average. null: the raw weights, as before the key.
    ema: Annotated[float, OpenUnit] | None = later(None)


@dataclass
class AugmentCfg:
    """Batched, on-device augmentation; every key is off at its default."""

    flips: bool = False  # the 8 flips/rotations by 90 degrees (dihedral group)
    rotate: Annotated[float, Range(0, 180)] = 0.0  # max rotation in degrees
    translate: Annotated[float, Range(0, 1, high_open=True)] = 0.0  # max shift as a fraction of the image size
    scale: Annotated[float, Range(0, 1, high_open=True)] = 0.0  # max relative zoom in/out
    elastic: NonNegFloat = 0.0  # elastic deformation magnitude in pixels (0: off)
    intensity: Annotated[float, Range(0, 1, high_open=True)] = 0.0  # max relative brightness/contrast jitter


@dataclass
class EvalCfg:
    tta: bool = False  # average predictions over the 8 flips/rotations
    threshold: Annotated[float, OpenUnit] = 0.5  # segmentation: probability above which a pixel is foreground
    # segmentation: after training, choose on validation the removal of small objects and the filling of holes
    # (bench/postprocess.py) that is best by pixel Dice (dice) or pooled object F1 (obj_f1_pooled); none: no post-processing
    postprocess: Literal["none", "dice", "obj_f1_pooled"] = later("none")
    # segmentation: reflect-pad every side of an input by this many pixels before the network and crop the output
    # back (bench.inference.with_border), in every evaluation and in the exported graph: glands cut by the image
    # edge then see mirrored context instead of the network's zero padding
    border: NonNegInt = later(0)


REGISTRY_SECTIONS = ("model", "optim", "sched", "loss")


@dataclass
class Config:
    task: str
    model: dict[str, Any]
    optim: dict[str, Any] = field(default_factory=lambda: {"name": "adam", "lr": 1e-3})
    sched: dict[str, Any] = field(default_factory=lambda: {"name": "none"})
    loss: dict[str, Any] = field(default_factory=lambda: {"name": "default"})
    train: TrainCfg = field(default_factory=TrainCfg)
    data: DataCfg = field(default_factory=DataCfg)
    augment: AugmentCfg = field(default_factory=AugmentCfg)
    eval: EvalCfg = field(default_factory=EvalCfg)
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for section, cls in SECTION_TYPES.items():  # later keys at their default: absent (the run key hashes this dict)
            for f in dataclasses.fields(cls):
                if f.metadata.get("later") and d[section][f.name] == f.default:
                    del d[section][f.name]
        return d

    def copy(self, **changes: Any) -> Config:
        """A deep copy with top-level ``changes`` (e.g. ``seed``): runs never share a section, so
        setting one run's data root or device cannot leak into another's."""
        return dataclasses.replace(copy.deepcopy(self), **changes)


SECTION_TYPES: dict[str, type] = {"train": TrainCfg, "data": DataCfg, "augment": AugmentCfg, "eval": EvalCfg}


def config_hash(d: dict[str, Any]) -> str:
    """Short content hash of a resolved config dict (key order does not matter)."""
    blob = json.dumps(d, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


# --------------------------------------------------------------------------- type checks


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Annotated:
        return _type_name(typing.get_args(tp)[0])
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        return " or ".join(map(repr, typing.get_args(tp)))
    if origin in (list, tuple):
        args = typing.get_args(tp)
        return f"list of {_type_name(args[0])}" if args else "list"
    return getattr(tp, "__name__", str(tp))


def check_value(value: Any, tp: Any, where: str) -> Any:
    """Return ``value`` coerced to ``tp`` (int -> float, list -> tuple) or raise ConfigError;
    a :class:`Range` in ``Annotated[...]`` is enforced (RangeError).  One checker per kind of type
    (:data:`_CHECKERS`); a type of no kind there (``Any``, a class) takes any value as is."""
    if tp is Any or tp is typing.Any:
        return value
    origin = typing.get_origin(tp)
    checker = _CHECKERS.get(origin if origin is not None else tp)
    return value if checker is None else checker(value, tp, where)


def _mismatch(value: Any, tp: Any, where: str) -> ConfigError:
    return ConfigError(f"{where}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")


def _check_literal(value: Any, tp: Any, where: str) -> Any:
    """``Literal[a, b]``: one of the choices."""
    choices = typing.get_args(tp)
    if value in choices:
        return value
    raise ConfigError(f"{where}: expected one of {', '.join(map(repr, choices))}, got {value!r}")


def _check_annotated(value: Any, tp: Any, where: str) -> Any:
    """``Annotated[T, Range(...)]``: a T, then inside every :class:`Range` among the annotations."""
    base, *extras = typing.get_args(tp)
    value = check_value(value, base, where)
    for r in extras:
        if isinstance(r, Range) and not r.contains(value):
            raise RangeError(f"{where}: must be {r}, got {value!r}")
    return value


def _check_union(value: Any, tp: Any, where: str) -> Any:
    """``A | B`` (``Optional[A]``): the first member that takes the value."""
    for arg in typing.get_args(tp):
        try:
            return check_value(value, arg, where)
        except RangeError:
            raise  # the type fits, the number does not: say so, not "expected int or null"
        except ConfigError:
            continue
    raise _mismatch(value, tp, where)


def _scalar(accepts: Callable[[Any], bool], convert: Callable[[Any], Any] = lambda v: v) -> Callable[..., Any]:
    """The checker of a plain type: ``value`` when ``accepts(value)`` (converted), else the mismatch."""

    def check(value: Any, tp: Any, where: str) -> Any:
        if accepts(value):
            return convert(value)
        raise _mismatch(value, tp, where)

    return check


def _is_number(value: Any, kinds: tuple[type, ...]) -> bool:
    return isinstance(value, kinds) and not isinstance(value, bool)  # True is an int to Python, not to a spec


def _check_sequence(value: Any, tp: Any, where: str) -> Any:
    """``list[T]``, ``tuple[T, ...]`` (or bare): a list or tuple whose items are each a T, given back as the
    annotated container (a YAML list becomes a tuple where a tuple is wanted)."""
    if not isinstance(value, (list, tuple)):
        raise _mismatch(value, tp, where)
    args = typing.get_args(tp)
    inner = args[0] if args else Any
    items = [check_value(v, inner, f"{where}[{i}]") for i, v in enumerate(value)]
    return tuple(items) if (typing.get_origin(tp) or tp) is tuple else items


# kind of type (``typing.get_origin``, else the type itself) -> its checker ``(value, tp, where) -> value``
_CHECKERS: dict[Any, Callable[[Any, Any, str], Any]] = {
    typing.Literal: _check_literal,
    Annotated: _check_annotated,
    typing.Union: _check_union,
    types.UnionType: _check_union,
    type(None): _scalar(lambda v: v is None),
    bool: _scalar(lambda v: isinstance(v, bool)),
    int: _scalar(lambda v: _is_number(v, (int,))),
    float: _scalar(lambda v: _is_number(v, (int, float)), float),
    str: _scalar(lambda v: isinstance(v, str)),
    list: _check_sequence,
    tuple: _check_sequence,
    dict: _scalar(lambda v: isinstance(v, dict)),  # as is: a registry section's arguments are checked by its factory
}


def unknown_key_message(where: str, key: str, valid: list[str]) -> str:
    if not valid:
        return f"{where}: unknown key {key!r}; this takes no keys (to use one, pick a `name` that does)"
    return f"{where}: unknown key {key!r}; valid keys (closest first): {', '.join(closest_first(key, valid))}"


def build_section(cls: type, raw: Any, where: str) -> Any:
    """Build dataclass ``cls`` from dict ``raw``, rejecting unknown keys and wrong types."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls, include_extras=True)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs, errors = {}, []
    for key, value in raw.items():  # every wrong key of the section is said at once, one line each
        try:
            if key not in names:
                raise ConfigError(unknown_key_message(where, str(key), names))
            kwargs[key] = check_value(value, hints[key], f"{where}.{key}")
        except ConfigError as e:
            errors.append(str(e))
    raise_all(errors)
    return cls(**kwargs)


def raise_all(errors: list[str]) -> None:
    """One ConfigError holding every problem found, one per line (the CLI prints each as its own error line)."""
    if errors:
        raise ConfigError("\n".join(dict.fromkeys(errors)))


def check_factory_kwargs(
    fn: Callable[..., Any], raw: dict[str, Any], where: str, skip: tuple[str, ...] = (), needs: tuple[str, ...] = ()
) -> dict[str, Any]:
    """Check ``raw`` (without ``name``) against the keyword parameters of factory ``fn``.

    Parameters listed in ``skip`` are supplied by the harness (e.g. ``params`` of an
    optimizer) and may not be set from a spec; those in ``needs`` the harness passes, so ``fn``
    must take them (a user's factory that does not is an error here, not a TypeError mid-run).
    A parameter without a default must be set.  A factory taking ``**kwargs`` accepts any other
    key, unchecked.
    """
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where}.name: cannot read the factory's signature ({e})") from None
    try:  # a class's keyword arguments are its __init__'s
        hints = typing.get_type_hints(fn.__init__ if isinstance(fn, type) else fn, include_extras=True)
    except Exception:  # a user's annotations that do not resolve (names imported under TYPE_CHECKING): types unchecked
        hints = {}
    params = sig.parameters
    var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    keyword = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    names = [p for p in params if p not in skip and params[p].kind in keyword]
    missing = [n for n in needs if not var_kw and (n not in params or params[n].kind not in keyword)]
    if missing:
        raise ConfigError(
            f"{where}.name: the factory {getattr(fn, '__qualname__', fn)}{sig} must take the keyword "
            f"argument{'s' if len(missing) > 1 else ''} {', '.join(missing)}: the harness passes "
            f"{', '.join(needs)} to every {where.rpartition('.')[2] or 'factory'} factory"
        )
    out, errors = {}, []
    for key, value in raw.items():
        try:
            if key not in names and not var_kw:
                raise ConfigError(unknown_key_message(where, str(key), names))
            out[key] = check_value(value, hints.get(key, Any), f"{where}.{key}")
        except ConfigError as e:
            errors.append(str(e))
    raise_all(errors)
    unset = [n for n in names if params[n].default is inspect.Parameter.empty and n not in raw]
    if unset:
        raise ConfigError(
            f"{where}: missing {', '.join(map(repr, unset))}: the factory {getattr(fn, '__qualname__', fn)} "
            f"has no default for {'them' if len(unset) > 1 else 'it'}"
        )
    return out
