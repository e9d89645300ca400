"""Robust command line (issue 15): bad --out / --device / --image-size refused before any work,
Ctrl-C is one line and exit 130, two processes share one cache entry, written files follow the
umask, `probe run` ends with a metrics table, every flag's help states its default, and
results.json describes only the datasets the suite read."""
import argparse
import contextlib
import io
import json
import os
import signal
import stat
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from types import SimpleNamespace

import pytest

from conftest import assert_one_line_error, write_ade20k, write_imagefolder
from encoder_probe.cli import build_parser, main, parsers
from encoder_probe.errors import SpecError

ENCODER = "timm:test_vit"  # 160px, 370k parameters


def _entries(cache: Path) -> list[Path]:
    return sorted(p for p in cache.iterdir() if not p.name.startswith("."))


def _files(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


@contextlib.contextmanager
def _reaped(proc: subprocess.Popen):
    """A subprocess that is never left running, whatever the test asserts."""
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def _tree(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in sorted(root.rglob("*"))}


@pytest.fixture
def no_compute(monkeypatch):
    """Any weight loading or training fails the test: the checks must come first."""
    import encoder_probe.encoders as encoders
    import encoder_probe.pivot.train as pivot_train
    import encoder_probe.runner as runner

    def refuse(*args, **kwargs):
        raise AssertionError("work started before the up-front checks")

    for module, name in ((encoders, "load_encoder"), (runner, "load_encoder"), (pivot_train, "train")):
        monkeypatch.setattr(module, name, refuse)


def _cli(capsys, argv) -> SimpleNamespace:
    code = main(argv)
    return SimpleNamespace(returncode=code, stderr=capsys.readouterr().err)


# -- 1. up-front checks ------------------------------------------------------------------------
SUBCOMMANDS = {  # argv before --out / the checked flag; every subcommand that takes --out or --device
    "inspect": ["inspect", ENCODER],
    "extract": ["extract", "--encoder", ENCODER, "--split", "val"],
    "run": ["run", "--encoder", ENCODER, "--suite", "imagenet"],
    "compare": ["compare", "RUNS"],
    "demo": ["demo"],
    "train": ["train", "sft", "--init", "INIT"],
}
TAKES_OUT = ("extract", "run", "compare", "demo", "train")
TAKES_DEVICE = ("inspect", "extract", "run", "train")
TAKES_IMAGE_SIZE = ("inspect", "extract", "run")


def _argv(name, tmp_path, *extra):
    return [a.replace("RUNS", str(tmp_path / "runs")).replace("INIT", str(tmp_path / "init"))
            for a in SUBCOMMANDS[name]] + list(extra)


@pytest.mark.parametrize("name", TAKES_OUT)
@pytest.mark.parametrize("where", ["file", "under-a-file"])
def test_out_that_cannot_be_a_directory_is_refused_first(tmp_path, capsys, no_compute, name, where):
    blocker = tmp_path / "taken"
    blocker.write_text("not a directory\n")
    out = blocker if where == "file" else blocker / "sub" / "out"
    before = _tree(tmp_path)
    proc = _cli(capsys, _argv(name, tmp_path, "--out", str(out)))
    assert_one_line_error(proc, f"--out {out}: ")
    assert f"{blocker} is a file" in proc.stderr if where == "under-a-file" else "is a file" in proc.stderr
    assert _tree(tmp_path) == before and blocker.read_text() == "not a directory\n"  # nothing written


@pytest.mark.parametrize("name", TAKES_DEVICE)
@pytest.mark.parametrize("device,message", [
    ("tpu9", "unknown device 'tpu9'"),
    pytest.param("cuda", "CUDA is not available", marks=pytest.mark.skipif(
        __import__("torch").cuda.is_available(), reason="this machine has CUDA")),
])
def test_bad_device_is_refused_first(tmp_path, capsys, no_compute, name, device, message):
    argv = _argv(name, tmp_path, "--device", device)
    if name in TAKES_OUT:
        argv += ["--out", str(tmp_path / "out")]
    proc = _cli(capsys, argv)
    assert_one_line_error(proc, "--device: ")
    assert message in proc.stderr and not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", TAKES_IMAGE_SIZE)
def test_image_size_form_is_checked_first_and_hxw_passes_as_given(tmp_path, capsys, monkeypatch, no_compute, name):
    argv = _argv(name, tmp_path) + (["--out", str(tmp_path / "out")] if name in TAKES_OUT else [])
    for bad in ("0", "12x", "big"):
        proc = _cli(capsys, [*argv, "--image-size", bad])
        assert_one_line_error(proc, "--image-size: image size")
    assert not (tmp_path / "out").exists()

    seen = {}  # 336x504 is no argparse error: it reaches load_encoder as the string given

    def load(spec, **options):
        seen.update(options)
        raise SpecError("stop here")
    import encoder_probe.encoders as encoders
    import encoder_probe.runner as runner
    monkeypatch.setattr(encoders, "load_encoder", load)
    monkeypatch.setattr(runner, "load_encoder", load)
    proc = _cli(capsys, [*argv, "--image-size", "336x504"])
    assert_one_line_error(proc, "stop here")
    assert seen["image_size"] == "336x504"


def _as_unprivileged(fn) -> tuple[int, str]:
    """fn() in a forked child that cannot write where its owner's permissions say no (as nobody when
    we are root, since root passes every permission check): (exit code, its stderr)."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: no threads of torch's are used, only argparse and the checks
        code = 99
        try:
            os.close(read)
            sys.stderr = os.fdopen(write, "w")
            if os.geteuid() == 0:
                os.setgroups([])
                os.setgid(65534)
                os.setuid(65534)
            code = fn()
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stderr.flush()
            os._exit(code if isinstance(code, int) else 98)
    os.close(write)
    with os.fdopen(read) as f:
        err = f.read()
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]), err


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_out_in_a_directory_without_write_permission_is_refused_first(no_compute):
    base = Path(tempfile.mkdtemp(prefix="probe-ro-"))  # under /tmp, which an unprivileged user can traverse
    try:
        os.chmod(base, 0o755)
        locked = base / "locked"
        locked.mkdir(mode=0o500)
        os.chmod(locked, 0o500)
        for argv in (["run", "--encoder", ENCODER, "--suite", "imagenet", "--out", str(locked / "results")],
                     ["extract", "--encoder", ENCODER, "--out", str(locked)]):
            code, err = _as_unprivileged(lambda: main(argv))
            assert_one_line_error(SimpleNamespace(returncode=code, stderr=err), f"--out {argv[-1]}: ")
            assert "not writable" in err
        assert list(locked.iterdir()) == []
    finally:
        os.chmod(base / "locked", 0o700)
        import shutil
        shutil.rmtree(base)


def test_run_suite_checks_every_input_before_loading_the_first_encoder(tmp_path, monkeypatch):
    import encoder_probe.runner as runner
    from encoder_probe.runner import run_suite
    loaded = []
    monkeypatch.setattr(runner, "load_encoder", lambda spec, **kw: loaded.append(spec) or 1 / 0)
    taken = tmp_path / "taken"
    taken.write_text("x")
    cases = [
        ({"encoders": [ENCODER, "nosuch:thing"]}, "unknown source 'nosuch'"),
        ({"encoders": [ENCODER, str(tmp_path / "missing-ckpt")]}, "no such directory"),
        ({"out": taken}, f"out {taken}: is a file"),
        ({"out": taken / "sub"}, f"{taken} is a file"),
        ({"cache": taken}, f"cache {taken}: is a file"),
        ({"device": "tpu9"}, "unknown device"),
        ({"dtype": "int3"}, "unknown dtype"),
        ({"image_size": "12x"}, "image size"),
        ({"suite": "imagenet,nosuch"}, "unknown probe"),
        ({"options": {"reference": ["nosuch:thing"]}, "suite": "align"}, "align.reference: unknown source"),
        ({"options": {"kss": 3}}, "no probe of this run takes 'kss'"),
    ]
    for change, message in cases:
        args = {"encoders": [ENCODER, ENCODER], "suite": "imagenet", "out": tmp_path / "out", **change}
        with pytest.raises(SpecError, match=message):
            run_suite(args.pop("encoders"), args.pop("suite"), args.pop("out"), **args)
    assert loaded == [] and not (tmp_path / "out").exists()


# -- 2. Ctrl-C -----------------------------------------------------------------------------------
@pytest.mark.slow
def test_ctrl_c_is_one_line_exit_130_no_traceback_and_nothing_half_written(tmp_path):
    data, out = tmp_path / "data", tmp_path / "out"
    # 400 images (about 20 s of extraction): on a loaded box this test may see the first chunk (and signal)
    # seconds late; the run must still be going, not in its final commit
    write_imagefolder(data, classes=("a", "b", "c", "d"), per_class=100, size=(64, 64))
    argv = [sys.executable, "-m", "encoder_probe", "extract", "--encoder", ENCODER, "--data", f"imagenet={data}",
            "--split", "train", "--tokens", "--batch-size", "2", "--chunk-size", "2", "--workers", "1",
            "--out", str(out)]
    # its own session, as a terminal's foreground job: Ctrl-C reaches the command and its loader workers.
    # A shell starts a job with SIGINT unblocked and at its default; the test process (a pytest-xdist
    # worker, after hundreds of tests) may hold it blocked, and a blocked signal mask is inherited
    # through fork and exec, so the job would never see the Ctrl-C.
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, [])

    def as_a_shell_starts_it():
        signal.pthread_sigmask(signal.SIG_SETMASK, [])
        signal.signal(signal.SIGINT, signal.SIG_DFL)

    with _reaped(subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                  start_new_session=True, preexec_fn=as_a_shell_starts_it)) as proc:
        deadline = time.time() + 120
        partial = None
        while time.time() < deadline and proc.poll() is None:
            partial = next(out.glob(".*.partial"), None) if out.exists() else None
            if partial is not None and any(partial.glob("chunk-*")):
                break
            time.sleep(0.01)
        assert proc.poll() is None, "the extraction finished before it could be interrupted"
        os.killpg(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=180)  # exits in about 2 s here; a loaded CI box is slower
    assert proc.returncode == 130, f"signals blocked in the test process: {sorted(blocked)}\n{err}"
    lines = err.strip().splitlines()
    assert lines[-1] == "probe: interrupted; the same command resumes", err
    assert sum("interrupted" in line for line in lines) == 1
    assert "Traceback" not in err and "KeyboardInterrupt" not in err and "Error" not in err, err
    assert _entries(out) == []  # no entry, and no half-written file
    assert not [p for p in out.rglob("*.tmp")]
    assert any(partial.glob("chunk-*")) and (partial / "plan.json").is_file()  # finished chunks kept to resume


# -- 3. two processes, one entry ---------------------------------------------------------------
@pytest.mark.slow
def test_two_processes_extracting_the_same_entry_both_succeed(tmp_path):
    """`probe extract` in a subprocess, and this process asking for the same entry while it extracts:
    the second waits on the entry's lock and reuses the finished entry (no crash, no stale .partial)."""
    from encoder_probe import load_encoder
    from encoder_probe.data import ImageFolder
    from encoder_probe.features import extract
    data, out = tmp_path / "data", tmp_path / "out"
    write_imagefolder(data, classes=("a", "b", "c", "d"), per_class=4, size=(32, 32))
    encoder, dataset = load_encoder(ENCODER), ImageFolder(data, "train")  # ready before the other one starts
    run = dict(tokens=True, batch_size=2, chunk_size=2, num_workers=0, progress=False)
    with _reaped(subprocess.Popen([sys.executable, "-m", "encoder_probe", "extract", "--encoder", ENCODER,
                                   "--data", f"imagenet={data}", "--split", "train", "--tokens", "--batch-size", "2",
                                   "--chunk-size", "2", "--workers", "0", "--out", str(out)],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)) as proc:
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:  # until the other process is mid-extraction
            partial = next(out.glob(".*.partial"), None) if out.exists() else None
            if partial is not None and any(partial.glob("chunk-*")):
                break
            time.sleep(0.005)
        assert proc.poll() is None, "the subprocess finished before the second extraction started"
        ours = extract(encoder, dataset, out=out, **run)
        stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0 and "Traceback" not in stderr, stderr
    [entry] = _entries(out)
    assert stdout.split(" -> ")[1].strip() == str(entry) and ours.path == entry
    assert not list(out.glob(".*.partial")) and not list(out.rglob("*.tmp"))
    alone = extract(encoder, ImageFolder(data, "train"), out=tmp_path / "alone", **run)
    assert alone.path.name == entry.name and _files(alone.path) == _files(entry)  # byte-identical arrays
    assert ours.index.tolist() == list(range(16))


# -- 4, 5, 7: one real `probe run` -------------------------------------------------------------
@pytest.fixture(scope="module")
def suite_run(tmp_path_factory):
    """`probe run --suite imagenet` (linear, 2 seeds, one C: the protocol is not under test) with
    classification and segmentation data given, under umask 0o022 and a cache of its own:
    (stdout, out dir, records, cache)."""
    root = tmp_path_factory.mktemp("suite")
    write_imagefolder(root / "cls", per_class=4, size=(40, 40))
    write_imagefolder(root / "cls", per_class=2, size=(40, 40), split="val", seed=1)
    write_ade20k(root / "ade", n=2, size=(48, 48))
    out, cache = root / "out", root / "cache"
    stdout = io.StringIO()
    old = os.umask(0o022)
    try:
        with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(stdout):
            mp.setenv("ENCODER_PROBE_CACHE", str(cache))
            code = main(["run", "--encoder", ENCODER, "--suite", "imagenet", "--seeds", "2", "--option", "Cs=[1.0]",
                         "--data", f"imagenet={root / 'cls'}", "--data", f"ade20k={root / 'ade'}", "--out", str(out)])
    finally:
        os.umask(old)
    assert code == 0
    records = [json.loads(p.read_text()) for p in sorted(out.glob("*/results.json"))]
    return stdout.getvalue(), out, records, cache


def test_results_describe_only_the_datasets_the_suite_read(suite_run):
    _, _, [record], _ = suite_run
    assert list(record["data"]) == ["imagenet"]  # ade20k was given but no probe of the suite read it
    assert record["data"]["imagenet"]["splits"] == {"train": 12, "val": 6}
    assert record["data"]["imagenet"]["root"] == record["probes"]["imagenet"]["data"]["root"]


def test_run_ends_with_a_table_of_every_metric_then_where_the_results_are(suite_run):
    stdout, out, [record], _ = suite_run
    lines = stdout.rstrip().splitlines()
    assert lines[-1] == f"results in {out}"
    metrics = record["probes"]["imagenet"]["metrics"]
    assert "top1" in metrics and len(lines) == 2 + len(metrics) + 1  # header, rule, a row per metric, where
    for name, m in metrics.items():
        low, high = m["ci95"]  # the bootstrap interval over the val images
        seed_low, seed_high = m["seed_ci95"]  # two seeds: and the interval over seeds
        [row] = [line for line in lines if f" {name} " in line]
        assert row.split()[:3] == [ENCODER, "imagenet", name]
        assert row.endswith(f"{m['value']:.3f} [{low:.3f}, {high:.3f}] seeds [{seed_low:.3f}, {seed_high:.3f}]")


def test_summary_table_rows_and_failures():
    from encoder_probe.runner import summary_table
    records = [{"encoder": {"spec": "a:x"}, "probes": {
        "p": {"status": "ok", "metrics": {"acc": {"value": 0.8123, "higher_is_better": True},
                                          "loss": {"value": 2.5, "ci95": [2.25, 2.75], "higher_is_better": False}}},
        "q": {"status": "failed", "error": "RuntimeError: boom\nmore"}}},
        {"encoder": {"spec": "b:yy"}, "probes": {"p": {"status": "ok", "metrics": {
            "acc": {"value": 0.5, "higher_is_better": True}}}}}]
    rows = [line.split() for line in summary_table(records).splitlines()[2:]]
    assert rows == [["a:x", "p", "acc", "0.812"], ["a:x", "p", "loss", "2.500", "[2.250,", "2.750]"],
                    ["a:x", "q", "-", "failed:", "RuntimeError:", "boom"], ["b:yy", "p", "acc", "0.500"]]


def test_written_files_and_dirs_follow_the_umask(suite_run, tmp_path):
    _, out, _, cache = suite_run  # written under umask 0o022
    [results] = out.glob("*/results.json")
    assert stat.S_IMODE(results.stat().st_mode) == 0o644
    entries = _entries(cache / "features")
    assert len(entries) == 2  # train and val
    for entry in entries:
        assert stat.S_IMODE(entry.stat().st_mode) == 0o755
        assert {stat.S_IMODE(f.stat().st_mode) for f in entry.iterdir()} == {0o644}

    from encoder_probe.cache import atomic_dir, atomic_write_json
    old = os.umask(0o027)
    try:
        atomic_write_json(tmp_path / "a.json", {})
        with atomic_dir(tmp_path / "d") as d:
            (d / "x").write_text("x")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == 0o640
    assert stat.S_IMODE((tmp_path / "d").stat().st_mode) == 0o750


# -- 6. help and --version ---------------------------------------------------------------------
def _help_problems(parsers_) -> list[str]:
    """Flags without help, options whose help (as printed) does not state a default, or says None."""
    problems = []
    for each in parsers_:
        formatter = each._get_formatter()
        for action in each._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            name = f"{each.prog} {'/'.join(action.option_strings) or action.dest}"
            if not (action.help or "").strip():
                problems.append(f"{name}: no help")
                continue
            text = formatter._expand_help(action)
            if action.option_strings and not action.required and not isinstance(action, argparse._VersionAction) \
                    and "default" not in text:
                problems.append(f"{name}: help does not state the default")
            if "None" in text:
                problems.append(f"{name}: help says None")
    return problems


def _is_train(parser) -> bool:
    return parser.prog.split()[1:2] == ["train"]


def test_every_flag_has_help_that_states_its_default():
    parser = build_parser()
    main_parsers = [each for each in parsers(parser) if not _is_train(each)]
    assert len(main_parsers) == 9  # probe + list, inspect, extract, run, compare, check, demo, convert
    assert _help_problems(main_parsers) == []
    [extract] = [each for each in main_parsers if each.prog == "probe extract"]
    text = extract.format_help()
    assert "(default: 64)" in text and "(default: off)" in text and "None" not in text


def test_every_train_flag_has_help_that_states_its_default():
    train = [each for each in parsers(build_parser()) if _is_train(each)]
    assert len(train) == 6  # train + pretrain, sft, dpo, transplant, export
    assert _help_problems(train) == []


def test_version(capsys):
    from encoder_probe import __version__
    with pytest.raises(SystemExit) as exit:
        main(["--version"])
    assert exit.value.code == 0 and capsys.readouterr().out == f"probe {__version__}\n"


def test_compare_reference_flag_picks_the_run_of_every_delta(tmp_path):
    import json as _json

    from encoder_probe.cli import main

    def write(name, spec, top1, created):
        run = tmp_path / "runs" / name
        run.mkdir(parents=True)
        metrics = {"top1": {"value": top1, "higher_is_better": True}}
        record = {"schema_version": 2, "created": created,
                  "encoder": {"spec": spec, "source": "timm", "fingerprint": name * 64, "layer": "final",
                              "pooling": "mean", "n_params": 1},
                  "data": {}, "env": {}, "probes": {"imagenet": {"status": "ok", "metrics": metrics}}}
        (run / "results.json").write_text(_json.dumps(record))
    # fingerprint order (a, b) is not run order (b first)
    write("a", "timm:second", 0.5, "2026-12-01T00:00:02+00:00")
    write("b", "timm:first", 0.75, "2026-12-01T00:00:01+00:00")
    assert main(["compare", str(tmp_path / "runs"), "--out", str(tmp_path / "r1")]) == 0
    table = (tmp_path / "r1" / "table.md").read_text()
    assert table.index("timm:first") < table.index("timm:second") and "-0.25" in table
    assert main(["compare", str(tmp_path / "runs"), "--out", str(tmp_path / "r2"), "--reference", "timm:second"]) == 0
    assert "0.25" in (tmp_path / "r2" / "table.md").read_text() and "-0.25" not in (tmp_path / "r2" / "table.md").read_text()
    assert main(["compare", str(tmp_path / "runs"), "--out", str(tmp_path / "r3"), "--reference", "nope"]) == 2
    assert not (tmp_path / "r3").exists()
