"""``benchmarks/gpu_check.sh`` runs only when a GPU machine is lent (rarely, for minutes),
while the benchmarks it calls change with every measurement: each of its calls must be one
that the called script's parser accepts, in the full check and in ``QUICK=1``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Stands in for `python` on gpu_check.sh's PATH: a benchmark script only has its
# arguments parsed (and the outcome logged); anything else (`-c "import torch"`) runs.
# The script's folder comes first on sys.path, as when Python runs a script.
CHECK_ARGUMENTS = """
import importlib.util, json, os, subprocess, sys
args = sys.argv[1:]
if not args or not args[0].endswith(".py"):
    sys.exit(subprocess.call([{python!r}, *args]))
sys.path.insert(0, os.path.dirname(os.path.abspath(args[0])))
spec = importlib.util.spec_from_file_location("benchmark", args[0])
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
try:
    module.parse_args(args[1:])
    status = 0
except SystemExit as stop:  # argparse's way to refuse an option
    status = stop.code
with open({log!r}, "a") as handle:
    handle.write(json.dumps({{"script": args[0], "args": args[1:], "status": status}}) + "\\n")
"""


@pytest.mark.parametrize("quick", ["", "1"], ids=["full", "quick"])
def test_gpu_check_calls_each_benchmark_with_options_it_accepts(tmp_path, quick):
    log, bin_dir = tmp_path / "calls.jsonl", tmp_path / "bin"
    bin_dir.mkdir()
    (tmp_path / "check_arguments.py").write_text(CHECK_ARGUMENTS.format(python=sys.executable, log=str(log)))
    shim = bin_dir / "python"
    shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{tmp_path / "check_arguments.py"}" "$@"\n')
    shim.chmod(0o755)
    env = os.environ | {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "QUICK": quick}
    done = subprocess.run(["bash", "benchmarks/gpu_check.sh", str(tmp_path / "out")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    assert [Path(call["script"]).name for call in calls] == [
        "gpu_check.py", "predict_throughput.py", "serve_load.py", "gpu_check.py"], done.stdout + done.stderr
    refused = [call for call in calls if call["status"] != 0]
    assert not refused, f"{refused}\n{done.stderr[-3000:]}"
