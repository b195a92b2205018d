"""bench/quality_vs_time.py's pieces on the tiny config: the budget clock's stopping rule (on a
fake clock), its one-line errors, the judge's wiring (samplers, spacing, sample sizes, the real
floor), the judge-only mode (--judge) and the tables. The timed training itself is the
benchmark's, never a test's."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
from checkpoint_fixtures import state_at, tiny_config, write_checkpoints
from PIL import Image

import sampling_lib
from bench import quality_vs_time as qvt
from errors import UserError
from evaluation import digit_quality


def test_the_budget_clock_starts_at_the_loops_first_call_and_stops_on_the_first_step_past_it(
        monkeypatch):
    now = iter([100.0, 104.0, 109.9, 110.2, 111.0])
    monkeypatch.setattr(qvt.time, "perf_counter", lambda: next(now))
    clock = qvt.BudgetClock(10.0, "test", report_every_s=1e9)
    answers = [clock(step, jnp.zeros(2)) for step in (7, 8, 9, 10)]
    assert answers == [False, False, False, True]  # 0, 4, 9.9, 10.2 s after the first call
    assert (clock.first_step, clock.step) == (7, 10)
    assert clock.wall_s == pytest.approx(10.2)


@pytest.mark.parametrize("bad, words", [
    (lambda c: qvt.parse_samplers(["ddim"]), "is not SAMPLER:STEPS"),
    (lambda c: qvt.parse_samplers(["euler:10"]), "is not SAMPLER:STEPS"),
    (lambda c: qvt.check(c, [("ddim", 101)], [0.0], [1.0], 16), "more steps than"),
    (lambda c: qvt.check(c, [("ddim", 5)], [0.0], [5.0, 2.5], 16), "increasing positive"),
    (lambda c: qvt.check(c, [("ddim", 5)], [-1.0], [1.0], 16), "scales are >= 0"),
    (lambda c: qvt.check(c, [("ddim", 5)], [0.0], [1.0], 1), "needs >= 2 samples"),
    (lambda c: qvt.check(tiny_config(**{"diffusion.p_uncond": 0.0}), [("ddim", 5)], [1.0],
                         [1.0], 16), "null label"),
    (lambda c: qvt.check(tiny_config(**{"model.num_classes": 0, "diffusion.p_uncond": 0.0}),
                         [("ddim", 5)], [0.0], [1.0], 16), "model.num_classes=0"),
    (lambda c: qvt.load_config("configs/tiny.py", ["--config.model.chh=16"]), 'Did you mean "ch"'),
    (lambda c: qvt.load_config("configs/tiny.py", ["--config.model.ch=wide"]), "invalid literal"),
    (lambda c: qvt.prepare(tiny_config(**{"optim.decay_steps": 6}), max_steps=100),
     "judged in mid-decay"),
])
def test_bad_arguments_give_one_line_before_anything_is_built(bad, words):
    with pytest.raises(UserError) as info:
        bad(tiny_config())
    assert words in str(info.value) and "\n" not in str(info.value)


def test_overrides_are_applied_and_the_periodic_work_turned_off():
    config = qvt.prepare(qvt.load_config("configs/tiny.py", [
        "--config.model.ch=16", "--config.model.ch_mult=(1,2,2)",
        "--config.train.sample_every=2"]), max_steps=1001)
    assert config.model.ch == 16 and tuple(config.model.ch_mult) == (1, 2, 2)
    assert (config.train.sample_every, config.eval.bpd_every, config.eval.fid_every) == (0, 0, 0)
    assert config.train.num_steps == 1001
    assert qvt.default_name("configs/tiny.py", ["--config.model.ch=16"]) == "tiny-model.ch=16"


def test_the_judge_samples_once_for_every_size_and_its_floor_is_real_digits(tmp_path):
    """DPM-Solver++ keeps its own timesteps when the config asks DDIM for trailing ones; the
    smaller sample is the larger one's first n (sampled once); the floor judges real held-out
    digits with their own labels (the classifier knows them: accuracy ~99%, black borders)."""
    config = tiny_config(**{"sample.spacing": "trailing", "eval.fid_ref_num_examples": 512})
    judge = qvt.Judge(config, str(tmp_path), [("ddim", 3), ("dpm_solver_pp_2m", 3)], [0.0, 1.0],
                      sizes=[16, 8])
    assert judge.spacing == {"ddim-3": "trailing", "dpm_solver_pp_2m-3": "linspace"}
    assert {k: s.spec.spacing for k, s in judge.samplers.items()} == {
        ("ddim-3", 0.0): "trailing", ("ddim-3", 1.0): "trailing",
        ("dpm_solver_pp_2m-3", 0.0): "linspace", ("dpm_solver_pp_2m-3", 1.0): "linspace"}
    floor = judge.floor()
    assert set(floor) == {"8", "16"} and floor["16"]["accuracy"] >= 0.9
    assert floor["16"]["border"] < 0.02 and floor["16"]["fid"] > 0

    judge = qvt.Judge(config, str(tmp_path), [("ddim", 2)], [0.0], sizes=[8, 16])
    params = state_at(config, 0).ema_params
    results, _ = judge(params, "test")
    row = results["ddim-2"]["0"]
    alone = sampling_lib.sample_many(judge.samplers[("ddim-2", 0.0)], params, num_samples=8,
                                     cond={"label": judge.labels[:8]}, seed=config.sample.seed,
                                     guidance_scale=0.0)
    expected = digit_quality.judge(judge.net, qvt.metric_logging.to_uint8(alone),
                                   np.arange(8) % 10, real=judge.real)
    assert row["8"] == pytest.approx(expected)
    assert row["16"]["fid"] != row["8"]["fid"]


def _result(fid):
    """A result with 2 checkpoints x 2 samplers x 2 scales, MNIST-FID from fid(c, s, w)."""
    def metrics(value):
        return {"accuracy": 0.9, "confident": 0.8, "border": 0.05, "fid": value}

    checkpoints = [{"budget_min": b, "step": 10 * (c + 1), "trained_min": b + 0.01,
                    "steps_per_s": 3.0, "cpu_s_per_wall_s": 1.9, "setup_s": 30.0,
                    "loadavg_1min": [1.0, 2.0],
                    "results": {s: {w: {"500": metrics(fid(c, s, w))} for w in ("0", "1")}
                                for s in ("ddim-50", "ancestral-100")}}
                   for c, b in enumerate((2.5, 5.0))]
    return {"name": "t", "config_file": "configs/mnist.py", "overrides": [],
            "machine": {"cpu": "CPU", "cores": 2, "avx512f": False, "devices": "2 x cpu",
                        "date": "today"}, "num_samples": [500],
            "floor": {"500": metrics(10.0)}, "checkpoints": checkpoints}


def test_the_table_has_a_row_per_checkpoint_sampler_and_scale_and_the_plot_is_written(tmp_path):
    result = _result(lambda c, s, w: 100.0 / (c + 1) + len(s) + float(w))
    table = qvt.markdown(result)
    rows = [line for line in table.splitlines() if line.startswith("| 2.51 ")
            or line.startswith("| 5.01 ")]
    assert len(rows) == 2 * 2 * 2
    cells = rows[0].split(" | ")  # 2.51 min, step 10, ddim-50, w 0: MNIST-FID 107 = 10.7 x floor
    assert cells[1:7] == ["10", "ddim-50", "0", "107.00", "10.70", "0.900"]
    assert "| real held-out digits | | | | 10.00 | 1.00 |" in table
    path = qvt.plot(result, str(tmp_path / "plot.png"))
    with Image.open(path) as image:
        assert image.size == (640, 340)


def test_judge_mode_judges_the_newest_checkpoint_once_per_seed(tmp_path):
    """--judge: the newest checkpoint (step 2 of 1, 2) with config.sample.use_ema's parameters,
    each seed's samples judged as the training mode judges them; the table shows mean ± sd."""
    config = tiny_config(**{"eval.fid_ref_num_examples": 512})
    with pytest.raises(UserError, match="No checkpoint"):
        qvt.judge_workdir(config, str(tmp_path / "empty"), sampler_steps=[("ddim", 2)],
                          scales=[0.0], sizes=[8], seeds=[0], out_json="", about={})
    workdir = tmp_path / "run"
    states = write_checkpoints(workdir, config, [1, 2])
    out = tmp_path / "judged.json"
    result = qvt.judge_workdir(config, str(workdir), sampler_steps=[("ddim", 2)], scales=[0.0],
                               sizes=[8], seeds=[3, 4], out_json=str(out), about={"name": "t"})
    assert result["step"] == 2 and result["seeds"] == [3, 4] and result["params"] == "ema"
    assert json.loads(out.read_text())["by_seed"] == json.loads(json.dumps(result["by_seed"]))
    rows = [result["by_seed"][seed]["ddim-2"]["0"]["8"] for seed in ("3", "4")]
    assert rows[0]["fid"] != rows[1]["fid"]  # another seed, other samples

    judge = qvt.Judge(config, str(workdir), [("ddim", 2)], [0.0], sizes=[8])
    alone, _ = judge(states[2].ema_params, "test", seed=4)
    assert alone["ddim-2"]["0"]["8"] == pytest.approx(rows[1])

    table = qvt.markdown_judged(result)
    fids = [r["fid"] for r in rows]
    line = next(x for x in table.splitlines() if x.startswith("| ddim-2 | 0 | "))
    assert f"{np.mean(fids):.2f} ± {np.std(fids, ddof=1):.2f}" in line
    assert line.endswith(f"| {fids[0]:.2f} {fids[1]:.2f} |")
    assert "| real held-out digits | |" in table and "seeds 3 4" in table
