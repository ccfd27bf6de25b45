"""`distillery train`: options reach the method they belong to, misplaced ones are named, runs finish."""

import json

import pytest

from comfyui_distillery import cli
from comfyui_distillery.trainers import api
from comfyui_distillery.trainers import cli as train_cli


def _resolve(*argv):
    parser = cli.build_parser()
    return train_cli.resolve(parser.parse_args(["train", *argv]))


def test_cli_knows_every_method():
    assert train_cli.METHODS == api.METHODS


def test_method_options_reach_their_method():
    method, model, config, options, _ = _resolve("--method", "SiD", "--model", "gmm", "--guidance-mode", "anti_cfg",
                                                 "--guidance", "1.5", "--alpha", "1.2", "--timesteps", "999,499",
                                                 "--update-ratio", "4", "--exit-step", "last", "--rank", "8",
                                                 "--steps", "3")
    assert (method, model, config.lora_rank, config.steps) == ("sid", "gmm", 8, 3)
    assert options == {"guidance": "anti_cfg", "kappa": 1.5, "alpha": 1.2, "student_timesteps": "999,499",
                       "update_ratio": 4, "exit_step": "last"}
    sid = api.make_method(method, **options)
    assert sid.kappas == (1.0, -1.5, 1.5)  # anti-CFG: the fake score is guided the other way
    _, _, _, options, _ = _resolve("--method", "tcd", "--model", "gmm", "--mode", "tscd", "--gamma", "0.5",
                                   "--cfg-min", "1", "--cfg-max", "3", "--loss", "l2")
    assert options == {"mode": "tscd", "gamma": 0.5, "guidance_min": 1.0, "guidance_max": 3.0, "loss": "l2"}
    _, _, _, options, _ = _resolve("--model", "gmm", "--guidance", "4", "--update-ratio", "3")
    assert options == {"guidance_scale": 4.0, "update_ratio": 3}  # DMD2 is the default


@pytest.mark.parametrize("argv, match", [
    (["--method", "tcd", "--update-ratio", "3"], r"--update-ratio: --method tcd does not take it \(it is for dmd2 and sid\)"),
    (["--method", "dmd2", "--gamma", "0.3"], r"--gamma: --method dmd2 does not take it \(it is for tcd\)"),
    (["--method", "lcm"], r"--method lcm: choose one of dmd2, sid, tcd"),
])
def test_misplaced_options_are_named_before_any_work(argv, match):
    with pytest.raises(ValueError, match=match):
        _resolve("--model", "gmm", *argv)


def test_train_sid_from_the_command_line_writes_a_lora(tmp_path, capsys):
    out = tmp_path / "student.safetensors"
    code = cli.main(["train", "--method", "sid", "--model", "gmm", "--steps", "3", "--batch-size", "8",
                     "--rank", "4", "--run-dir", str(tmp_path / "run"), "--out", str(out), "--quiet"])
    assert code == 0 and out.is_file()
    summary = json.loads(capsys.readouterr().out)
    assert summary["steps"] == 3 and summary["lora"] == str(out)
    from comfyui_distillery.trainers.lora import read_lora_metadata

    meta = read_lora_metadata(out)
    assert meta["distillery.method"] == "sid" and meta["distillery.steps_trained"] == 3


def test_a_run_too_big_for_memory_is_one_clear_line(tmp_path, capsys, monkeypatch):
    from comfyui_distillery.trainers import memory

    monkeypatch.setattr(memory, "available_bytes", lambda device: 2 ** 20)
    code = cli.main(["train", "--model", "gmm", "--steps", "3", "--run-dir", str(tmp_path), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "distillery train: error: not enough memory" in err and "Traceback" not in err
