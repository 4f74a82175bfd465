"""What the `latentdiff` commands share: option value types, the common options, the config options.

Nothing here imports torch: `latentdiff --help` and every error about an option value stay fast.
Choices that come from a registry (samplers, timestep spacings, compile modes, precisions) are read
from it when a value is checked or a command's own help is shown.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from importlib import import_module
from types import SimpleNamespace

import click

DEVICES = ("auto", "cpu", "cuda")
PRESET_NAMES = ("demo", "fashion-mnist", "emoji", "spoken-digits", "tiny", "default")  # pipeline.presets.PRESETS (a test checks)
MAX_SEED = 2**63 - 1
MAX_COUNT = 1_000_000


def one_line(text: str) -> str:
    """`text` with control and other unprintable characters escaped (\\n, \\x1b, ...): a message that quotes a
    file name or option value stays on one line and cannot drive the terminal."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


# --- value types ---------------------------------------------------------------------------------


class Bounded(click.ParamType):
    """An int or float with low <= value <= high (low < value when `open_low`); `requirement` is the
    message's "must be ..." part. Text is read by int()/float() themselves, so " 7 ", "1_000" and "+4" count."""

    def __init__(self, cast: type, low=None, high=None, *, open_low: bool = False, requirement: str):
        self.cast, self.low, self.high, self.open_low, self.requirement = cast, low, high, open_low, requirement
        self.name = "integer" if cast is int else "number"

    def parse(self, value):
        """The checked value of `value`; ValueError with the user-facing message otherwise."""
        kind = "an integer" if self.cast is int else "a number"
        try:
            number = self.cast(value)
        except (TypeError, ValueError):
            raise ValueError(f"expected {kind}, got {value!r}") from None
        ok = ((self.cast is int or math.isfinite(number)) and  # isfinite(a 400-digit int) would overflow
              (self.low is None or (number > self.low if self.open_low else number >= self.low))
              and (self.high is None or number <= self.high))
        if not ok:
            raise ValueError(f"{self.requirement}, got {value}")
        return number

    def convert(self, value, param, ctx):
        try:
            return self.parse(value)
        except ValueError as e:
            self.fail(str(e), param, ctx)


class Parsed(click.ParamType):
    """A value type from a function of the text that raises ValueError with the user-facing message."""

    def __init__(self, name: str, parse: Callable[[str], object]):
        self.name, self.parse = name, parse

    def convert(self, value, param, ctx):
        if not isinstance(value, str):  # a default, already parsed
            return value
        try:
            return self.parse(value)
        except ValueError as e:
            self.fail(str(e), param, ctx)


class OneOf(click.Choice):
    """click.Choice, case-sensitive, failing with "invalid choice: 'x' (choose from a, b)"."""

    def __init__(self, choices=()):
        super().__init__(tuple(choices), case_sensitive=True)

    def convert(self, value, param, ctx):
        if value in self.choices:
            return value
        self.fail(f"invalid choice: {value!r} (choose from {', '.join(self.choices)})", param, ctx)


class RegistryChoice(OneOf):
    """The names of a registry, "module:ATTRIBUTE", read on first use: defining the option does not import the
    registry's module (and torch with it), yet a newly registered sampler appears without touching the CLI."""

    def __init__(self, ref: str):
        self.ref = ref
        super().__init__()

    @property
    def choices(self) -> tuple[str, ...]:
        module, attribute = self.ref.split(":")
        return tuple(getattr(import_module(module), attribute))

    @choices.setter
    def choices(self, value):  # click.Choice.__init__ assigns it; the registry is the source
        pass


POSITIVE = Bounded(int, 1, requirement="must be a positive integer")
COUNT = Bounded(int, 1, MAX_COUNT, requirement=f"must be a positive integer (at most {MAX_COUNT})")
SEED = Bounded(int, 0, MAX_SEED, requirement="must be between 0 and 2^63-1")
NONNEG_INT = Bounded(int, 0, requirement="must be >= 0")
NONNEG_FLOAT = Bounded(float, 0, requirement="must be a finite number >= 0")
UNIT_FLOAT = Bounded(float, 0, 1, requirement="must be between 0 and 1")
STRENGTH = Bounded(float, 0, 1, open_low=True, requirement="must be in (0, 1]")

SAMPLERS = RegistryChoice("latentdiff.sampling.samplers:SAMPLERS")  # ddpm, ddim, euler, heun, dpmpp-2m, ...
SPACINGS = RegistryChoice("latentdiff.sampling.grids:ALL_SPACINGS")
COMPILE_MODES = RegistryChoice("latentdiff.pipeline.runtime:COMPILE_MODES")
PRECISIONS = RegistryChoice("latentdiff.pipeline.config:PRECISIONS")


# --- options -------------------------------------------------------------------------------------


def compose(*decorators):
    """Several click.option decorators as one, listed in --help in the order given."""
    def apply(f):
        for decorator in reversed(decorators):
            f = decorator(f)
        return f
    return apply


def model_option(required: bool = True, default: str | None = None, help: str | None = None):
    text = help or ("a model directory, or pretrained:NAME (e.g. pretrained:fashion-mnist)" if required else
                    f"a model directory or pretrained:NAME (default: {default})")
    extra = {} if default is None else {"default": default}  # click >= 8.3: an explicit default=None counts as given
    return click.option("--model", required=required, metavar="DIR", help=text, **extra)


def device_option(default: str | None = "auto", help: str = "default: auto"):
    return click.option("--device", type=OneOf(DEVICES), default=default, help=help)


def runtime_options():
    """Which runtime runs the networks: PyTorch, or ONNX Runtime over an export of `latentdiff export onnx`."""
    return compose(
        click.option("--runtime", type=OneOf(("torch", "onnx")), default="torch",
                     help="torch (default), or onnx: --model is then a folder written by `latentdiff export onnx` "
                          "and the networks run in ONNX Runtime on the CPU (extra `onnx`)"),
        click.option("--threads", type=Bounded(int, 1, 1024, requirement="must be between 1 and 1024"),
                     metavar="N", help="with --runtime onnx: ONNX Runtime's thread count (default: its own)"),
    )


def seed_option(default: int | None = 0, help: str = "random seed; same seed, same images (default: 0)"):
    return click.option("--seed", type=SEED, default=default, help=help)


def steps_option(help: str = "sampling steps (default: the model's, e.g. 50)"):
    return click.option("--steps", type=POSITIVE, metavar="N", help=help)


def guidance_option(help: str = "classifier-free guidance scale (1 = none; default: the model's)"):
    return click.option("--guidance", type=NONNEG_FLOAT, metavar="S", help=help)


def sampler_option(help: str):
    return click.option("--sampler", type=SAMPLERS, help=help)


def spacing_option(help: str = "timestep grid (default: trailing)"):
    return click.option("--spacing", type=SPACINGS, help=help)


def prompt_options(negative: bool = True):
    """--prompt (and --negative-prompt) for text-conditioned models."""
    opts = [click.option("--prompt", metavar="TEXT",
                         help="text to condition on (text models, e.g. pretrained:emoji); default: the empty prompt")]
    if negative:
        opts.append(click.option("--negative-prompt", metavar="TEXT",
                                 help="guide away from this text instead of the empty prompt (needs --guidance > 1)"))
    return compose(*opts)


def out_option(default: str, help: str):
    return click.option("--out", default=default, metavar="PATH", help=help)


def batch_size_option(default: int | None = 256, help: str = "images per batch (default: 256)"):
    return click.option("--batch-size", type=POSITIVE, default=default, metavar="N", help=help)


def no_progress_option(help: str = "plain log lines instead of a progress bar"):
    return click.option("--no-progress", is_flag=True, help=help)


def resume_option(help: str = "continue from the newest intact checkpoint in RUN_DIR"):
    return click.option("--resume", is_flag=True, help=help)


def overwrite_option(what: str = "this stage's"):
    return click.option("--overwrite", is_flag=True,
                        help=f"start over in a RUN_DIR that holds another run's {what} checkpoints (deletes them)")


def config_options():
    """The options of the training commands: a preset or YAML file, then overrides (--set parses YAML values;
    the other flags are typed and set their config field as given)."""
    return compose(
        click.option("--config", metavar="YAML", help="YAML config file (see configs/); may name a `preset:`"),
        click.option("--preset", type=OneOf(PRESET_NAMES),
                     help="start from a named preset instead of / below the YAML file (default: default)"),
        click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
                     help="override one config field with a YAML value, e.g. --set training.lr=5e-4 (repeatable)"),
        click.option("--run-dir", default="runs/latentdiff", metavar="DIR",
                     help="where checkpoints, samples and the final model go (default: runs/latentdiff)"),
        resume_option(),
        overwrite_option(),
        click.option("--data", metavar="SOURCE",
                     help="'bundled' (packaged 10k subset), 'fashion-mnist' (full IDX files) or a folder of images"),
        click.option("--data-dir", metavar="DIR", help="directory holding the four Fashion-MNIST IDX .gz files"),
        click.option("--image-size", type=POSITIVE, metavar="N", help="resize images to N×N"),
        click.option("--steps", type=POSITIVE, metavar="N", help="training steps for this stage"),
        click.option("--batch-size", type=POSITIVE, metavar="N", help="global batch size for this stage"),
        device_option(None, "where to train (default: auto)"),
        no_progress_option(),
    )


def config_fields(opts, stage_key: str) -> dict[str, object]:
    """The config fields that the typed flags of :func:`config_options` set (those given)."""
    fields = {"data.source": opts.data, "data.data_dir": opts.data_dir, "data.image_size": opts.image_size,
              f"{stage_key}.steps": opts.steps, f"{stage_key}.batch_size": opts.batch_size, "device": opts.device}
    return {key: value for key, value in fields.items() if value is not None}


def exclusive(ctx: click.Context, *names: str, required: bool = True) -> None:
    """At most one (with `required`, exactly one) of the options `names` ("--mask", "--rect") is given."""
    given = [n for n in names if ctx.params.get(n.lstrip("-").replace("-", "_")) is not None]
    if len(given) > 1:
        raise click.UsageError(f"argument {given[1]}: not allowed with argument {given[0]}", ctx)
    if required and not given:
        raise click.UsageError(f"one of the arguments {' '.join(names)} is required", ctx)


def with_namespace(f):
    """click passes each option as a keyword argument; a command reads them as one namespace (`opts.model`)."""
    @functools.wraps(f)
    def run(**options):
        return f(SimpleNamespace(**options))
    return run


# --- commands with documented arguments ----------------------------------------------------------


class _Argument(click.Argument):
    """A positional argument with a help text (click's own arguments have none)."""

    def __init__(self, *args, help: str | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.help = help


class Command(click.Command):
    """A click command whose --help also lists its positional arguments with their help texts."""

    def format_arguments(self, ctx, formatter):  # newer click calls this itself, before the options
        rows = [(p.human_readable_name, p.help) for p in self.get_params(ctx) if isinstance(p, _Argument) and p.help]
        if rows:
            with formatter.section("Arguments"):
                formatter.write_dl(rows)

    def format_options(self, ctx, formatter):
        if not hasattr(click.Command, "format_arguments"):
            self.format_arguments(ctx, formatter)
        super().format_options(ctx, formatter)


def argument(*decls, help: str, **kwargs):
    return click.argument(*decls, cls=_Argument, help=help, **kwargs)


def command(name: str, help: str):
    return click.command(name, cls=Command, help=help)
