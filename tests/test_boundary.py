"""No module below the config boundary reads a ConfigDict (STYLE.md, principle 3).

The modes (main.py, train_lib, generate, evaluate, text_eval, figures, text_conditioning,
classifier_training) and config_lib/config_compat read the config and turn it into the typed
arguments of run_args.py; everything below them takes typed arguments only. Checked on the
source with `ast`: no ml_collections import, no import of a boundary module, and no access to a
config section (`config.sample`, `self._config.eval`, ...) on anything named like a config.
"""

import ast
import pathlib

import pytest

from configs import default

REPO = pathlib.Path(__file__).resolve().parents[1]
BELOW = ("diffusion", "models", "text", "evaluation", "sampling_lib.py", "training_loop.py",
         "run_args.py", "input_pipeline.py", "metric_logging.py", "data_spec.py")
BOUNDARY = {"config_lib", "config_compat", "configs", "train_lib", "classifier_training",
            "generate", "evaluate", "text_eval", "figures", "text_conditioning", "main"}
SECTIONS = set(default.get_config().keys())  # data, model, diffusion, ..., seed


def _modules() -> list[pathlib.Path]:
    files = []
    for name in BELOW:
        path = REPO / name
        files += sorted(path.rglob("*.py")) if path.is_dir() else [path]
    return files


def _named_like_a_config(node: ast.expr) -> bool:
    name = node.id if isinstance(node, ast.Name) else getattr(node, "attr", "")
    return "config" in name.lower() or name.lower() in ("cfg", "conf")


def violations(source: str) -> list[str]:
    """What in `source` reads a ConfigDict, one line each ([] when nothing does)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import | ast.ImportFrom):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [
                node.module or ""]
            for name in names:
                top = name.split(".")[0]
                if top == "ml_collections" or top in BOUNDARY:
                    found.append(f"line {node.lineno}: imports {name}")
        elif (isinstance(node, ast.Attribute) and node.attr in SECTIONS
              and _named_like_a_config(node.value)):
            found.append(f"line {node.lineno}: reads {ast.unparse(node)}")
    return found


def test_the_checker_finds_each_kind_of_config_use():
    assert {"data", "sample", "eval", "train", "seed"} <= SECTIONS
    source = ("import ml_collections\n"
              "from config_lib import sampler_spec\n"
              "def f(config, self):\n"
              "    return config.sample.num_steps, self._config.eval, cfg.seed\n")
    assert sorted(violations(source)) == ["line 1: imports ml_collections",
                                          "line 2: imports config_lib",
                                          "line 4: reads cfg.seed",
                                          "line 4: reads config.sample",
                                          "line 4: reads self._config.eval"]
    # A typed value's fields are fine, also when the typed value is called `config`.
    assert violations("def f(sample, config):\n    return sample.spec, config.width\n") == []


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(REPO)))
def test_no_module_below_the_boundary_reads_a_config(path):
    assert violations(path.read_text()) == [], path


def test_every_directory_below_the_boundary_has_modules():
    modules = {p.relative_to(REPO).parts[0] for p in _modules()}
    assert modules == set(BELOW)
