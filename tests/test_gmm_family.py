"""The family of exact Gaussian-mixture worlds (issue 18): seeded, in range, well posed, exact teachers."""

import pytest
import torch

from comfyui_distillery.worlds.family import PREDICTION_TYPES, family, make_world, teacher_sample
from comfyui_distillery.worlds.gmm import evaluate_gmm_samples

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_worlds_are_deterministic_in_range_and_well_posed():
    worlds = family(24, seed=0)
    again = family(24, seed=0)
    for w, v in zip(worlds, again):
        assert w.name == v.name
        for a, b in ((w.mixture.means, v.mixture.means), (w.mixture.stds, v.mixture.stds),
                     (w.mixture.weights, v.mixture.weights)):
            assert torch.equal(a, b)
    assert worlds[5].name == make_world(5).name  # a world is its own seed's, not its position's
    dims = [w.dim for w in worlds]
    modes = [w.modes_per_class for w in worlds]
    assert min(dims) >= 2 and max(dims) <= 32 and len(set(dims)) > 8
    assert min(modes) >= 2 and max(modes) <= 25 and len(set(modes)) > 8
    assert {w.num_classes for w in worlds} == {1, 2, 3}
    assert [w.prediction_type for w in worlds[:6]] == list(PREDICTION_TYPES) * 2
    for w in worlds:
        d = w.describe()
        assert d["min_separation"] >= w.separation - 1e-9
        assert 1.0 < d["max_weight_ratio"] <= 3.0 + 1e-9  # unequal, at most 3:1
        assert d["std_range"][0] >= 0.2 * 0.8 - 1e-9 and d["std_range"][1] <= 0.3 * 1.25 + 1e-9
    # fixing one field keeps the other draws of the seed
    w = make_world(4, dim=2, modes_per_class=25)
    assert (w.dim, w.modes_per_class, w.num_classes) == (2, 25, worlds[4].num_classes)
    assert w.describe()["min_separation"] >= 6.0 and w.half_width > 2.0  # a crowded 2-d world gets room


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_a_family_teacher_is_the_exact_denoiser(prediction_type):
    """Tweedie: E[x0 | x] = (x + s^2 grad log p(x)) / a under the world's own schedule, in its own output."""
    world = make_world(11, dim=5, num_classes=2, modes_per_class=4, prediction_type=prediction_type)
    teacher = world.teacher()
    schedule = teacher.schedule
    assert schedule.prediction_type == prediction_type
    g = torch.Generator().manual_seed(0)
    labels = torch.tensor([0, 1, 2, 0, 1, 1])  # 2 = unconditional
    sigma = schedule.sigma(torch.tensor([30.0, 200.0, 400.0, 600.0, 800.0, 990.0], dtype=torch.float64))
    a, s = schedule.scales(sigma)
    x = (a[:, None] * 2 * torch.randn(6, 5, generator=g, dtype=torch.float64)
         + s[:, None] * torch.randn(6, 5, generator=g, dtype=torch.float64)).requires_grad_()
    (score,) = torch.autograd.grad(world.mixture.log_prob_noisy(x, labels, a, s).sum(), x)
    tweedie = (x + (s ** 2)[:, None] * score) / a[:, None]
    native = teacher(x.detach(), sigma, labels, output=prediction_type)
    assert torch.allclose(schedule.to_x0(native, x.detach(), sigma), tweedie, atol=1e-9)


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_the_teacher_sampler_reproduces_a_small_world(prediction_type):
    """The exact teacher's own 50-step sampler on a small world (3-d, 2 classes x 3 modes), 8000 samples per
    class, against exact samples of the mixture. Tolerance: recall (chi-square 0.999) >= 0.88 for every mode
    and >= 0.95 on average, off-mode share <= 0.5%, every mode's spread within [0.8, 1.05], SW2 within 2.5x
    of the exact-vs-exact floor. The deterministic sampler is not exact: its last step (VP: from t = 19,
    sigma 0.13, to 0) returns the posterior mean, which shrinks a mode of std s by s / sqrt(s^2 + sigma^2)
    (0.83 at s = 0.2), and its step error moves some mass between modes (here the VP sampler leaves one mode
    with 0.906 of its weight, measured; flow 0.98); that is why students are scored against this sampler."""
    world = make_world(7, dim=3, num_classes=2, modes_per_class=3, prediction_type=prediction_type)
    labels = torch.arange(world.num_classes).repeat_interleave(8000)
    noise = torch.randn(len(labels), world.dim, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x = teacher_sample(world, labels, noise)
    res = evaluate_gmm_samples(world.mixture, x, labels)
    exact = evaluate_gmm_samples(world.mixture, world.mixture.sample(labels, torch.Generator().manual_seed(1))[0],
                                 labels)
    print(prediction_type, {k: round(v, 4) for k, v in res.items() if isinstance(v, float)})
    assert res["recall_min"] >= 0.88 and res["recall_mean"] >= 0.95 and exact["recall_min"] >= 0.9
    assert res["off_mode_share"] <= 0.005
    spread = torch.tensor(res["spread"])
    assert float(spread.min()) >= 0.8 and float(spread.max()) <= 1.05
    assert res["swd"] <= 2.5 * exact["swd"]


def test_the_family_benchmark_runs_and_writes_every_field(tmp_path):
    """benchmarks/gmm_family.py --smoke: one tiny world, every registered method, a few iterations each."""
    import json
    from pathlib import Path

    from comfyui_distillery.trainers.registry import method_names

    bench = _load_bench()
    result = bench.main(["--smoke", "--out", str(tmp_path)])
    data = json.loads(Path(result["json"]).read_text())
    assert (tmp_path / "gmm_family-smoke.md").stat().st_size > 0
    assert data["methods"] == method_names()
    (world,) = data["worlds"]
    kinds = [r.get("method", r["kind"]) for r in world["rows"]]
    assert kinds == ["exact", "teacher", "base", *method_names()]  # base: the fitted MLP the students distil
    for r in world["rows"]:
        for key in ("swd_per_class", "swd_ratio", "recall_min", "recall_mean", "recall_min_per_class",
                    "off_mode_share", "coverage_min", "spread_median", "recall", "missed_modes", "pass"):
            assert key in r, key
        assert 0.0 <= r["recall_min"] <= r["recall_mean"] <= 1.0
    assert world["rows"][1]["swd_ratio"] == 1.0  # the teacher is its own reference
    # each student row records the options it ran with: a 1-step student conditions at 399 on epsilon worlds
    one_step = {r["method"]: r["options"].get("student_timesteps") for r in world["rows"][3:]}
    if world["world"]["prediction_type"] == "epsilon":
        assert one_step["dmd2"] == bench.EPS_ONE_STEP_TIMESTEP
        assert data["settings"]["recipes"]["dmd2"]["options_on_epsilon_worlds"]["student_timesteps"] == "399"
    else:
        assert one_step["dmd2"] == "999"
    assert {s["name"] for s in data["summary"]} == {"exact", "teacher", "base", *method_names()}


def _load_bench():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "gmm_family.py"
    spec = importlib.util.spec_from_file_location("distillery_bench_gmm_family", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_the_family_benchmark_takes_recipe_changes_per_method(tmp_path):
    """--set METHOD.KEY=VALUE changes one method's recipe (a training setting or an option the registry checks);
    the run records the recipe it used and the student samples on the timesteps it was given."""
    import json
    from pathlib import Path

    bench = _load_bench()
    result = bench.main(["--smoke", "--out", str(tmp_path), "--methods", "dmd2:4,tcd",
                         "--set", "dmd2:4.student_timesteps=999,499,199,49", "--set", "dmd2:4.batch_size=64",
                         "--set", "tcd.gamma=0.5"])
    data = json.loads(Path(result["json"]).read_text())
    dmd2 = data["settings"]["recipes"]["dmd2:4"]
    assert dmd2["options"]["student_timesteps"] == "999,499,199,49" and dmd2["options"]["exit_step"] == "last"
    assert dmd2["train"]["batch_size"] == 64
    assert data["settings"]["recipes"]["tcd"]["options"]["gamma"] == "0.5"
    rows = {r.get("method"): r for r in data["worlds"][0]["rows"]}
    assert rows["dmd2:4"]["sampler"]["timesteps"] == [999, 499, 199, 49]
    assert rows["tcd"]["sampler"]["gamma"] == 0.5


def test_the_family_benchmark_scores_students_in_hybrid_sampling(tmp_path):
    """--hybrid BASE_STEPS:LEVEL: a row per student and pair, the fitted base's DDIM on its trailing grid down to
    the student's timestep at index LEVEL (0-based), the student from there; a level the student lacks gives
    no row."""
    import json
    from pathlib import Path

    bench = _load_bench()
    result = bench.main(["--smoke", "--out", str(tmp_path), "--methods", "dmd2:4",
                         "--set", "dmd2:4.student_timesteps=999,499,199,49", "--hybrid", "4:1,4:2,10:3,4:4"])
    data = json.loads(Path(result["json"]).read_text())
    rows = [r for r in data["worlds"][0]["rows"] if r["kind"] == "hybrid"]
    # trailing 4 steps: 999, 749, 499, 249; trailing 10: 999, 899, ..., 99, then the student's level 49
    assert [(r["name"], r["sampler"]["handoff_timestep"]) for r in rows] == [
        ("dmd2:4 hybrid 2+3", pytest.approx(499)), ("dmd2:4 hybrid 4+2", pytest.approx(199)),
        ("dmd2:4 hybrid 10+1", pytest.approx(49))]
    assert {"dmd2:4 hybrid 4:1", "dmd2:4 hybrid 4:2", "dmd2:4 hybrid 10:3"} <= {s["name"] for s in data["summary"]}
    for bad in ("4", "0:1", "4:x"):
        with pytest.raises(SystemExit, match="--hybrid"):
            bench.main(["--smoke", "--out", str(tmp_path), "--methods", "dmd2", "--hybrid", bad])


@pytest.mark.parametrize("bad", ["sid.kappa=2", "dmd2.nokey", "dmd2=1", "dmd2.steps=many"])
def test_the_family_benchmark_refuses_a_change_it_cannot_apply(tmp_path, bad):
    bench = _load_bench()
    with pytest.raises(SystemExit, match="--set"):
        bench.main(["--smoke", "--out", str(tmp_path), "--methods", "dmd2", "--set", bad])


def test_a_recipe_change_out_of_range_is_the_registry_error(tmp_path):
    bench = _load_bench()
    with pytest.raises(ValueError, match="update_ratio"):
        bench.main(["--smoke", "--out", str(tmp_path), "--methods", "dmd2", "--set", "dmd2.update_ratio=0"])


def test_merge_joins_consecutive_world_ranges_and_refuses_other_settings(tmp_path):
    """--merge: two smoke runs over seeds 0 and 1 give the tables of one 2-world run; a run with another
    setting (or a gap in the seeds) is refused by name."""
    import json

    bench = _load_bench()
    a = bench.main(["--smoke", "--methods", "dmd2", "--fit-seed", "0", "--seed", "0", "--out", str(tmp_path), "--tag=-a"])
    b = bench.main(["--smoke", "--methods", "dmd2", "--fit-seed", "0", "--seed", "1", "--out", str(tmp_path), "--tag=-b"])
    merged = bench.main(["--merge", a["json"], b["json"], "--out", str(tmp_path), "--tag=-ab"])
    data = json.loads((tmp_path / "gmm_family-ab.json").read_text())
    assert [w["world"]["seed"] for w in data["worlds"]] == [0, 1] and data["settings"]["worlds"] == 2
    dmd2 = next(s for s in merged["summary"] if s["name"] == "dmd2")
    rows = [r for w in data["worlds"] for r in w["rows"] if r.get("method") == "dmd2"]
    assert dmd2["worlds"] == 2 and dmd2["passed"] == sum(r["pass"] for r in rows)
    assert "2 worlds (seeds 0..1)" in (tmp_path / "gmm_family-ab.md").read_text()
    other = bench.main(["--smoke", "--methods", "dmd2", "--fit-seed", "0", "--seed", "1", "--prob", "0.99", "--out", str(tmp_path),
                        "--tag=-c"])
    with pytest.raises(SystemExit, match="differ in prob"):
        bench.main(["--merge", a["json"], other["json"], "--out", str(tmp_path)])
    gap = bench.main(["--smoke", "--methods", "dmd2", "--fit-seed", "0", "--seed", "3", "--out", str(tmp_path), "--tag=-d"])
    with pytest.raises(SystemExit, match="must follow each other"):
        bench.main(["--merge", a["json"], gap["json"], "--out", str(tmp_path)])
