"""Config typing and validation through the real parsers of every command, and main()'s error lines."""

import argparse
import errno
import math
import os
import re
from pathlib import Path

import pytest

from decoct import cli
from decoct.cli import build_parser, main
from decoct.cli.common import META_KEYS, _resolve
from decoct.runtime.config import RANGES, ConfigError, Range, check_value, key_specs

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _commands(parser=None, prefix=()):
    """(command words, subparser) for every leaf command of ``decoct``."""
    parser = parser or build_parser()
    for a in parser._actions:
        if isinstance(a, argparse._SubParsersAction):
            for name, sp in a.choices.items():
                yield from _commands(sp, (*prefix, name))
            return
    yield prefix, parser


COMMANDS = list(_commands())


def _minimal_argv(words, sub) -> list[str]:
    """The command plus made-up values for its required arguments (enough to parse)."""
    argv = list(words)
    for a in sub._actions:
        if not (a.required or (not a.option_strings and a.nargs != "?")) or a.dest == "help":
            continue
        if isinstance(a, argparse._SubParsersAction):
            continue
        value = str(a.choices[0]) if a.choices else ("4" if a.type in (int, float) else "X")
        argv += ([a.option_strings[-1]] if a.option_strings else []) + [value]
    return argv


def _bad_values(rng: Range, integer: bool) -> list[str]:
    out = []
    if rng.lo is not None:
        lo = rng.lo if rng.lo_open else rng.lo - 1
        if lo not in rng.extra:
            out.append(str(int(lo)) if integer else repr(float(lo)))
    if rng.hi is not None:
        out.append(str(int(rng.hi + 1)) if integer else repr(float(rng.hi + 1)))
    if integer:
        out += ["2.7", "true"]
    else:
        out += [".inf", "nan", "-.inf"]
    return out


def _numeric_cases():
    for words, sub in COMMANDS:
        for key, spec in key_specs(sub._actions, skip=META_KEYS).items():
            if spec.kind in (int, float) and spec.choices is None:
                for bad in _bad_values(RANGES[key], spec.kind is int):
                    yield pytest.param(words, sub, key, spec, bad, id=f"{'-'.join(words)}-{key}={bad}")


def test_every_numeric_key_of_every_command_has_a_range_and_valid_defaults():
    """A new int/float flag must be given a range in decoct.runtime.config.RANGES (or choices)."""
    assert len(COMMANDS) >= 14
    seen = set()
    for words, sub in COMMANDS:
        for key, spec in key_specs(sub._actions, skip=META_KEYS).items():
            if spec.kind in (int, float) and spec.choices is None:
                assert key in RANGES, f"decoct {' '.join(words)}: numeric key {key!r} has no range in RANGES"
                seen.add(key)
            default = sub.get_default(key)
            if default is not None:
                assert check_value(spec, default) == default, (words, key)
    assert seen >= {"ipc", "runs", "epochs", "iterations", "checkpoint_every", "lr_img", "seed", "num_experts",
                    "batch_size", "colors", "palette", "lr", "momentum"}
    assert set(RANGES) == seen, f"RANGES entries no command has: {set(RANGES) - seen}"


@pytest.mark.parametrize("words, sub, key, spec, bad", list(_numeric_cases()))
def test_out_of_range_set_and_flag_are_refused_up_front(words, sub, key, spec, bad):
    """Every numeric key of every command, as --set and as a typed flag: refused before any work."""
    parser = build_parser()
    argv = _minimal_argv(words, sub)
    with pytest.raises(ConfigError) as e:
        _resolve(parser, [*argv, "--set", f"{key}={bad}"])
    assert f"config key '{key}' in --set must be" in str(e.value) and f"got '{bad}'" in str(e.value)
    flag, typed = spec.label, bad.replace(".inf", "inf")  # argparse's float() spells it inf
    if flag.startswith("--") and (spec.kind is float or typed not in ("2.7", "true")):
        with pytest.raises(ConfigError, match=f"^{re.escape(flag)} must be "):
            _resolve(build_parser(), [*argv, f"{flag}={typed}"])


@pytest.mark.parametrize("argv, line", [
    (["select", "random", "--dataset", "digits", "--ipc", "1", "--out", "R", "--set", "ipc=0"],
     "decoct select: error: config key 'ipc' in --set must be an integer >= 1, got '0'"),
    (["select", "random", "--dataset", "digits", "--ipc", "0", "--out", "R"],
     "decoct select: error: --ipc must be an integer >= 1, got 0"),
    (["evaluate", "R", "--runs", "0"], "decoct evaluate: error: --runs must be an integer >= 1, got 0"),
    (["evaluate", "R", "--epochs", "0"], "decoct evaluate: error: --epochs must be an integer >= 1, got 0"),
    (["quickstart", "--runs", "-1"], "decoct quickstart: error: --runs must be an integer >= 1, got -1"),
    (["distill", "dm", "--dataset", "digits", "--out", "R", "--set", "lr_img=.inf"],
     "decoct distill dm: error: config key 'lr_img' in --set must be a finite number > 0, got '.inf'"),
    (["distill", "dm", "--dataset", "digits", "--out", "R", "--set", "checkpoint_every=0"],
     "decoct distill dm: error: config key 'checkpoint_every' in --set must be an integer >= 1, got '0'"),
    (["distill", "dm", "--dataset", "digits", "--out", "R", "--set", "iterations=2.7"],
     "decoct distill dm: error: config key 'iterations' in --set must be an integer >= 1, got '2.7'"),
    (["distill", "dm", "--dataset", "digits", "--out", "R", "--set", "iterations=true"],
     "decoct distill dm: error: config key 'iterations' in --set must be an integer >= 1, got 'true'"),
    (["distill", "tm", "--dataset", "digits", "--out", "R", "--lr-img", "nan"],
     "decoct distill tm: error: --lr-img must be a finite number > 0, got nan"),
    (["distill", "tm", "--dataset", "digits", "--out", "R", "--set", "grad=fast"],
     "decoct distill tm: error: config key 'grad' in --set must be one of exact, tesla, unrolled, got 'fast'"),
    (["quantize", "--colors", "4", "300", "--out", "R"],
     "decoct quantize: error: --colors must be a list, each an integer in 2..256, got 300"),
    (["experts", "--dataset", "digits", "--out", "R", "--num-experts", "0"],
     "decoct experts: error: --num-experts must be an integer >= 1, got 0"),
])
def test_bad_values_one_line_exit_2(tmp_path, capsys, argv, line):
    argv = [str(tmp_path / "r") if a == "R" else a for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err == line + "\n"
    assert not (tmp_path / "r").exists()  # refused before anything was written


def test_yaml_values_typed_checked_and_scientific(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("lr: 5e-1\nweight_decay: 1e-4\nepochs: 2e1\nbatch_size: 64\n")
    args = _resolve(build_parser(), ["squeeze", "--dataset", "digits", "--out", "T", "--config", str(cfg)])
    assert (args.lr, args.weight_decay, args.epochs) == (0.5, 1e-4, 20) and isinstance(args.epochs, int)
    args = _resolve(build_parser(), ["distill", "dm", "--dataset", "digits", "--out", "R",
                                     "--set", "lr_img=1e-3", "--set", "lr_palette=5E-2"])
    assert args.lr_img == 1e-3 and args.lr_palette == 0.05
    cfg.write_text("ipc: 1\nseed: .nan\n")
    assert main(["select", "random", "--dataset", "digits", "--ipc", "1", "--out", str(tmp_path / "r"),
                 "--config", str(cfg)]) == 2
    assert f"config key 'seed' in --config {cfg} must be an integer in 0..4294967295, got nan" in \
        capsys.readouterr().err
    cfg.write_text("embed: trained-ish\n")
    assert main(["select", "random", "--dataset", "digits", "--ipc", "1", "--out", str(tmp_path / "r"),
                 "--config", str(cfg)]) == 2
    assert "config key 'embed' in --config" in capsys.readouterr().err


def test_typed_flags_still_beat_presets_and_set_beats_flags(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("iterations: 50\nlr_img: 1e-2\n")
    args = _resolve(build_parser(), ["distill", "dm", "--dataset", "digits", "--out", "R", "--config", str(cfg),
                                     "--iterations", "7", "--set", "lr_img=3e-1"])
    assert args.iterations == 7 and args.lr_img == 0.3


def test_alias_bomb_config_through_the_cli(tmp_path, capsys):
    """A 340-byte billion-laughs config: refused at once, in one short line (it printed 2 GB before)."""
    lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for prev, name in zip("abcdefgh", "bcdefghi", strict=True):
        lines.append(f"{name}: &{name} [" + ",".join([f"*{prev}"] * 9) + "]")
    cfg = tmp_path / "bomb.yaml"
    cfg.write_text("\n".join(lines) + "\n")
    assert cfg.stat().st_size < 400
    assert main(["select", "random", "--dataset", "digits", "--ipc", "1", "--out", str(tmp_path / "r"),
                 "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert err == (f"decoct select: error: config file {cfg}: anchors and aliases (&name, *name) are not allowed "
                   "in a config; write each value out (line 1, column 4)\n")


def _preset_command(path: Path) -> list[str]:
    """The command a preset belongs to: its directory, or its name's first word in configs/decoupled."""
    kind, name = path.parent.name, path.stem
    if kind == "dm" or (kind == "autopalette" and name.startswith("dm-")):
        return ["distill", "dm", "--dataset", "digits"]
    if kind == "tm":
        return ["distill", "tm", "--dataset", "digits"]
    if kind == "decoupled" and name.startswith("squeeze-"):
        return ["squeeze", "--dataset", "digits"]
    if kind == "decoupled" and name.endswith("-eval"):
        return ["evaluate", "RUN"]
    if kind == "decoupled" and name.split("-")[0] in ("sre2l", "dwa", "lpld", "rded"):
        return ["distill", name.split("-")[0], "--teacher", "T", "--ipc", "1"]
    raise AssertionError(f"{path}: no command known for this preset; add it to _preset_command")


PRESETS = sorted(CONFIGS.rglob("*.yaml"))


@pytest.mark.parametrize("path", PRESETS, ids=[str(p.relative_to(CONFIGS)) for p in PRESETS])
def test_every_preset_resolves_through_its_command(path):
    """The shipped paper presets load under the typed, range-checked config (values unchanged)."""
    import yaml

    command = _preset_command(path)
    argv = [*command, *([] if command[0] == "evaluate" else ["--out", "R"]), "--config", str(path)]
    args = _resolve(build_parser(), argv)
    raw = yaml.safe_load(path.read_text())
    for key, value in raw.items():
        got = getattr(args, key.replace("-", "_"))
        if isinstance(value, str) and re.fullmatch(r"[-+]?[0-9.]+[eE][-+]?[0-9]+", value):
            value = float(value)  # PyYAML 1.1 left it text; decoct reads the number
        if key in ("dataset", "ipc", "teacher"):
            continue  # typed on the command line above
        assert got == value or (isinstance(value, list) and got == value), (key, got, value)
    assert len(PRESETS) >= 30


def test_message_and_traceback_policy(tmp_path, capsys, monkeypatch):
    """OS errors name their path on one line; huge messages are cut; Ctrl-C is 130; bugs still raise."""
    def boom(exc):
        def cmd(args):
            raise exc
        return cmd

    argv = ["report", str(tmp_path / "run")]
    cases = [
        (PermissionError(errno.EACCES, "Permission denied", "/x/y"),
         "decoct report: error: /x/y: Permission denied (check the permissions, or choose another output "
         "directory)"),
        (OSError(errno.ENOSPC, "No space left on device", "/x/y/z.tmp"),
         "decoct report: error: /x/y/z.tmp: No space left on device (free some space, or choose another output "
         "directory)"),
        (OSError(errno.EROFS, "Read-only file system", "/ro/a", None, "/ro/b"),
         "decoct report: error: /ro/a -> /ro/b: Read-only file system (check the permissions, or choose another "
         "output directory)"),
        (IsADirectoryError(errno.EISDIR, "Is a directory", "/x/d"), "decoct report: error: /x/d: Is a directory"),
        (FileNotFoundError("no run at /x"), "decoct report: error: no run at /x"),
        (KeyError("missing key 'a'"), "decoct report: error: missing key 'a'"),
    ]
    for exc, line in cases:
        monkeypatch.setattr(cli.sets, "cmd_report", boom(exc))
        assert main(argv) == 2
        assert capsys.readouterr().err == line + "\n"
    import yaml

    for exc, start in [(yaml.YAMLError("bad yaml"), "YAMLError: bad yaml"),
                       (EOFError("Compressed file ended"), "EOFError: Compressed file ended")]:
        monkeypatch.setattr(cli.sets, "cmd_report", boom(exc))
        assert main(argv) == 2
        assert capsys.readouterr().err == f"decoct report: error: {start}\n"
    monkeypatch.setattr(cli.sets, "cmd_report", boom(ValueError("v" * 10**6)))
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert len(err) < cli.MAX_MESSAGE_CHARS + 100 and err.endswith("(1,000,000 characters)\n")
    monkeypatch.setattr(cli.sets, "cmd_report", boom(KeyboardInterrupt()))
    assert main(argv) == 130
    assert "rerun with --resume" in capsys.readouterr().err
    monkeypatch.setattr(cli.sets, "cmd_report", boom(TypeError("a bug")))
    with pytest.raises(TypeError):
        main(argv)


def test_real_os_errors_are_one_line(tmp_path, capsys):
    """Outputs where a file is, and (when not root) a read-only directory: one line naming the path."""
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert main(["report", str(tmp_path / "nothing"), "--out", str(afile)]) == 2
    assert capsys.readouterr().err == f"decoct report: error: {afile}: File exists\n"
    assert main(["report", str(tmp_path / "nothing"), "--out", str(afile / "sub")]) == 2
    assert capsys.readouterr().err == f"decoct report: error: {afile / 'sub'}: Not a directory\n"
    if os.geteuid() == 0:
        return  # root writes anywhere
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        assert main(["report", str(tmp_path / "nothing"), "--out", str(ro / "rep")]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"decoct report: error: {ro / 'rep'}: Permission denied") and err.count("\n") == 1
    finally:
        ro.chmod(0o755)


def test_safetensors_error_is_a_user_error(tmp_path, capsys, monkeypatch):
    from safetensors.torch import load_file

    bad = tmp_path / "x.safetensors"
    bad.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{not json")

    def cmd(args):
        load_file(bad)
        return 0

    monkeypatch.setattr(cli.sets, "cmd_report", cmd)
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("decoct report: error: SafetensorError: ") and err.count("\n") == 1


def test_finite_check_covers_every_float_key():
    for _words, sub in COMMANDS:
        for spec in key_specs(sub._actions, skip=META_KEYS).values():
            if spec.kind is float:
                for v in (math.inf, -math.inf, math.nan):
                    with pytest.raises(ConfigError, match="finite"):
                        check_value(spec, v)


# ----------------------------------------------------------------------------- point 13: advice
_EXTERNAL_FLAGS = {"--nproc_per_node", "--nproc", "--use_warmup",  # torchrun's; AutoPalette's reference code
                   "--label_quantization"}  # LPQLD's reference code
_FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9_-]*[a-z0-9]")


def _string_constants():
    import ast

    for f in sorted((Path(cli.__file__).parents[1]).rglob("*.py")):
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                yield f"{f.name}:{node.lineno}", node.value


def test_every_flag_a_message_or_help_names_exists():
    """No message or help text advises a flag that no parser defines (e.g. `decoct info --datasets`),
    and every `decoct CMD ... --flag` written in one names a flag CMD has."""
    import ast

    defined = set(_EXTERNAL_FLAGS)
    for f in sorted((Path(cli.__file__).parents[1]).rglob("*.py")):
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "add_argument":
                defined |= {a.value for a in node.args if isinstance(a, ast.Constant) and isinstance(a.value, str)}
    per_command = {" ".join(words): {o for a in sub._actions for o in a.option_strings} for words, sub in COMMANDS}
    defined |= {o for have in per_command.values() for o in have}  # with --no-X of BooleanOptionalAction
    bad = []
    for where, text in _string_constants():
        bad += [f"{where}: {flag}" for flag in _FLAG.findall(text) if flag not in defined]
        for m in re.finditer(r"decoct ((?:distill )?[a-z0-9]+)([^`\"\n;)]*)", text):
            have = per_command.get(m.group(1))
            if have is not None:
                bad += [f"{where}: decoct {m.group(1)} {flag}" for flag in _FLAG.findall(m.group(2))
                        if flag not in have]
    assert not bad, bad


@pytest.mark.slow
def test_label_store_advice_works_as_typed(tmp_path, capsys):
    """Each fix the label-store errors advise, run as the message spells it, succeeds."""
    from decoct.decoupled.squeeze import squeeze

    squeeze("digits", model="convnet_bn", model_kwargs=dict(width=8), out=tmp_path / "teacher", epochs=1,
            show_progress=False, device="cpu")
    run, teacher = str(tmp_path / "run"), str(tmp_path / "teacher")
    common = ["--device", "cpu", "--no-progress"]
    assert main(["select", "random", "--dataset", "digits", "--ipc", "2", "--out", run, "--no-progress"]) == 0
    assert main(["relabel", run, "--teacher", teacher, "--epochs", "5", "--batch-size", "8", *common]) == 0
    capsys.readouterr()

    def advice(argv):
        """Run ``argv``: it must fail with one line; return the commands the line advises."""
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1, err
        return err

    # evaluating more epochs than stored: the granularity keyword was not a CLI option
    evaluate = ["evaluate", run, "--protocol", "soft", "--model", "mlp", "--runs", "1", *common]
    err = advice([*evaluate, "--epochs", "6"])
    assert "decoct evaluate --epochs 5" in err and "decoct relabel RUN --teacher DIR --epochs 6 --force" in err
    assert main([*evaluate, "--epochs", "5"]) == 0
    # relabelling with other settings in place: --force or --out (it said "force" / "out=")
    relabel6 = ["relabel", run, "--teacher", teacher, "--epochs", "6", "--batch-size", "8", *common]
    err = advice(relabel6)
    assert "pass --force" in err and "--out DIR" in err
    assert main([*relabel6, "--out", str(tmp_path / "run6")]) == 0
    assert main([*relabel6, "--force"]) == 0
    assert main([*evaluate, "--epochs", "6"]) == 0
    # pruning in place: --force or --out
    err = advice(["relabel", run, "--prune", "10", "--no-progress"])
    assert "pass --force" in err and "--out DIR" in err
    assert main(["relabel", run, "--prune", "10", "--out", str(tmp_path / "r10"), "--no-progress"]) == 0
    assert main(["relabel", run, "--prune", "10", "--force", "--no-progress"]) == 0
    assert "pruned 10x" in capsys.readouterr().out
    # a set without a store: both advised commands exist and run
    plain = str(tmp_path / "plain")
    assert main(["select", "random", "--dataset", "digits", "--ipc", "2", "--out", plain, "--no-progress"]) == 0
    err = advice(["evaluate", plain, "--protocol", "soft", "--model", "mlp", "--epochs", "1", "--runs", "1",
                  *common])
    assert "decoct relabel RUN --teacher DIR --epochs E" in err
    assert "decoct evaluate RUN --protocol soft --teacher DIR" in err
    assert main(["evaluate", plain, "--protocol", "soft", "--teacher", teacher, "--model", "mlp", "--epochs", "1",
                 "--runs", "1", *common]) == 0


def test_full_disk_names_the_file_being_written(tmp_path, monkeypatch, capsys):
    """write()/fsync() of a full disk raise ENOSPC without a file name: the atomic writer adds it."""
    from decoct.runtime import io

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(io.os, "fsync", full)
    target = tmp_path / "out.json"
    with pytest.raises(OSError) as e:
        io.atomic_write_json(target, {"a": 1})
    assert e.value.filename == str(target) and not list(tmp_path.iterdir())  # no temporary left
    monkeypatch.setattr(cli.sets, "cmd_report", lambda args: io.atomic_write_json(target, {}))
    assert main(["report", str(tmp_path)]) == 2
    assert capsys.readouterr().err == (f"decoct report: error: {target}: No space left on device (free some "
                                       "space, or choose another output directory)\n")


@pytest.mark.slow
def test_closed_stdout_pipe_is_quiet(tmp_path):
    """`decoct info RUN | head -1`: the reader leaves; decoct exits 141 without a traceback."""
    import subprocess
    import sys

    code = ("import sys\nfrom decoct import cli\nfrom decoct.cli import sets\n"
            "def cmd(args):\n    for _ in range(20000):\n        print('x' * 60)\n    return 0\n"
            "sets.cmd_report = cmd\nsys.exit(cli.main(['report', 'X']))\n")
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    p.stdout.close()
    err = p.stderr.read()
    assert p.wait(timeout=120) == 141 and err == b""


def test_model_kwargs_read_scientific_notation():
    from decoct.cli.decoupled import parse_model_kwargs

    assert parse_model_kwargs("width=64,eps=1e-5,stem=imagenet") == {"width": 64, "eps": 1e-5, "stem": "imagenet"}
    with pytest.raises(ValueError, match=r"\.\.\. \(5,002 characters\)"):
        parse_model_kwargs("x" * 5000)


def test_a_config_file_supplies_required_flags(tmp_path, capsys):
    """`--config` holds every key, required ones too; a required key given nowhere is one line."""
    from decoct.cli import main

    cfg = tmp_path / "sel.yaml"
    cfg.write_text(f"dataset: digits\nipc: 1\nout: {tmp_path / 'R'}\n")
    assert main(["select", "random", "--config", str(cfg), "--no-progress"]) == 0
    assert (tmp_path / "R" / "DONE").exists()
    capsys.readouterr()
    assert main(["select", "random", "--no-progress", "--out", str(tmp_path / "R2")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("decoct select: error: the following arguments are required: --dataset, --ipc (on the "
                   "command line, or as keys dataset, ipc in --config)")
    assert not (tmp_path / "R2").exists()
