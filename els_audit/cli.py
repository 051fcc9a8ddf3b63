"""``els-audit MODEL``: the command line, a thin shell over :func:`els_audit.audit.run_audit`.

The command builds an :class:`~els_audit.audit.AuditConfig`, calls ``run_audit`` (the same
function a Python user calls) and writes the report with
:func:`~els_audit.outputs.write_outputs`.

Exit codes: 0 every check passed (warnings allowed); 1 a ``--fail-on`` rule failed; 2 the
audit could not run (bad input: one line on stderr saying what is wrong and what to do, no
traceback unless ``--debug``; nothing half-written is left behind).
"""

from __future__ import annotations

import os
import sys
import time
import traceback
from pathlib import Path

import click

from .console import (ConsoleCapture, Terminated, pending_termination, raise_if_terminated, signals_raise,
                      silence_after_exit, text)
from .terminal import TerminalProgress
from .models.settings import CALL_STYLES, PREDICTIONS, TIME_INPUTS

__all__ = ["main", "EXIT_OK", "EXIT_CHECK_FAILED", "EXIT_CANNOT_RUN"]

EXIT_OK = 0
EXIT_CHECK_FAILED = 1
EXIT_CANNOT_RUN = 2


class _Command(click.Command):
    """A click command whose usage errors are one line on stderr and exit code 2."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):  # noqa: D102
        try:
            rv = super().main(args=args, prog_name=prog_name, complete_var=complete_var, standalone_mode=False,
                              **extra)
        except click.ClickException as exc:
            click.echo(f"els-audit: error: {text(exc.format_message())} (see els-audit --help)", err=True)
            rv = EXIT_CANNOT_RUN
        except click.exceptions.Abort:
            click.echo("els-audit: error: aborted", err=True)
            rv = EXIT_CANNOT_RUN
        except KeyboardInterrupt:
            click.echo("els-audit: error: interrupted; nothing was written", err=True)
            rv = EXIT_CANNOT_RUN
        except BaseException as exc:  # noqa: BLE001 - nothing may leave with a traceback or another code
            click.echo(f"els-audit: error: internal error ({type(exc).__name__}: {text(exc, 300)}); report it",
                       err=True)
            rv = EXIT_CANNOT_RUN
        code = rv if isinstance(rv, int) else EXIT_OK
        if standalone_mode:
            silence_after_exit()     # atexit handlers and threads the model left must not print
            sys.exit(code)
        return code


@click.command(cls=_Command, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.argument("model")
@click.option("--data", "data", metavar="SPEC", default=None,
              help="Training data spec, e.g. mnist5k:size=32 or train.npz "
                   "(default: what the model's zoo config names).")
@click.option("--data-limit", type=int, default=None,
              help="Machines use a seeded class-balanced subset of this many images (0 = all; cost grows linearly). "
                   "Default: planned within --budget (the whole set when it fits).")
@click.option("--trust-model", is_flag=True,
              help="Allow what can run code from the model's files: pickles, TorchScript, .pt2, and code a "
                   "sidecar or config names that is not a registered architecture.")
@click.option("--arch", metavar="MODULE:CLASS", default=None,
              help="Architecture for weights-only files: pkg.module:Class, path/to/file.py:Class (or a function "
                   "there that returns the model), or a registered architecture name.")
@click.option("--arch-kwargs", metavar="JSON", default=None,
              help="Keyword arguments for --arch as a JSON object, e.g. '{\"width\": 64}'.")
@click.option("--format", "format_", metavar="NAME", default=None,
              help="Force a model loader instead of detecting the format (safetensors, state-dict, diffusers, "
                   "pickled-module, torchscript, torch-export, or an installed plugin's).")
@click.option("--state-dict-key", metavar="NAME", default=None,
              help="Entry of a training checkpoint dict that holds the weights (default: the one that fits "
                   "the architecture, EMA weights first).")
@click.option("--schedule", default=None, help="Noise schedule name (cosine-legacy, cosine, linear, ...).")
@click.option("--time", "--time-input", "time_input", type=click.Choice(TIME_INPUTS), default=None,
              help="What time value the model takes.")
@click.option("--predicts", "--prediction", "prediction", type=click.Choice(PREDICTIONS),
              default=None, help="What the model predicts.")
@click.option("--call-style", type=click.Choice(CALL_STYLES), default=None,
              help="How the model is called: model(x, t), model(t, x) or a diffusers UNet.")
@click.option("--num-train-steps", type=int, default=None, help="Training steps T (for --time index).")
@click.option("--data-range", default=None, metavar="LO,HI",
              help="Pixel range the model was trained on (default -1,1; e.g. 0,1).")
@click.option("--budget", default="10m", show_default=True, metavar="DURATION",
              help="Time for the whole audit (90s, 10m, 1h; none = no limit). A short probe of this machine plans "
                   "the most faithful settings that fit: the whole data set first, then 20 steps, then calibration "
                   "seeds, then seeds. Settings given as flags are kept.")
@click.option("--steps", type=int, default=None, help="DDIM steps (network and machines); paper: 20. Default: planned.")
@click.option("--seeds", type=int, default=None, help="Evaluation seeds; paper: 100. Default: planned.")
@click.option("--calibration-seeds", type=int, default=None,
              help="Seeds for calibrating the scales; paper: 8. Default: planned.")
@click.option("--seed-offset", type=int, default=0, show_default=True, help="First evaluation seed.")
@click.option("--conditional", is_flag=True, help="Class-conditional model: seed i gets label i mod n_classes.")
@click.option("--label", type=int, default=None, help="One class label for every seed (implies --conditional).")
@click.option("--machine", type=click.Choice(["auto", "ELS", "bbELS", "LS"]), default="auto", show_default=True,
              help="Machine kind; auto follows the equivariance verdict.")
@click.option("--dictionary", type=click.Choice(["periodic", "valid"]), default="periodic", show_default=True,
              help="ELS dictionary: periodic (theory) or valid (the authors' public code).")
@click.option("--scales", default="auto", show_default=True, metavar="auto|erf|calibrate|K,K,...",
              help="Patch size per step: auto (calibrate near the ERF prediction), erf, calibrate (every odd k), "
                   "or one odd size per step (index 0 = least noise).")
@click.option("--support", type=click.Choice(["square", "erf", "erf-area", "data", "border"]), default="square",
              show_default=True,
              help="The machine's window per step: square (the paper); erf: weighted by the measured x0 ERF; "
                   "erf-area: the k*k offsets where the ERF is largest; data: the training data's locality mask "
                   "(Lukoianov et al.); border: a second calibrated size for the border band.  bench/fidelity.md "
                   "compares them.")
@click.option("--criterion", type=click.Choice(["x0", "cosine"]), default="x0", show_default=True,
              help="Calibration criterion (cosine = the paper's).")
@click.option("--compare-criteria", is_flag=True,
              help="Also calibrate with the other criterion and show its scales beside (doubles calibration).")
@click.option("--spread", type=int, default=1, show_default=True,
              help="auto scales: try the ERF prediction +-2*spread.")
@click.option("--memorized-threshold", type=float, default=1 / 3, show_default="1/3",
              help="Nearest/second-nearest distance ratio below which a sample counts as memorised.")
@click.option("--only", type=click.Choice(["structure"]), default=None,
              help="Run part of the audit: 'structure' = trace, receptive field, breakers, verdict and the ERF "
                   "(no sanity check, no machines; works on untrained weights).")
@click.option("--out", "out", type=click.Path(path_type=Path), default=None,
              help="Report folder (default: reports/<model name>).")
@click.option("--json", "json_out", metavar="PATH|-", default=None, help="Also write summary JSON here ('-' = stdout).")
@click.option("--mlflow", "mlflow_experiment", metavar="EXPERIMENT", default=None,
              help="Also log the audit to MLflow (needs els-audit[mlflow]): a run in EXPERIMENT of the tracking "
                   "store MLFLOW_TRACKING_URI names, with params, metrics, tags and the report as artifacts.")
@click.option("--mlflow-model", metavar="NAME/VERSION", default=None,
              help="With --mlflow: tag this registered model version with the verdict and pass/fail.")
@click.option("--model-card", "model_card", metavar="PATH", type=click.Path(path_type=Path), default=None,
              help="Also write a Hugging Face model card here: model-index metadata with the audit's numbers and "
                   "a section in words (a file els-audit did not write is never replaced).")
@click.option("--fail-on", "fail_on", multiple=True, metavar="RULE",
              help="Exit 1 when RULE holds, e.g. 'memorized_fraction>0.05' or 'median_r<0.8' (repeatable).")
@click.option("--rules", "rules_file", type=click.Path(path_type=Path), default=None,
              help="TOML file with fail_on = [...] rules (for registries).")
@click.option("--no-report", is_flag=True, help="Skip the HTML (summary.json and arrays.npz are still written).")
@click.option("--threads", type=int, default=1, show_default=True,
              help="torch threads (on a loaded 2-core machine one is often fastest).")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True,
              help="Where the network and the machines run (the same exact algorithm; GPU memory per machine: "
                   "--memory-budget).")
@click.option("--memory-budget", "memory_budget", metavar="SIZE", default="2G", show_default=True,
              help="Memory each machine keeps to (each Ray actor's with --ray), e.g. 2G, 512M.")
@click.option("--ray", "ray", metavar="auto|ADDRESS", default=None,
              help="Shard the machines' dictionary over Ray actors (needs els-audit[ray]): 'auto' joins this "
                   "machine's Ray cluster or starts a local one; else a cluster address.  Same answers.")
@click.option("-q", "--quiet", is_flag=True, help="No progress on stderr.")
@click.option("--debug", is_flag=True, help="Show the traceback when the audit cannot run.")
@click.pass_context
def main(ctx: click.Context, **opts) -> int:
    """Audit a trained image diffusion model: receptive fields, equivariance, a fitted
    Equivariant Local Score machine, seed-by-seed prediction and novelty.

    MODEL is a model file or folder, or zoo:NAME for a bundled model (zoo:resnet-zeros,
    zoo:resnet-circular, zoo:unet-zeros, zoo:unet-attention).

    Exit codes: 0 checks pass (warnings allowed), 1 a --fail-on rule failed, 2 the audit
    could not run.
    """
    from .audit import AuditError, model_name, run_audit
    from .machines.sharded import ShardError
    from .outputs import plan_outputs, write_outputs
    from .serialize import dumps

    quiet, debug = opts["quiet"], opts["debug"]
    console = ConsoleCapture(enabled=not debug)

    def lines(line: str) -> None:
        if not quiet:
            click.echo(f"els-audit {text(line)}", err=True, file=console.err)

    # at a terminal, a bar per long stage (els_audit.terminal); in logs and pipes, lines
    progress = lines if quiet or not _is_terminal(sys.stderr) else TerminalProgress(lambda: console.err)

    started, plan, written = time.time(), None, False

    def stopped(exc: BaseException) -> int:
        what = "interrupted" if isinstance(exc, KeyboardInterrupt) else f"terminated by {exc}"
        # NB: a signal during the final renames is held until they are done (els_audit.atomic)
        done = written or (plan is not None and _written_since(plan.folder / "summary.json", started))
        return _error(f"{what}; " + ("the report had been written" if done else "nothing was written"))
    try:
        with signals_raise(), console:
            cfg = _config(opts)
            if opts["json_out"] == "-" and not _stdout_open():
                raise AuditError("--json - asks for the summary on stdout, but stdout is closed; give a file path")
            # every output is checked before any work, and written all together at the end
            out = opts["out"] if opts["out"] is not None else Path("reports") / model_name(opts["model"])
            plan = plan_outputs(out, opts["json_out"], html=not opts["no_report"], card=opts["model_card"])
            mlflow_log = _mlflow_logger(opts["mlflow_experiment"], opts["mlflow_model"])
            try:
                result = run_audit(cfg, progress=progress)
                raise_if_terminated()                     # a signal whose exception a library lost
            finally:
                if isinstance(progress, TerminalProgress):
                    progress.close()                      # before any error line
            folder = write_outputs(result, plan)
            written = True
            if mlflow_log is not None:
                run_id = mlflow_log(result, folder)
                progress(f"mlflow: run {run_id} in experiment {opts['mlflow_experiment']}")
    except (KeyboardInterrupt, Terminated) as exc:
        return stopped(exc)
    except (ValueError, OSError, ShardError) as exc:
        # NB: a signal inside a library's C code (Ray's ray.get) can surface as another error
        lost = pending_termination()
        return stopped(lost) if lost else _error(text(exc), debug)
    except Exception as exc:  # noqa: BLE001 - exit code 2 for anything that stops the audit
        lost = pending_termination()
        if lost:
            return stopped(lost)
        return _error(f"internal error ({type(exc).__name__}: {text(exc, 300)}); rerun with --debug for the "
                      f"traceback and report it", debug)
    except BaseException as exc:  # noqa: BLE001 - SystemExit & co. from the model's own code
        arg = f"({text(exc.args[0], 100)!r})" if exc.args else ""
        return _error(f"the audit was stopped by {type(exc).__name__}{arg} raised in the model's or another "
                      f"library's code; nothing was written", debug)
    if plan.stdout:
        try:
            click.echo(dumps(result.to_dict()), nl=False)
            sys.stdout.flush()
        except OSError as exc:
            return _error(f"cannot write the summary to stdout ({text(exc.strerror or exc)}); the report folder "
                          f"{folder} was written")
    if console.lines:
        progress(f"libraries or the model printed {len(console.lines)} line(s) while the audit ran, kept off the "
                 f"console (rerun with --debug to see them); the first: {text(console.lines[0], 160)}")
    fails = [c for c in result.checks if c.status == "fail"]
    warns = [c for c in result.checks if c.status == "warn"]
    progress(f"report: {folder / 'index.html' if plan.html else folder}")
    progress(f"{len(result.checks) - len(fails) - len(warns)} pass, {len(warns)} warn, {len(fails)} fail"
             + (": " + ", ".join(c.name for c in fails) if fails else ""))
    if fails and quiet:
        click.echo("els-audit: failed: " + ", ".join(c.name for c in fails), err=True)
    return result.exit_code


def _config(opts: dict):
    """The :class:`~els_audit.audit.AuditConfig` the options describe (the rules file's rules
    added to ``--fail-on``)."""
    from .audit import AuditConfig, parse_arch_kwargs, parse_scales
    from .config import parse_bytes, parse_duration
    from .checks import load_rules

    rules = list(opts["fail_on"])
    if opts["rules_file"] is not None:
        rules += [r.text for r in load_rules(opts["rules_file"])]
    passed = {k: opts[k] for k in ("model", "data", "trust_model", "arch", "state_dict_key", "schedule", "time_input",
                                   "prediction", "call_style", "num_train_steps", "data_range", "steps", "seeds",
                                   "calibration_seeds", "seed_offset", "conditional", "label", "machine", "dictionary",
                                   "criterion", "compare_criteria", "spread", "memorized_threshold", "threads", "device",
                                   "only", "ray", "support")}
    return AuditConfig(**passed, data_limit=opts["data_limit"], budget=parse_duration(opts["budget"]),
                       arch_kwargs=parse_arch_kwargs(opts["arch_kwargs"]), format=opts["format_"],
                       scales=parse_scales(opts["scales"]), fail_on=tuple(rules),
                       memory_budget=parse_bytes(opts["memory_budget"]))


def _mlflow_logger(experiment, model_version):
    """A function that logs the result to MLflow, checked before any work (the extra is
    installed, the flags fit together); None without --mlflow."""
    if experiment is None:
        if model_version is not None:
            raise ValueError("--mlflow-model needs --mlflow EXPERIMENT (the run whose verdict tags the version)")
        return None
    registered = None
    if model_version is not None:
        name, sep, version = str(model_version).rpartition("/")
        if not sep or not name or not version.isdigit():
            raise ValueError(f"--mlflow-model {model_version!r} is not NAME/VERSION (e.g. my-unet/3)")
        registered = (name, version)
    try:
        from .integrations.mlflow import check_model_version, log_audit
    except ImportError as exc:
        raise ValueError(f"--mlflow needs the MLflow extra ({exc}); pip install 'els-audit[mlflow]'") from None
    if registered is not None:
        check_model_version(*registered)

    def log(result, folder):
        try:
            return log_audit(result, report_folder=folder, experiment=experiment, registered_model=registered)
        except Exception as exc:  # noqa: BLE001 - MLflow's errors (store, network) are not ours
            raise OSError(f"the report {folder} was written, but logging it to MLflow failed: "
                          f"{type(exc).__name__}: {text(str(exc), 200)}") from exc
    return log


def _is_terminal(stream) -> bool:
    try:
        return bool(stream.isatty()) and os.environ.get("TERM") != "dumb"
    except (AttributeError, ValueError, OSError):
        return False


def _error(message: str, debug: bool = False) -> int:
    """Print the one error line (after the traceback with ``--debug``); returns exit code 2."""
    if debug:
        traceback.print_exc(file=sys.stderr)
    click.echo(f"els-audit: error: {message}", err=True)
    return EXIT_CANNOT_RUN


def _stdout_open() -> bool:
    try:
        if sys.stdout is sys.__stdout__:
            os.fstat(1)                      # a closed file descriptor 1 raises
        return sys.stdout is not None
    except OSError:
        return False


def _written_since(path: Path, t: float) -> bool:
    try:
        return path.stat().st_mtime >= t
    except OSError:
        return False


if __name__ == "__main__":  # python -m els_audit.cli
    main()
