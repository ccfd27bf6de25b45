"""`distillery train`: flags come from the registry, options reach the method they belong to, misplaced
ones are named, and a run writes a student with its card."""

import json

import pytest

from comfyui_distillery import cli
from comfyui_distillery import cli_train as train_cli
from comfyui_distillery.trainers import registry
from comfyui_distillery.trainers.engine import TrainConfig


def _resolve(*argv):
    parser = cli.build_parser()
    return train_cli.resolve(parser.parse_args(["train", *argv]))


def _help() -> str:
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices["train"]
    return sub.format_help()


def test_every_registered_option_is_a_flag_with_its_help():
    text = _help()
    for info in registry.methods().values():
        for option in info.option_infos():
            assert "--" + option.name.replace("_", "-") in text
            assert option.help.split()[0] in text
    for option in registry.option_infos(TrainConfig):
        assert "--" + option.name.replace("_", "-") in text
    assert "dmd2, phased_dmd, sid, tcd" in text
    # argparse %-formats help: a literal % in an option's help is printed as written
    assert "cosine (decays to 10% at the last step;" in " ".join(text.split())


def test_method_options_reach_their_method():
    spec, _ = _resolve("--method", "SiD", "--model", "gmm", "--guidance-mode", "anti_cfg", "--guidance", "1.5",
                       "--alpha", "1.2", "--timesteps", "999,499", "--update-ratio", "4", "--exit-step", "last",
                       "--rank", "8", "--steps", "3")
    assert (spec.method, spec.teacher.path, spec.train["lora_rank"], spec.train["steps"]) == ("sid", "gmm", 8, 3)
    o = spec.method_options
    assert (o["guidance_mode"], o["kappa"], o["alpha"], o["student_timesteps"], o["update_ratio"], o["exit_step"]) \
        == ("anti_cfg", 1.5, 1.2, [999, 499], 4, "last")
    assert spec.make_method().kappas == (1.0, -1.5, 1.5)  # anti-CFG: the fake score is guided the other way
    spec, _ = _resolve("--method", "tcd", "--model", "gmm", "--mode", "tscd", "--gamma", "0.5", "--cfg-min", "1",
                       "--cfg-max", "3", "--loss", "l2", "--segments", "4,2,1")
    o = spec.method_options
    assert (o["mode"], o["gamma"], o["guidance_min"], o["guidance_max"], o["loss"], o["segments"]) == \
        ("tscd", 0.5, 1.0, 3.0, "l2", [4, 2, 1])
    spec, _ = _resolve("--model", "gmm", "--guidance", "4", "--update-ratio", "3")
    assert spec.method == "dmd2" and spec.method_options["guidance_scale"] == 4.0  # DMD2 is the default
    assert spec.method_options["update_ratio"] == 3


def test_a_config_file_takes_the_flag_names(tmp_path):
    config = tmp_path / "run.json"
    config.write_text(json.dumps({"method": "tcd", "steps": 7, "lr": 3e-4, "gamma": 0.2, "model": "gmm"}))
    spec, run_dir = _resolve("--config", str(config), "--steps", "9")  # the command line wins
    assert spec.method == "tcd" and spec.train["steps"] == 9 and spec.train["student_lr"] == 3e-4
    assert spec.method_options["gamma"] == 0.2 and run_dir == "runs/gmm-tcd"


@pytest.mark.parametrize("argv, match", [
    (["--method", "tcd", "--update-ratio", "3"], r"--update-ratio: --method tcd does not take it \(it is for dmd2, phased_dmd and sid\)"),
    (["--method", "dmd2", "--gamma", "0.3"], r"--gamma: --method dmd2 does not take it \(it is for tcd\)"),
    (["--method", "tcd", "--guidance", "3"], r"--guidance: --method tcd does not take it"),
    (["--method", "lcm"], r"method='lcm': choose one of dmd2, phased_dmd, sid, tcd"),
    (["--update-ratio", "0"], r"update_ratio=0: use a value in \[1, 100\]"),
    (["--exit-step", "first"], r"exit_step='first': choose one of uniform, last"),
    (["--timesteps", "999,x"], r"student_timesteps: 'x' is not a number"),
    (["--steps", "0"], r"steps=0: use a value in"),
    (["--lr-schedule", "linear"], r"lr_schedule='linear': choose one of constant, cosine"),
    (["--resolution", "512"], r"resolution: the built-in gmm world has a fixed size"),
    (["--teacher-lora", __file__], r"teacher LoRAs: a LoRA stack is applied by ComfyUI's loader, to a checkpoint"),
    (["--teacher-lora", "/no/such.safetensors:0.5"], r"--teacher-lora /no/such.safetensors:0.5: no such file"),
])
def test_bad_options_are_named_before_any_work(argv, match):
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        _resolve("--model", "gmm", *argv)


def test_train_sid_from_the_command_line_writes_a_student_with_its_card(tmp_path, capsys):
    from comfyui_distillery.jobs.students import student_card

    out = tmp_path / "student.safetensors"
    code = cli.main(["train", "--method", "sid", "--model", "gmm", "--steps", "3", "--batch-size", "8",
                     "--rank", "4", "--run-dir", str(tmp_path / "run"), "--out", str(out), "--quiet"])
    assert code == 0 and out.is_file()
    summary = json.loads(capsys.readouterr().out)
    assert summary["steps"] == 3 and summary["lora"] == str(out)
    card = student_card(out)
    assert card.method == "sid" and card.steps_trained == 3 and card.lora_rank == 4
    assert card.method_options["student_timesteps"] == [999, 749, 499, 249] and card.sampler == "x0_renoise"
    assert card.train["batch_size"] == 8 and isinstance(card.base_model_hash, str) and len(card.base_model_hash) == 16


def test_a_run_too_big_for_memory_is_one_clear_line(tmp_path, capsys, monkeypatch):
    from comfyui_distillery.trainers import memory

    monkeypatch.setattr(memory, "available_bytes", lambda device: 2 ** 20)
    code = cli.main(["train", "--model", "gmm", "--steps", "3", "--run-dir", str(tmp_path), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "distillery train: error: not enough memory" in err and "Traceback" not in err


def test_teacher_loras_take_their_strengths(tmp_path):
    lora = tmp_path / "style.safetensors"
    lora.write_bytes(b"x")
    found = [train_cli._teacher_lora(text) for text in (str(lora), f"{lora}:0.5", f"{lora}:0.5:0.25")]
    assert [(f["strength_model"], f["strength_clip"]) for f in found] == [(1.0, 1.0), (0.5, 0.5), (0.5, 0.25)]
    assert {f["path"] for f in found} == {str(lora.resolve())}
