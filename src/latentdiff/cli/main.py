"""The `latentdiff` command: one subcommand per user task, each in the module of its command group.

Commands are imported only when they run or show their own --help, so `latentdiff --help` lists
them all without importing torch. Every user error (bad option, missing file, invalid config)
prints one line starting with ``latentdiff: error:`` and exits with code 2, without a traceback.
"""

from __future__ import annotations

import sys
from importlib import import_module

import click

from latentdiff import __version__
from latentdiff.cli.options import one_line
from latentdiff.errors import LatentDiffError
from latentdiff.utils.files import describe_os_error
from latentdiff.utils.logs import configure_logging

# name: ("module:command", the one-line help that `latentdiff --help` shows without importing the module)
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("latentdiff.cli.train:demo",
             "train a small model on the bundled data (CPU, minutes) and write samples.png"),
    "train-autoencoder": ("latentdiff.cli.train:train_autoencoder",
                          "stage 1: train the KL autoencoder (reports PSNR/SSIM)"),
    "train": ("latentdiff.cli.train:train",
              "stage 2: train the latent diffusion model (needs stage 1 in RUN_DIR)"),
    "sample": ("latentdiff.cli.sample:sample", "generate images from a trained model"),
    "train-classifier": ("latentdiff.cli.train:train_classifier",
                         "train a noise-aware classifier for classifier guidance"),
    "download": ("latentdiff.cli.info:download",
                 "download Fashion-MNIST or the emoji set (checksum-verified), or synthesise the spoken digits"),
    "info": ("latentdiff.cli.info:info", "describe a model directory"),
    "eval": ("latentdiff.cli.eval:evaluate",
             "score a model or a samples file: FD next to its real-vs-real floor, precision/recall"),
    "eval-autoencoder": ("latentdiff.cli.eval:evaluate_autoencoder_command",
                         "score an autoencoder's reconstructions: PSNR, SSIM, recon FD next to its floor"),
    "edit": ("latentdiff.cli.control:edit", "re-imagine an image, keeping its layout (SDEdit)"),
    "inpaint": ("latentdiff.cli.control:inpaint", "regenerate a masked region of an image, keep the rest"),
    "repair": ("latentdiff.cli.control:repair",
               "remove salt-and-pepper noise and scratches (or a given mask) by inpainting"),
    "interpolate": ("latentdiff.cli.control:interpolate", "a strip and animated GIF morphing from A to B"),
    "combine": ("latentdiff.cli.control:combine", "mix several images into one"),
    "export": ("latentdiff.cli.export:export", "export a model: ONNX graphs (ONNX Runtime) or a diffusers folder"),
    "serve": ("latentdiff.cli.serve:serve", "HTTP API with a job queue and a web UI (127.0.0.1 by default)"),
    "verify": ("latentdiff.cli.provenance:verify",
               "check images for provenance: C2PA signature, invisible watermark, recorded fields"),
    "keys": ("latentdiff.cli.provenance:keys", "make or show this installation's watermark and signing keys"),
}


class LazyGroup(click.Group):
    """A click group whose commands are "module:attribute" strings, imported on first use."""

    def __init__(self, *args, lazy: dict[str, tuple[str, str]], **kwargs):
        super().__init__(*args, **kwargs)
        self.lazy = lazy

    def list_commands(self, ctx) -> list[str]:
        return list(self.lazy)

    def get_command(self, ctx, name: str) -> click.Command | None:
        if name not in self.lazy:
            return None
        module, attribute = self.lazy[name][0].split(":")
        return getattr(import_module(module), attribute)

    def resolve_command(self, ctx, args):
        if args[0] not in self.lazy and not args[0].startswith("-"):
            raise click.UsageError(f"argument COMMAND: invalid choice: {args[0]!r} "
                                   f"(choose from {', '.join(self.lazy)})", ctx)
        return super().resolve_command(ctx, args)

    def format_commands(self, ctx, formatter) -> None:
        """The command list from the one-line helps of `lazy`: no command module is imported."""
        with formatter.section("Commands"):
            formatter.write_dl([(name, text) for name, (_, text) in self.lazy.items()])


@click.group(cls=LazyGroup, lazy=COMMANDS, context_settings={"help_option_names": ["-h", "--help"],
                                                              "max_content_width": 110},
             epilog="Quick start: `latentdiff demo`, then `latentdiff sample --model pretrained:fashion-mnist "
                    "--n 64 --out samples.png`. `latentdiff COMMAND --help` explains a command.")
@click.version_option(__version__, "--version", prog_name="latentdiff", message="%(prog)s %(version)s")
def cli():
    """Latent diffusion models: train an autoencoder, train a diffusion model in its latent space, and sample
    from it."""


def _param_name(param: click.Parameter) -> str:
    if isinstance(param, click.Option):
        return max(param.opts, key=len)
    return param.human_readable_name


def error_message(e: click.ClickException) -> str:
    """A click error as one message in the words of the other errors: "argument --n: must be ..."."""
    if isinstance(e, click.MissingParameter) and e.param is not None:
        text = f"missing {e.param.param_type_name} {_param_name(e.param)}"
    elif isinstance(e, click.BadParameter) and e.param is not None:
        text = f"argument {_param_name(e.param)}: {e.message}"
    else:
        text = e.format_message()
    ctx = getattr(e, "ctx", None)
    return f"{text} (see `{ctx.command_path} --help`)" if ctx is not None else text


def _fail(message: str) -> int:
    sys.stderr.write(f"latentdiff: error: {one_line(message)}\n")
    return 2


def main(argv: list[str] | None = None) -> int:
    """Run `latentdiff ARGV` (default: sys.argv[1:]); returns the exit code (0, 2 for user errors, 130)."""
    configure_logging()
    args = sys.argv[1:] if argv is None else [str(a) for a in argv]
    try:
        if not args:  # no command: the overview, as an error (a script that forgot its command should fail)
            click.echo(cli.get_help(click.Context(cli, info_name="latentdiff")))
            return 2
        with cli.make_context("latentdiff", args) as ctx:
            cli.invoke(ctx)
    except click.exceptions.Exit as e:  # --help, --version
        return e.exit_code
    except click.ClickException as e:
        return _fail(error_message(e))
    except LatentDiffError as e:
        return _fail(str(e))
    except OSError as e:  # the environment (permissions, read-only or full disk), not a bug
        return _fail(describe_os_error(e))
    except (KeyboardInterrupt, click.Abort):
        sys.stderr.write("latentdiff: interrupted\n")
        return 130
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
