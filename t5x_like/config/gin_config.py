"""Gin parsing for the launchers: files, bindings, search paths, clear errors.

Gin files configure library functions and classes directly through
`from __gin__ import dynamic_registration`, so library code carries no gin
decorators. Whatever goes wrong while parsing (a missing file, an unknown
configurable or parameter, a `%gin.REQUIRED` macro left unset) is raised before
any work starts, as a `GinConfigError` that names the offending item.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence

import gin

from t5x_like import errors

_REQUIRED_RE = re.compile(r"(\S+)/macro\.value set to `%gin\.REQUIRED`")
_UNRESOLVED_RE = re.compile(r"Couldn't resolve selector (\S+); <module '([^']+)'")
_LOCATION_RE = re.compile(r'In file "([^"]+)", line (\d+)')
# What gin appends to an exception raised inside a configurable it called.
_CALL_CONTEXT_RE = re.compile(r"\n  In call to configurable .*")
# The package folder, which holds the shipped `configs/` (package data; a link in a
# checkout), so `configs/...` files and includes resolve from any directory in an
# installed copy.
SHIPPED_CONFIGS_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Modules that moved when the package was regrouped by stage (issue 21): old -> new.
MOVED_MODULES = {old: f"{stage}.{old}" for stage, olds in {
    "config": "gin_config argument_types",
    "training": "run_config trainer optimizers xla_options preemption peer_watchdog aot",
    "parallel": "partitioning topologies",
    "checkpointing": "checkpoints integrity restore_causes",
    "reporting": "metrics param_table device_peaks",
    "decoding": "beam_search inference",
    "evaluation": "predictions checkpoint_eval",
    "launch": "launcher"}.items() for old in olds.split()} | {
    "train": "training.train_loop", "decoding": "decoding.decode",
    "evaluation": "evaluation.teacher_forced", "hf.init_from": "checkpointing.init_from"}
# Gin names of the shipped configs that changed with the move: old -> new.
RENAMED_CONFIGURABLES = {"train_lib.train": "train_loop.train",
                         "checkpoints.InitFrom": "init_from.InitFrom",
                         "decoding.DecodeConfig": "decode.DecodeConfig"}
_OLD_IMPORT_RE = re.compile(
    r"^\s*from\s+t5x_like\s+import\s+(?P<names>[\w ,]+)$|"
    r"^\s*from\s+t5x_like\.(?P<module>[\w.]+)\s+import|^\s*import\s+t5x_like\.(?P<plain>[\w.]+)",
    re.M)
_OLD_SELECTOR_RE = re.compile(
    r"(?<![\w.])(" + "|".join(re.escape(n) for n in RENAMED_CONFIGURABLES) + r")\b")


class GinConfigError(errors.ConfigError):
    """The gin configuration is invalid; the message says what and how to fix it."""


def split_gin_shorthand(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """Pulls `--gin.NAME=VALUE` out of argv, returning (other_args, bindings)."""
    rest, bindings = [], []
    for arg in argv:
        if arg.startswith("--gin.") and "=" in arg:
            bindings.append(arg[len("--gin."):])
        else:
            rest.append(arg)
    return rest, bindings


def parse(*, gin_files: Sequence[str], gin_bindings: Sequence[str] = (),
          search_paths: Sequence[str] = ()) -> None:
    """Parses and finalises the config; raises GinConfigError on any problem."""
    if not gin_files:
        raise GinConfigError("No --gin_file given", fix="e.g. --gin_file=configs/base.gin")
    paths = [os.getcwd(), *search_paths, SHIPPED_CONFIGS_ROOT]
    for path in dict.fromkeys(paths):
        gin.add_config_file_search_path(path)
    for gin_file in gin_files:
        found = [os.path.join(p, gin_file) for p in paths
                 if os.path.exists(os.path.join(p, gin_file))]
        if not found:
            raise GinConfigError(
                f"Gin file {gin_file!r} not found (searched {paths})",
                fix="pass a path relative to the repository root or add its folder with "
                "--gin_search_paths")
        with open(found[0]) as f:
            check_current_names(f.read(), where=gin_file)
    for binding in gin_bindings:
        check_current_names(binding, where=f"--gin.{binding}")
    try:
        gin.parse_config_files_and_bindings(list(gin_files), list(gin_bindings),
                                            finalize_config=True)
    except (ValueError, IOError, SyntaxError, ImportError, AttributeError) as e:
        what, fix = _explain(e)
        raise GinConfigError(what, fix=fix) from e


def check_current_names(text: str, *, where: str) -> None:
    """Raises a GinConfigError naming the new name for any pre-regroup module
    import or gin name in `text` (a gin file or a binding)."""
    selector = _OLD_SELECTOR_RE.search(text)
    if selector:
        old = selector.group(1)
        raise GinConfigError(f"{where} uses the old gin name {old}",
                             fix=f"it is {RENAMED_CONFIGURABLES[old]} now")
    for match in _OLD_IMPORT_RE.finditer(text):
        olds = ([n.split(" as ")[0].strip() for n in match["names"].split(",")]
                if match["names"] else [match["module"] or match["plain"]])
        for old in olds:
            # Package names of today reuse a few old module names (decoding,
            # evaluation): only a module that no longer exists has moved.
            here = os.path.join(SHIPPED_CONFIGS_ROOT, *old.split("."))
            if old in MOVED_MODULES and not (os.path.isdir(here) or os.path.exists(here + ".py")):
                new = MOVED_MODULES[old]
                package, _, module = new.rpartition(".")
                raise GinConfigError(
                    f"{where} imports t5x_like.{old}, which moved to t5x_like.{new}",
                    fix=f"write `from t5x_like.{package} import {module}`"
                    + ("; its train function is bound as train_loop.train.*"
                       if old == "train" else ""))


def _explain(error: Exception) -> tuple[str, str]:
    """(what, fix) for a gin parse error."""
    message = str(error).strip()
    required = _REQUIRED_RE.search(message)
    if required:
        name = required.group(1)
        return (f"Gin macro {name} is %gin.REQUIRED but was not set",
                f"set it in a gin file or on the command line, e.g. --gin.{name}=...")
    unresolved = _UNRESOLVED_RE.search(message)
    if unresolved:
        where = _LOCATION_RE.search(message)
        at = f" ({where.group(1)}, line {where.group(2)})" if where else ""
        return (f"Unknown gin reference @{unresolved.group(1)}: module {unresolved.group(2)} "
                f"has no such function or class{at}", "check the name")
    if "No module named 'data'" in message:
        return (f"Invalid gin configuration: {message}",
                "a gin file imports `data.tasks` (the bundled pydocs tasks), which lives in "
                "the repository's data/ folder: run from a checkout, or train on your own "
                "task (include 'configs/runs/cpu_pretrain.gin'; README, 'Your own data')")
    if "No configurable matching" in message or "doesn't have a parameter named" in message:
        return (f"Unknown gin binding: {message}",
                "check the spelling against the function or class signature (and the "
                "module import in the gin file)")
    return (f"Invalid gin configuration: {message}",
            "fix the gin file or binding named above")


def without_call_context(message: str) -> str:
    """An error message without the lines gin adds naming the configurable that raised
    it (the message itself says what went wrong)."""
    return _CALL_CONTEXT_RE.sub("", message)


def reset() -> None:
    """Clears all gin state (tests and repeated in-process runs)."""
    gin.clear_config(clear_constants=True)
