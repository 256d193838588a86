"""The ``mechgpu`` command line and the package around it: the demo runs end to end, the package
loads lazily, every option is documented, bad values are usage errors, ``mechgpu profile`` says
what its rows ran on."""

import argparse
import importlib
import importlib.metadata
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import HAS_CUDA

from mechgpu.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = ["demo", "flow", "tour", "train", "profile", "fit", "check", "bench"]


def test_demo_runs_and_matches_torch():
    """One row per optimizer in mechgpu's optim_spec, each under its tuned label."""
    from mechgpu.kernels.optim_spec import SPECS

    from mechgpu.tools.demo import TUNED, _optimizer_pairs

    assert set(TUNED) <= set(SPECS), "settings for an optimizer mechgpu does not have"
    env = dict(os.environ)
    out = subprocess.run([sys.executable, "-m", "mechgpu", "demo", "--steps", "4", "--batch", "8"],
                         env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    labels = [label for label, *_ in _optimizer_pairs()]
    rows = [line for line in out.stdout.splitlines() if any(line.startswith(f"{label} ") for label in labels)]
    assert len(rows) == len(SPECS), out.stdout
    for row in rows:
        ours_loss, torch_loss, diff = (float(x) for x in row.split()[-5:-2])
        assert abs(ours_loss - torch_loss) < 1e-4 and diff < 1e-5, row


# ---------------------------------------------------------------------- the package
def test_submodules_load_lazily_without_triton():
    """Every public submodule and function is reachable from `import mechgpu` and listed by dir(),
    and neither the import nor dir() nor __version__ imports triton (the CLI sets
    TRITON_INTERPRET=1 first)."""
    script = (
        "import importlib, sys, types, mechgpu\n"
        "names = dir(mechgpu)\n"
        "version = mechgpu.__version__\n"
        "assert 'triton' not in sys.modules, 'import mechgpu imported triton'\n"
        "public = ['optim', 'clip', 'nn', 'init', 'diagnostics', 'train', 'traffic', 'tools', 'kernels']\n"
        "functions = ['clip_grad_norm_', 'clip_grads_with_norm_', 'get_total_norm']\n"
        "missing = [n for n in public + functions + ['__version__'] if n not in names]\n"
        "assert not missing, missing\n"
        "for n in public:\n"
        "    assert getattr(mechgpu, n) is importlib.import_module('mechgpu.' + n), n\n"
        "for n in functions:\n"
        "    assert getattr(mechgpu, n) is getattr(mechgpu.clip, n), n\n"
        "try:\n"
        "    mechgpu.no_such_thing\n"
        "except AttributeError as e:\n"
        "    assert 'no_such_thing' in str(e)\n"
        "else:\n"
        "    raise AssertionError('no AttributeError')\n"
        "print(version)\n"
    )
    env = {**os.environ, "TRITON_INTERPRET": "1"}  # for the kernels submodule, imported last
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == importlib.metadata.version("mechgpu")


def test_py_typed_is_shipped():
    import tomllib  # Python >= 3.11

    import mechgpu

    assert (Path(mechgpu.__file__).parent / "py.typed").is_file()
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "py.typed" in pyproject["tool"]["setuptools"]["package-data"]["mechgpu"]


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out == f"mechgpu {importlib.metadata.version('mechgpu')}\n"


# ---------------------------------------------------------------------- help
def _help(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exit_:
        main([*argv, "--help"])
    assert exit_.value.code == 0
    return capsys.readouterr().out


def _options(text: str) -> dict[str, str]:
    """{option invocation: its help text} from an argparse --help page."""
    options, current = {}, None
    for line in text.split("\noptions:\n", 1)[1].splitlines():
        if re.match(r"^  -", line):
            invocation, help_ = (re.split(r"\s{2,}", line.strip(), maxsplit=1) + [""])[:2]
            current = invocation
            options[current] = help_
        elif current and line.startswith(" " * 8):
            options[current] = (options[current] + " " + line.strip()).strip()
    return options


def test_top_level_help_lists_each_command_once(capsys):
    text = _help([], capsys)
    assert "`" not in text
    for name in COMMANDS:
        assert len(re.findall(rf"^\s+(?:mechgpu )?{name}\s", text, re.M)) == 1, (name, text)


@pytest.mark.parametrize("command", COMMANDS)
def test_every_option_has_help_and_every_command_a_description(command, capsys):
    text = _help([command], capsys)
    assert "`" not in text
    description = text.split("\n\n")[1]
    assert not description.startswith("options:") and len(description.split()) >= 8, text
    options = _options(text)
    assert len(options) > 2, text
    undocumented = [option for option, help_ in options.items() if not help_]
    assert not undocumented, text
    # a fixed default is shown (a device-dependent one is spelt out in the help)
    _, parsers = build_parser()
    for action in parsers[command]._actions:
        if action.default not in (None, False, argparse.SUPPRESS):
            assert "default" in action.help, (command, action.option_strings, action.help)


def test_device_dependent_defaults_in_help_match_the_config():
    from mechgpu.tools.jobs import DEFAULTS

    _, parsers = build_parser()
    flags = {"dim": "--dim", "depth": "--depth", "heads": "--heads", "context": "--context", "lr": "--lr",
             "micro_batch": "--micro-batch", "steps": "--steps", "accum_steps": "--accum-steps"}
    helps = {option: action.help for action in parsers["train"]._actions for option in action.option_strings}
    for key, flag in flags.items():
        cpu, cuda = DEFAULTS["cpu"][key], DEFAULTS["cuda"][key]
        expected = f"{cpu:g} on CPU, {cuda:g} on CUDA" if cpu != cuda else f"default {cpu:g}"
        assert expected in helps[flag], (flag, helps[flag])
    fit_help = next(a.help for a in parsers["fit"]._actions if "--global-batch" in a.option_strings)
    cpu, cuda = (DEFAULTS[d]["micro_batch"] * DEFAULTS[d]["accum_steps"] for d in ("cpu", "cuda"))
    assert f"default {cpu} on CPU, {cuda} on CUDA" in fit_help, fit_help


# ---------------------------------------------------------------------- check --only
def test_check_only_ignores_case():
    from mechgpu.testing.check import CASES, select_cases

    assert select_cases(["adam"]) == [name for name in CASES if "adam" in name.lower()]
    assert "optim.Adam" in select_cases(["adam"]) and "optim.AdamW" in select_cases(["ADAMW"])
    assert select_cases(["CLIP.NORM2"]) == ["clip.norm2"]
    assert select_cases(["optim.Adam"], exact=True) == ["optim.Adam"]
    with pytest.raises(ValueError, match="no check name contains"):
        select_cases(["no-such-kernel"])


# ---------------------------------------------------------------------- bad values
BAD_VALUES = [
    (["tour", "--steps", "0"], "--steps"),
    (["tour", "--accum-steps", "0"], "--accum-steps"),
    (["tour", "--micro-batch", "0"], "--micro-batch"),
    (["train", "--accum-steps", "0"], "--accum-steps"),
    (["train", "--accum-steps", "most"], "--accum-steps"),
    (["train", "--checkpoint", "banana"], "--checkpoint"),
    (["train", "--checkpoint", "0"], "--checkpoint"),
    (["train", "--checkpoint", "0GiB"], "--checkpoint"),
    (["train", "--steps", "0"], "--steps"),
    (["train", "--micro-batch", "0"], "--micro-batch"),
    (["train", "--micro-batch", "-2"], "--micro-batch"),
    (["train", "--eval-every", "-1"], "--eval-every"),
    (["train", "--lr", "0"], "--lr"),
    (["train", "--lr", "nan"], "--lr"),
    (["train", "--dropout", "1"], "--dropout"),
    (["train", "--dim", "30", "--heads", "4"], "--heads"),
    (["profile", "--accum", "0"], "--accum"),
    (["profile", "--micro", "0"], "--micro"),
    (["profile", "--steps", "0"], "--steps"),
    (["profile", "--policies", "none", "banana"], "--policies"),
    (["profile", "--depth", "0"], "--depth"),
    (["demo", "--steps", "0"], "--steps"),
    (["demo", "--batch", "eight"], "--batch"),
    (["flow", "--depth", "0"], "--depth"),
    (["flow", "--width", "-1"], "--width"),
    (["flow", "--batch", "0"], "--batch"),
    (["fit", "--memory", "banana"], "--memory"),
    (["fit", "--memory", "0GiB"], "--memory"),
    (["fit", "--memory", "-5MiB"], "--memory"),
    (["fit", "--memory=-5MiB"], "--memory"),
    (["train", "--checkpoint", "-1GiB"], "--checkpoint"),
    (["train", "--checkpoint", "-2"], "--checkpoint"),
    (["train", "--checkpoint", "5", "--depth", "4"], "--checkpoint"),
    (["profile", "--policies", "none", "3", "--depth", "2"], "--policies"),
    (["fit", "--memory", "1GiB", "--global-batch", "0"], "--global-batch"),
    (["fit", "--memory", "1GiB", "--micro", "0"], "--micro"),
    (["fit", "--memory", "1GiB", "--global-batch", "6", "--micro", "2", "4"], "--micro"),
    (["fit", "--memory", "1GiB", "--steps", "1"], "--steps"),
    (["fit", "--memory", "1GiB", "--dim", "30", "--heads", "4"], "--heads"),
]


def _forbid_runs(monkeypatch):
    from mechgpu.tools import demo, flow, jobs, tour

    def ran(*args, **kwargs):
        raise AssertionError("a bad value reached the job")

    for module, name in ((jobs, "run_train"), (jobs, "run_profile"), (demo, "run_demo"), (flow, "run_flow"),
                         (tour, "run_tour"), (jobs, "run_fit")):
        monkeypatch.setattr(module, name, ran)


@pytest.mark.parametrize("argv,flag", BAD_VALUES, ids=[" ".join(a) for a, _ in BAD_VALUES])
def test_bad_values_are_usage_errors(argv, flag, monkeypatch, capsys):
    _forbid_runs(monkeypatch)
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"usage: mechgpu {argv[0]} "), err
    assert f"argument {flag}" in err.splitlines()[-1], err
    assert "Traceback" not in err


@pytest.mark.parametrize("argv,message", [
    (["fit", "--memory", "-5MiB"], "argument --memory: the memory budget must be positive, got -5MiB"),
    (["fit", "--memory=-5MiB"], "argument --memory: the memory budget must be positive, got -5MiB"),
    (["train", "--checkpoint", "99", "--depth", "4"],
     "argument --checkpoint: 99 segments, but the model has 4 blocks (--depth), so at most 4 segments"),
], ids=["memory -5MiB", "memory=-5MiB", "checkpoint 99"])
def test_usage_errors_say_what_is_wrong(argv, message, monkeypatch, capsys):
    _forbid_runs(monkeypatch)
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == f"mechgpu {argv[0]}: error: {message}"


def test_checkpoint_help_says_what_n_means():
    _, parsers = build_parser()
    (help_,) = (a.help for a in parsers["train"]._actions if "--checkpoint" in a.option_strings)
    assert "N segments" in help_ and "checkpoint_sequential" in help_ and "at most --depth" in help_, help_


@pytest.mark.skipif(HAS_CUDA, reason="a CUDA device is present")
@pytest.mark.parametrize("command", [c for c in COMMANDS if any("--device" in a.option_strings
                                                                for a in build_parser()[1][c]._actions)])
def test_device_cuda_without_cuda_is_one_line_and_exit_2(command, monkeypatch, capsys):
    """Every command taking --device says so as ``mechgpu check`` does, before anything runs."""
    _forbid_runs(monkeypatch)
    assert main([command, "--device", "cuda", *(["--memory", "1GiB"] if command == "fit" else [])]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"mechgpu {command}: --device cuda was asked for, but torch sees no CUDA device"), err
    assert len(err.strip().splitlines()) == 1, err


def test_good_values_reach_the_job(monkeypatch):
    from mechgpu.tools import jobs

    seen = []
    monkeypatch.setattr(jobs, "run_train", seen.append)
    for checkpoint, accum, expected in (("2GiB", "all", "all"), ("512MiB", "3", 3), ("sqrt", "1", 1), ("2", "2", 2)):
        assert main(["train", "--checkpoint", checkpoint, "--accum-steps", accum, "--dim", "12", "--heads", "3",
                     "--steps", "5", "--micro-batch", "1", "--lr", "3e-4", "--dropout", "0"]) == 0
        cfg = seen[-1]
        assert (cfg.checkpoint, cfg.accum_steps, cfg.steps, cfg.micro_batch) == (checkpoint, expected, 5, 1)
        assert (cfg.dim, cfg.heads, cfg.lr, cfg.dropout) == (12, 3, 3e-4, 0.0)


# ---------------------------------------------------------------------- bench --readme
def test_bench_readme_outside_a_checkout_is_a_clear_error(tmp_path, monkeypatch, capsys):
    from mechgpu.tools import bench

    monkeypatch.setattr(bench, "README", tmp_path / "README.md")
    monkeypatch.setattr(bench, "RESULTS_DIR", tmp_path / "bench" / "results")
    assert main(["bench", "--readme"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "source checkout" in err, err
    assert str(tmp_path / "README.md") in err and str(tmp_path / "bench" / "results") in err


# ---------------------------------------------------------------------- profile
TINY_PROFILE = ["profile", "--dim", "16", "--depth", "1", "--heads", "2", "--context", "8", "--micro", "2",
                "--accum", "1", "--policies", "none", "--steps", "1", "--plot", "none"]


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_profile_table_names_backends_and_explains_labels(monkeypatch, capsys):
    import torch

    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    assert main(TINY_PROFILE) == 0
    out = capsys.readouterr().out.splitlines()
    assert "profile:" in terminal.getvalue() and "run" in terminal.getvalue()  # the sweep's progress bar
    legend = next(line for line in out if line.startswith("legend:"))
    assert "a = accum" in legend and "m = micro" in legend
    header = next(i for i, line in enumerate(out) if line.startswith("impl "))
    assert out[header].split()[-1] == "backend"
    rows = {line.split()[0]: line for line in out[header + 2:header + 4]}
    assert set(rows) == {"mechgpu", "torch"}
    if torch.cuda.is_available():
        name = f"CUDA {torch.cuda.get_device_name()}"
        assert rows["mechgpu"].endswith(name) and rows["torch"].endswith(name)
        assert not any(line.startswith("note:") for line in out)
    else:
        assert rows["mechgpu"].endswith("  triton interpreter (CPU)") and rows["torch"].endswith("  torch CPU")
        caveat = out[header + 4]  # right under the table
        assert caveat.startswith("note:") and "tokens/s" in caveat and "same backend" in caveat


def test_profile_no_progress(monkeypatch, capsys):
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    assert main([*TINY_PROFILE, "--no-baseline", "--no-progress"]) == 0
    assert terminal.getvalue() == ""
    assert "mechgpu  none" in capsys.readouterr().out


def test_profile_plot_has_no_point_labels(tmp_path, monkeypatch):
    """Many runs: the points are told apart by colour and marker in legends, not by text on them."""
    from matplotlib.axes import Axes

    from mechgpu.tools.jobs import _plot

    def forbidden(*args, **kwargs):
        raise AssertionError("text drawn on the axes")

    monkeypatch.setattr(Axes, "annotate", forbidden)
    monkeypatch.setattr(Axes, "text", forbidden)
    runs = [{"implementation": impl, "checkpoint": policy, "accum": accum, "micro_batch": micro,
             "backend": "triton interpreter (CPU)" if impl == "mechgpu" else "torch CPU",
             "saved_bytes": 2**20 * micro, "peak_bytes": None, "tokens_per_s": 100.0 * accum}
            for impl, policy in (("mechgpu", "none"), ("mechgpu", "sqrt"), ("mechgpu", "all"), ("torch", "none"))
            for accum in (1, 2) for micro in (2, 4)]
    _plot(runs, tmp_path / "profile.png", "cpu")
    assert (tmp_path / "profile.png").stat().st_size > 10_000


def test_a_budget_below_what_the_model_can_save_is_a_usage_error(capsys):
    """Known only once the blocks are measured, but still argparse's one line and exit code 2."""
    with pytest.raises(SystemExit) as exit_:
        main(["train", "--checkpoint", "1KiB", "--dim", "16", "--depth", "2", "--heads", "2", "--context", "8",
              "--micro-batch", "2", "--steps", "1", "--no-progress", "--device", "cpu"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: mechgpu train ") and "argument --checkpoint: budget 1.00 KiB" in err, err


def test_train_log_line_names_each_file_with_its_folder(tmp_path, capsys):
    assert main(["train", "--dim", "16", "--depth", "1", "--heads", "2", "--context", "8", "--micro-batch", "2",
                 "--steps", "2", "--no-progress", "--device", "cpu", "--log-dir", str(tmp_path / "log")]) == 0
    (line,) = [line for line in capsys.readouterr().out.splitlines() if line.startswith("log: ")]
    files = [Path(name) for name in line.removeprefix("log: ").split(", ")]
    assert [f.name for f in files] == ["train_log.csv", "train_log.jsonl", "summary.json", "telemetry.png"], line
    assert all(f.parent == tmp_path / "log" and f.is_file() for f in files), line


def _kept_telemetry_figures(monkeypatch) -> list:
    """The figures ``mechgpu.tools.jobs.telemetry_figure`` draws from now on (it still saves them)."""
    from mechgpu.tools import jobs

    figures, draw = [], jobs.telemetry_figure
    monkeypatch.setattr(jobs, "telemetry_figure", lambda trainer: figures.append(draw(trainer)) or figures[-1])
    return figures


def _check_telemetry_figure(fig, history: list[dict], lossy: bool) -> None:
    """The panels, their scales and data, integer step ticks and y-ranges from 0 for counts and fractions."""
    from matplotlib.ticker import MaxNLocator

    axes = fig.axes
    titles = ["loss", "step size ||dp|| / ||p|| (log)",
              f"non-finite grad elements ({sum(int(r['nonfinite_grads']) for r in history):,} in all)"]
    titles += ["updates lost to rounding (% of changed elements)"] if lossy else []
    assert [ax.get_title() for ax in axes] == titles
    assert [ax.get_yscale() for ax in axes] == ["linear", "log", "linear"] + ["linear"] * lossy
    steps = [r["step"] for r in history]
    (loss,), (ratio,) = axes[0].get_lines(), axes[1].get_lines()
    assert list(loss.get_xdata()) == steps and list(loss.get_ydata()) == [r["loss"] for r in history]
    assert list(ratio.get_ydata()) == [r["update_ratio"] for r in history]
    assert [bar.get_height() for bar in axes[2].patches] == [int(r["nonfinite_grads"]) for r in history]
    if lossy:
        (lost,) = axes[3].get_lines()
        assert list(lost.get_ydata()) == [100 * r["lost_update_fraction"] for r in history]
    for ax in axes:
        assert isinstance(ax.xaxis.get_major_locator(), MaxNLocator)
        ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
        assert ticks and all(t == int(t) for t in ticks), ticks
    for ax in [axes[0], *axes[2:]]:  # loss, counts, fractions: never a negative range
        assert ax.get_ylim()[0] >= 0 and ax.get_ylim()[1] > 0, (ax.get_title(), ax.get_ylim())
    assert axes[2].get_ylim() == (0, 1) or any(int(r["nonfinite_grads"]) for r in history)


def test_train_telemetry_picture_fp32_has_no_lost_update_panel(tmp_path, monkeypatch, capsys):
    """fp32 params round nothing away: loss, step size and non-finite counts only, over 3 integer steps."""
    figures = _kept_telemetry_figures(monkeypatch)
    assert main(["train", "--dim", "16", "--depth", "1", "--heads", "2", "--context", "8", "--micro-batch", "2",
                 "--steps", "3", "--no-progress", "--device", "cpu", "--log-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "step size ||dp||/||p||" in out and "updates lost" not in out, out
    history = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    (fig,) = figures
    _check_telemetry_figure(fig, history, lossy=False)
    assert (tmp_path / "telemetry.png").stat().st_size > 10_000


@pytest.mark.parametrize("master", [False, True], ids=["bf16", "bf16+master"])
def test_train_telemetry_picture_shows_lost_updates_only_where_rounding_loses_them(master, tmp_path, monkeypatch,
                                                                                    capsys):
    """bf16 params: the lost-update panel appears without fp32 masters (and its curve is the logged,
    non-zero fraction), never with them."""
    import torch

    import mechgpu.optim as mo
    from mechgpu.tools.gpt import CharBatches, CharCorpus, TokenLoss
    from mechgpu.tools.jobs import TrainConfig, build_model, print_summary
    from mechgpu.train import Trainer

    figures = _kept_telemetry_figures(monkeypatch)
    cfg = TrainConfig(dim=16, depth=1, heads=2, context=8, micro_batch=2, accum_steps=1, steps=3).resolve()
    corpus = CharCorpus()
    model = build_model(cfg, corpus.vocab, "cpu").to(torch.bfloat16)
    opt = mo.AdamW(model.parameters(), lr=1e-3, telemetry=True, master_weights=master)
    assert opt.can_lose_updates is not master
    trainer = Trainer(model, TokenLoss(), opt, accum_steps=1, log_dir=tmp_path, progress=False)
    summary = trainer.fit(CharBatches(corpus.train, 2, 8, batches=10**9, seed=0), 3)
    print_summary(summary, trainer)
    out = capsys.readouterr().out
    assert ("updates lost to torch.bfloat16 rounding" in out) is not master, out
    lost = [r["lost_update_fraction"] for r in trainer.history]
    assert (max(lost) > 0) is not master, lost  # bf16 round-to-nearest swallows some of lr 1e-3's updates
    (fig,) = figures
    _check_telemetry_figure(fig, trainer.history, lossy=not master)
