"""console.py: a quiet terminal (say lines and one progress line), everything else in <output_dir>/logs/.

    .venv/bin/python -m pytest tests/test_console.py -q
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

from transformllm_ray.console import Progress

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CHILD = textwrap.dedent("""
    import logging, os, subprocess, sys
    from transformllm_ray.console import progress, quiet_console, say
    logging.basicConfig(level=logging.INFO)
    with quiet_console(sys.argv[1], verbose=sys.argv[2] == "1") as path:
        say("[stage] started")
        print("a print")
        logging.getLogger("ray.data").info("a library log line")
        os.write(1, b"raw fd 1\\n")
        os.write(2, b"raw fd 2\\n")
        subprocess.run([sys.executable, "-c", "print('from a child process')"])
        with progress("stage", 3, "units") as bar:
            bar.update(3)
        say("[stage] done", err=False)
        say("a refusal", err=True)
    print("after the session")
""")


def _run(out_dir: str, verbose: bool) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", CHILD, out_dir, "1" if verbose else "0"], cwd=REPO,
                          capture_output=True, text=True, timeout=60)


def test_quiet_terminal_and_full_log(tmp_path):
    r = _run(str(tmp_path / "out"), verbose=False)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["[stage] started", "[stage] done", "after the session"]
    assert r.stderr.splitlines() == ["a refusal"]
    log = (tmp_path / "out/logs/driver.log").read_text()
    for line in ("a print", "a library log line", "raw fd 1", "raw fd 2", "from a child process", "[stage] done"):
        assert line in log, line
    assert "after the session" not in log
    # a second invocation appends
    _run(str(tmp_path / "out"), verbose=False)
    assert (tmp_path / "out/logs/driver.log").read_text().count("from a child process") == 2


def test_verbose_keeps_everything_on_the_terminal(tmp_path):
    r = _run(str(tmp_path / "out"), verbose=True)
    assert r.returncode == 0, r.stderr
    for line in ("[stage] started", "a print", "raw fd 1", "from a child process"):
        assert line in r.stdout, line
    assert "raw fd 2" in r.stderr and "a library log line" in r.stderr
    assert not (tmp_path / "out/logs").exists()


def test_progress_line_counts_rate_and_eta():
    bar = Progress("ingest", 200, "shards")
    bar.t0 -= 10
    bar.update(50, tokens=2_500_000)
    line = bar.line(bar.t0 + 10)
    assert line.startswith("[ingest] 50/200 shards"), line
    assert "5.00 shards/s" in line and "tokens 2.5M" in line and "250.0k tokens/s" in line, line
    assert "ETA 0:00:30" in line, line
    bar.update(150)
    assert "ETA" not in bar.line(bar.t0 + 20)


def test_progress_rate_leaves_out_the_start_up():
    """Training: 1 step seen after 60 s of start-up, 5 more in the next 10 s -> 0.5 steps/s, not 6/70."""
    bar = Progress("train", 100, "steps")
    bar.t0 -= 60
    bar.set(1, loss=2.5)
    bar._first = (bar._first[0] - 10, 1, 0.0)  # that first sight was 10 s ago
    bar.set(6, loss=2.0)
    line = bar.line(bar._first[0] + 10)
    assert "6/100 steps" in line and "0.50 steps/s" in line and "loss 2.000" in line and "ETA 0:03:08" in line, line


FAILING = textwrap.dedent("""
    import sys
    import transformllm_ray.cli as cli
    def run_stages(*a, **k):  # a stage that fails once Ray runs: what the CLI shows of it
        print("noise a stage printed")
        raise RuntimeError("the engine died: boom\\nsecond line of the message")
    cli.run_stages = run_stages
    sys.exit(cli.main(["ingest", "--config", sys.argv[1], f"output_dir={sys.argv[2]}"]))
""")


def test_cli_failure_is_one_line_with_the_log_path(tmp_path):
    """A failed stage: exit 1, one line on stderr naming the error and the log; the traceback in the log."""
    r = subprocess.run([sys.executable, "-c", FAILING, "configs/debug-local.yaml", str(tmp_path / "out")],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1, r.stderr
    log = f"{tmp_path}/out/logs/driver.log"
    assert r.stderr.strip().splitlines() == [
        f"transformllm: failed: RuntimeError: the engine died: boom (traceback and logs: {log})"], r.stderr
    assert "noise" not in r.stdout
    text = open(log).read()
    assert "Traceback" in text and "second line of the message" in text and "noise a stage printed" in text


def test_cli_missing_input_is_one_line(tmp_path):
    """An input path that matches nothing is refused before Ray starts, in one line naming it."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"extends: {REPO}/configs/debug-local.yaml\noutput_dir: {tmp_path}/out\n"
                   f"input: {{builtin: null, paths: ['{tmp_path}/nothing-here/*.jsonl']}}\n")
    r = subprocess.run([sys.executable, "-m", "transformllm_ray.cli", "ingest", "--config", str(cfg)], cwd=REPO,
                       capture_output=True, text=True, timeout=120, env={**os.environ, "RAY_ADDRESS": ""})
    assert r.returncode == 2, r.stderr
    assert "nothing-here" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not os.path.exists(f"{tmp_path}/out/logs")
