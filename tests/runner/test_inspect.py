"""The deploy flow's reading of `@isolated(...)` (runner/fal_runner/inspect_source.py):
every form the seed and its users write, and every refusal with its line — the file is
parsed, never run."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "runner"))
from fal_runner.inspect_source import Refusal, inspect_source  # noqa: E402

SEED = '''
from fal_serverless import isolated

@isolated(requirements=["flask"], machine_type="GPU-T4", keep_alive=300, exposed_port=8080)
def app():
    from flask import Flask, request
    app = Flask("test")
    app.run(host="0.0.0.0", port=8080)
'''


def test_the_seed():
    got = inspect_source(SEED, "app")
    assert got == {"function": "app", "line": 5, "ignored": [], "requirements": ["flask"],
                   "machine_type": "GPU-T4", "keep_alive": 300, "exposed_port": 8080}


@pytest.mark.parametrize("header, decorator", [
    ("import fal_serverless", "@fal_serverless.isolated(requirements=REQS)"),
    ("import fal_serverless as fs", "@fs.isolated(requirements=REQS)"),
    ("from fal_serverless import isolated as iso", "@iso(requirements=REQS)"),
])
def test_import_forms_and_a_named_list(header, decorator):
    src = f"{header}\nREQS = ['flask==3.1', 'numpy']\n{decorator}\ndef f():\n    pass\n"
    assert inspect_source(src, "f")["requirements"] == ["flask==3.1", "numpy"]


def test_bare_decorator_and_all_arguments():
    src = ("from fal_serverless import isolated\n@isolated\ndef f(): pass\n"
           "@isolated(min_concurrency=1, max_concurrency=3, python_version='3.11', kind='virtualenv')\n"
           "def g(): pass\n")
    assert inspect_source(src, "f")["function"] == "f"
    g = inspect_source(src, "g")
    assert (g["min_concurrency"], g["max_concurrency"], g["python_version"], g["ignored"]) == (1, 3, "3.11", ["kind"])


def test_nothing_runs():
    src = "import os\nos.system('touch /tmp/should-not-exist')\nraise SystemExit(1)\n" + SEED
    assert inspect_source(src, "app")["exposed_port"] == 8080


@pytest.mark.parametrize("src, function, words, line", [
    (SEED, "nope", ["no function 'nope'", "app"], None),
    ("def app(): pass\n", "app", ["not decorated with @isolated"], 1),
    ("from fal_serverless import isolated\n@isolated(\ndef f(:\n", "f", ["does not parse"], 3),
    ("from fal_serverless import isolated\nimport os\n@isolated(requirements=os.environ['R'])\ndef f(): pass\n",
     "f", ["requirements=", "literal"], 3),
    ("from fal_serverless import isolated\n@isolated(requirements=MISSING)\ndef f(): pass\n",
     "f", ["MISSING", "not bound"], 2),
    ("from fal_serverless import isolated\n@isolated(keep_alive='long')\ndef f(): pass\n",
     "f", ["keep_alive= must be an integer"], 2),
    ("from fal_serverless import isolated\n@isolated(requirements=[1])\ndef f(): pass\n",
     "f", ["list of strings"], 2),
    ("from fal_serverless import isolated\n@isolated(gpu=True)\ndef f(): pass\n",
     "f", ["no argument 'gpu'"], 2),
    ("from fal_serverless import isolated\nopts = {}\n@isolated(**opts)\ndef f(): pass\n",
     "f", ["**options"], 3),
])
def test_refusals_say_what_and_where(src, function, words, line):
    with pytest.raises(Refusal) as err:
        inspect_source(src, function, "app.py")
    for w in words:
        assert w in str(err.value), str(err.value)
    assert err.value.line == line
