"""The flags every entry point shares, and what a person sees from them."""

import re

import pytest

from launch import compile as compile_launcher
from launch import eval as eval_launcher
from launch import infer as infer_launcher
from launch import train as train_launcher


def help_text(parse_flags, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_flags(["--help"])
    assert exit_info.value.code == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("parse_flags", [train_launcher.parse_flags,
                                         compile_launcher.parse_flags,
                                         eval_launcher.parse_flags,
                                         infer_launcher.parse_flags])
def test_help_lists_every_flag_with_a_meaning(parse_flags, capsys):
    lines = help_text(parse_flags, capsys).splitlines()
    flags = [i for i, line in enumerate(lines) if re.match(r"  --\w", line)]  # not wrapped text
    assert len(flags) >= 6
    for i in flags:
        spec, _, meaning = lines[i].strip().partition("  ")
        meaning = meaning.strip() or (lines[i + 1].strip() if i + 1 < len(lines) else "")
        assert meaning and not meaning.startswith("--"), f"no meaning for {spec}"
    text = "\n".join(lines)
    for shared in ("--gin_file", "--gin_bindings", "--gin.NAME", "--gin_search_paths",
                   "--verbosity"):
        assert shared in text


def test_both_launchers_share_one_flag_block():
    argv = ["--gin_file=a.gin", "--gin.TRAIN_STEPS=7", "--gin_bindings=BATCH_SIZE=4",
            "--gin_search_paths=/x", "--verbosity=1"]
    train_args, train_bindings = train_launcher.parse_flags(argv)
    compile_args, compile_bindings = compile_launcher.parse_flags(argv + ["--topology=v4-8"])
    assert train_bindings == compile_bindings == ["BATCH_SIZE=4", "TRAIN_STEPS=7"]
    for name in ("gin_file", "gin_search_paths", "verbosity"):
        assert getattr(train_args, name) == getattr(compile_args, name)
