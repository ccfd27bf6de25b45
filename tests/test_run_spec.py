"""The method registry, the run spec and the server's path rules: one declaration per option, one check
per run, before anything is queued or loaded; user-named paths stay inside ComfyUI's folders."""

from __future__ import annotations

import ast
import dataclasses
import json
import os
from pathlib import Path

import pytest

from comfyui_distillery.jobs import options as jo
from comfyui_distillery.trainers import registry
from comfyui_distillery.trainers.engine import TrainConfig
from comfyui_distillery.trainers.spec import DataSpec, OutputSpec, RunSpec, TeacherSpec

ROOT = Path(__file__).resolve().parents[1]


# --- the registry -----------------------------------------------------------------------------------------
def test_every_method_registers_typed_documented_options():
    methods = registry.methods()
    assert list(methods) == ["dmd2", "phased_dmd", "sid", "tcd"]
    for info in methods.values():
        infos = info.option_infos()
        assert [i.name for i in infos] == [f.name for f in dataclasses.fields(info.options)]  # all declared
        for option in infos:
            assert option.help and option.kind in registry.KINDS, (info.name, option.name)
            assert registry.coerce(option, option.default) == option.default  # defaults pass their own check
        method = info.make()
        assert method.name == info.name and method.needs_critic == info.needs_critic


def test_values_are_typed_and_checked_with_the_field_named():
    dmd2 = registry.get("dmd2")
    options = registry.build(dmd2.options, {"student_timesteps": "999, 499", "update_ratio": "3",
                                            "guidance_scale": 2, "decoupled": "true"})
    assert (options.student_timesteps, options.update_ratio, options.guidance_scale, options.decoupled) == \
        ([999, 499], 3, 2.0, True)
    for values, message in [({"update_ratio": 0}, "update_ratio=0: use a value in [1, 100]"),
                            ({"update_ratio": 2.5}, "update_ratio=2.5: use an integer"),
                            ({"guidance_scale": float("nan")}, "guidance_scale=nan: use a finite number"),
                            ({"exit_step": "middle"}, "exit_step='middle': choose one of uniform, last"),
                            ({"decoupled": "maybe"}, "decoupled='maybe': use true or false"),
                            ({"student_timesteps": "249,999"}, "student_timesteps: must be strictly decreasing"),
                            ({"kappa": 1.5}, "kappa: not an option of method dmd2")]:
        with pytest.raises(ValueError) as err:
            registry.build(dmd2.options, values, owner="method dmd2")
        assert str(err.value).startswith(message), str(err.value)
    with pytest.raises(ValueError, match="method='foo': choose one of dmd2, phased_dmd, sid, tcd"):
        registry.get("foo")
    # constructing an options object in Python goes through the same rules
    with pytest.raises(ValueError, match="mode='fast': choose one of tcd, lcm, tscd"):
        registry.make_method("tcd", mode="fast")


def _code_strings(path: Path) -> set[str]:
    """The string constants of a module's code (docstrings left out)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                  and node.body and isinstance(node.body[0], ast.Expr)
                  and isinstance(node.body[0].value, ast.Constant)}
    return {node.value.lower() for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings}


# "tcd" is also the name of the TCD *sampler* (sampling/, its nodes and the KSampler entry), another thing
SAMPLER_MODULES = {"sampling/__init__.py", "sampling/api.py", "sampling/hybrid.py", "cli_sample.py",
                   "comfy_backend.py", "nodes/samplers.py", "nodes/hybrid.py", "trainers/card.py"}


def test_method_names_are_declared_in_their_modules_only(package_python_files):
    """A method's name is a value in its own module's code and nowhere else in the package (tests,
    benchmarks and the demo aside): no second list of methods."""
    package = [rel for rel in package_python_files if rel.parts[0] not in ("tests", "benchmarks")
               and rel.name != "demo.py"]
    for name in registry.method_names():
        found = sorted(rel.as_posix() for rel in package if name in _code_strings(ROOT / rel))
        allowed = {f"trainers/methods/{name}.py"} | (SAMPLER_MODULES if name == "tcd" else set())
        assert set(found) <= allowed and f"trainers/methods/{name}.py" in found, (name, found)


# --- the run spec -------------------------------------------------------------------------------------------
def world_spec(**changes) -> RunSpec:
    kwargs = dict(method="dmd2", method_options={"student_timesteps": "999,499"}, train={"steps": 3},
                  teacher=TeacherSpec("world", "gmm", options={"width": 16}))
    kwargs.update(changes)
    return RunSpec.build(**kwargs)


def test_a_spec_is_complete_round_trips_and_its_fingerprint_ignores_where_and_how_long():
    spec = world_spec()
    assert set(spec.method_options) == {f.name for f in dataclasses.fields(registry.get("dmd2").options)}
    assert set(spec.train) == {f.name for f in dataclasses.fields(TrainConfig)} - {"run_dir"}
    data = json.loads(json.dumps(spec.to_dict()))
    again = RunSpec.from_dict({**data, "id": "abc", "created": 1.0})  # what the job store adds around it
    assert again == spec and again.fingerprint() == data["fingerprint"]
    assert world_spec(device="cuda").fingerprint() == spec.fingerprint()
    assert world_spec(train={"steps": 9}).fingerprint() == spec.fingerprint()  # the same run, trained further
    assert world_spec(train={"steps": 3, "seed": 1}).fingerprint() != spec.fingerprint()
    assert world_spec(train={"steps": 9}).changes_from(spec) == []
    assert world_spec(train={"steps": 2}).changes_from(spec) == ["train.steps: 3 -> 2"]
    assert world_spec(method_options={"student_timesteps": "999"}).changes_from(spec) == \
        ["method_options.student_timesteps: [999, 499] -> [999]"]
    assert spec.train_config("runs/x").run_dir == "runs/x"
    assert spec.make_method().opt.student_timesteps == [999, 499]


@pytest.mark.parametrize("changes, message", [
    ({"method": "foo"}, "method='foo': choose one of"),
    ({"method_options": {"update_ratio": -1}}, "update_ratio=-1"),
    ({"method_options": {"gamma": 0.3}}, "gamma: not an option of method dmd2"),
    ({"method_options": {"critic_per_step": True, "exit_step": "last"}},
     "critic_per_step=True: only exit_step=uniform trains every step"),  # a check across two options
    ({"train": {"steps": 0}}, "steps=0"),
    ({"train": {"lora_rank": "many"}}, "lora_rank='many'"),
    ({"train": {"colour": 1}}, "colour: not an option of the training settings"),
    ({"teacher": TeacherSpec("world", "mnist")}, "model='mnist': the built-in worlds are gmm, digits"),
    ({"teacher": TeacherSpec("checkpoint", "m.safetensors")}, "prompts: give at least one prompt"),
    ({"teacher": TeacherSpec("checkpoint", "m.safetensors"), "data": DataSpec(prompts=["a"], resolution=4)},
     "resolution=4: use the model's size in pixels"),
    ({"teacher": TeacherSpec("checkpoint", "m.safetensors"), "data": DataSpec(prompts=["a"]),
      "method_options": {"gan_generator_weight": 0.01}}, "gan_generator_weight=0.01: the GAN term needs real"),
    ({"teacher": TeacherSpec("checkpoint", "m.safetensors"), "data": DataSpec(prompts=["a"], real_images="/x")},
     "real_images: DMD2 uses real images only for its GAN term"),
    ({"data": DataSpec(real_images="/x")}, "real_images: the built-in gmm world brings its own"),
])
def test_a_bad_run_is_refused_naming_the_field(changes, message):
    with pytest.raises(ValueError) as err:
        world_spec(**changes)
    assert message in str(err.value)


def test_tcd_takes_real_images_as_its_data():
    spec = world_spec(method="tcd", method_options={}, teacher=TeacherSpec("checkpoint", "m.safetensors"),
                      data=DataSpec(prompts=["a"], real_images="/photos"))
    assert spec.data.real_images == "/photos" and spec.method_options["mode"] == "tcd"


def test_a_spec_file_from_another_version_or_edited_badly_is_refused():
    data = world_spec().to_dict()
    with pytest.raises(ValueError, match="run spec version 1"):
        RunSpec.from_dict({**data, "version": 1})
    with pytest.raises(ValueError, match=r"unknown keys \['task'\]"):
        RunSpec.from_dict({**data, "task": {}})
    with pytest.raises(ValueError, match="update_ratio=0"):
        RunSpec.from_dict({**data, "method_options": {**data["method_options"], "update_ratio": 0}})


# --- paths in the server ------------------------------------------------------------------------------------
def test_user_named_paths_stay_inside_the_input_folder(tmp_path):
    inputs = tmp_path / "input"
    (inputs / "sub").mkdir(parents=True)
    (inputs / "p.txt").write_text("one\n# skipped\ntwo\n")
    (inputs / "sub" / "q.txt").write_text("three\n")
    (inputs / "photos").mkdir()
    (tmp_path / "secret.txt").write_text("root:x:0:0")
    os.symlink(tmp_path / "secret.txt", inputs / "link.txt")
    os.symlink(tmp_path, inputs / "outside")
    assert jo.parse_prompts("a\n", jo.read_prompts_file("p.txt", str(inputs))) == ["a", "one", "two"]
    assert jo.read_prompts_file("sub/q.txt", str(inputs)) == "three\n"
    assert jo.read_prompts_file("  ", str(inputs)) == ""
    assert jo.resolve_images_folder("photos", str(inputs)) == str((inputs / "photos").resolve())
    for bad in ("/etc/passwd", str(tmp_path / "secret.txt"), "../secret.txt", "sub/../../secret.txt",
                "link.txt", "outside/secret.txt", "~/x.txt", "C:\\Windows\\win.ini", "..\\secret.txt"):
        with pytest.raises(ValueError) as err:
            jo.read_prompts_file(bad, str(inputs))
        text = str(err.value)
        assert text.startswith("prompts_file=") and "absolute paths and '..' are not allowed" in text, bad
        assert "root:x" not in text
    for bad in ("/etc", "..", "outside"):
        with pytest.raises(ValueError, match="absolute paths and '..' are not allowed"):
            jo.resolve_images_folder(bad, str(inputs))
    # a missing file inside says so; the message names neither the folder's content nor anything outside
    with pytest.raises(ValueError, match="prompts_file='missing.txt': no such file in ComfyUI's input folder"):
        jo.read_prompts_file("missing.txt", str(inputs))
    (inputs / "bin.txt").write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(ValueError, match="not UTF-8 text"):
        jo.read_prompts_file("bin.txt", str(inputs))


def test_lora_names_are_file_names():
    assert jo.check_lora_name("my student") == "my student.safetensors"
    assert jo.check_lora_name("x.safetensors") == "x.safetensors"
    for bad in ("../evil", "a/b", "", ".hidden", "a\\b", "..x"):
        with pytest.raises(ValueError, match="lora_name="):
            jo.check_lora_name(bad)


def test_the_job_fingerprint_is_the_specs():
    spec = world_spec(output=OutputSpec(lora_name="s.safetensors", lora_path="/l/s.safetensors"))
    assert jo.fingerprint(spec.to_dict()) == spec.fingerprint()


# --- the shipped workflows ------------------------------------------------------------------------------------
def test_workflows_method_and_start_nodes_match_the_registry():
    """widgets_values are positional: a workflow's method node must hold one valid value per declared option,
    in declaration order, and Start one per node training setting plus resolution and lora_name."""
    methods = {f"Distillery{info.display_name.replace(' ', '')}": info for info in registry.methods().values()}
    start_fields = [i for i in registry.option_infos(TrainConfig) if i.node and not i.advanced]
    seen = set()
    for path in sorted((ROOT / "workflows").glob("*.json")):
        for node in json.loads(path.read_text())["nodes"]:
            values = node.get("widgets_values")
            if node["type"] in methods:
                infos = methods[node["type"]].option_infos()
                assert len(values) == len(infos), (path.name, node["type"])
                for info, value in zip(infos, values):
                    registry.coerce(info, value)  # raises on a value of the wrong option
                seen.add(node["type"])
            elif node["type"] == "DistilleryStartDistillation":
                assert len(values) == len(start_fields) + 2, path.name
                for info, value in zip(start_fields, values):
                    registry.coerce(info, value)
    assert seen == set(methods)  # every method has a shipped workflow
