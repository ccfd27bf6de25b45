"""Run a real ComfyUI server next to the pack, for integration tests.

Nothing here imports ComfyUI into the test process: the test process only speaks HTTP to a
ComfyUI server started as a subprocess with ComfyUI's own interpreter, so the tests run under any
Python (the dev venv, CI) with the standard library alone. ComfyUI itself is not on PyPI; point
``COMFYUI_DIR`` at a checkout (with its venv in ``<checkout>/venv`` or ``COMFYUI_PYTHON``).

Typical use::

    with ComfyServer(comfy_dir, custom_nodes=[repo_root]) as srv:
        srv.link_model("checkpoints", ckpt_path)
        entry = srv.wait(srv.queue(prompt), timeout=120)
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path
from typing import Any, Iterable, Mapping

TINY_SD15_NAME = "tiny_sd15.safetensors"


# --------------------------------------------------------------------------- locating ComfyUI


# The start of a script run with ComfyUI's Python (argv: comfy_dir, pack_dir, ...): ComfyUI importable, on the
# CPU, and this pack imported as the package `distillery_pack`, the way ComfyUI imports a custom node folder.
PACK_IN_COMFY = r"""
import importlib.util, json, os, sys
comfy_dir, pack_dir = sys.argv[1], sys.argv[2]
sys.path.insert(0, comfy_dir)
import comfy.cli_args
comfy.cli_args.args.cpu = True
import torch
spec = importlib.util.spec_from_file_location("distillery_pack", os.path.join(pack_dir, "__init__.py"),
                                              submodule_search_locations=[pack_dir])
pack = importlib.util.module_from_spec(spec)
sys.modules["distillery_pack"] = pack
spec.loader.exec_module(pack)
"""


def comfy_dir() -> Path | None:
    """The ComfyUI checkout named by ``COMFYUI_DIR``, or None when it is unset or empty."""
    value = os.environ.get("COMFYUI_DIR", "").strip()
    return Path(value).expanduser().resolve() if value else None


def test_model_cache(tmp_path_factory=None) -> Path:
    """Where the integration tests keep the random checkpoints they build (never in the user's ComfyUI models
    folder, whose lists they would fill): DISTILLERY_TEST_CACHE, else ~/.cache/distillery/test-models, else a
    pytest temp dir when that is not writable."""
    cache = Path(os.environ.get("DISTILLERY_TEST_CACHE") or Path.home() / ".cache" / "distillery" / "test-models")
    try:
        cache.mkdir(parents=True, exist_ok=True)
        if os.access(cache, os.W_OK):
            return cache
    except OSError:
        pass
    return tmp_path_factory.mktemp("test_models") if tmp_path_factory is not None else Path(tempfile.mkdtemp())


def comfy_python(comfy_dir: os.PathLike | str) -> str:
    """The interpreter that runs ComfyUI: ``COMFYUI_PYTHON``, else ``<comfy_dir>/venv/bin/python``
    when it exists, else the current interpreter."""
    value = os.environ.get("COMFYUI_PYTHON", "").strip()
    if value:
        return value
    for rel in ("venv/bin/python", "venv/Scripts/python.exe"):
        candidate = Path(comfy_dir) / rel
        if candidate.exists():
            return str(candidate)
    return sys.executable


# --------------------------------------------------------------------------- tiny SD1.5 checkpoint

# Runs inside ComfyUI's interpreter with cwd = the ComfyUI checkout. It builds a UNet that ComfyUI
# detects as SD1.5 (model_channels=320, context_dim=768, no linear proj in the transformer, no adm)
# but with a single level, so it is small; a full-size CLIP-L text encoder (random weights, the
# tokenizer ships with ComfyUI); and a TAESD VAE. Everything random, fp16, no downloads.
_TINY_SD15_SCRIPT = r"""
import json, os, sys
sys.path.insert(0, os.getcwd())
import torch
from safetensors.torch import save_file

out_path = sys.argv[1]
torch.manual_seed(int(sys.argv[2]) if len(sys.argv) > 2 else 0)

import comfy.cli_args
comfy.cli_args.args.cpu = True  # before comfy.model_management is imported: no GPU probing
from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
from comfy.taesd.taesd import TAESD

NN_TYPES = (torch.nn.Linear, torch.nn.Conv2d, torch.nn.Conv1d, torch.nn.Conv3d, torch.nn.GroupNorm,
            torch.nn.LayerNorm, torch.nn.Embedding)

def init_random(module):
    # ComfyUI's ops skip weight init (weights come from files); run torch's own init instead.
    for m in module.modules():
        for cls in NN_TYPES:
            if isinstance(m, cls):
                cls.reset_parameters(m)
                break
    return module

def prefixed(prefix, sd):
    return {prefix + k: v.detach().to(torch.float16).contiguous() for k, v in sd.items()}

unet = init_random(UNetModel(
    image_size=32, in_channels=4, out_channels=4, model_channels=320,
    num_res_blocks=[1], channel_mult=[1], num_heads=8, num_head_channels=-1,
    use_spatial_transformer=True, transformer_depth=[1], transformer_depth_middle=1,
    transformer_depth_output=[1, 1], context_dim=768, use_linear_in_transformer=False,
    adm_in_channels=None, dtype=torch.float32, device="cpu"))

from transformers import CLIPTextConfig, CLIPTextModel
with open(os.path.join("comfy", "sd1_clip_config.json")) as f:
    clip_cfg = json.load(f)
clip = CLIPTextModel(CLIPTextConfig(**clip_cfg))

taesd = init_random(TAESD(latent_channels=4))

sd = {}
sd.update(prefixed("model.diffusion_model.", unet.state_dict()))
sd.update(prefixed("cond_stage_model.transformer.", clip.state_dict()))
sd.update(prefixed("first_stage_model.", taesd.state_dict()))
sd = {k: v for k, v in sd.items() if not k.endswith("position_ids")}
bad = [k for k, v in sd.items() if not torch.isfinite(v).all()]
if bad:
    raise SystemExit("non-finite tensors: %s" % bad[:5])
save_file(sd, out_path, metadata={"format": "pt", "note": "random tiny SD1.5-shaped test checkpoint"})
print(json.dumps({"tensors": len(sd), "params": sum(v.numel() for v in sd.values())}))
"""


def make_tiny_sd15_checkpoint(comfy_dir: os.PathLike | str, out_path: os.PathLike | str,
                              seed: int = 0, timeout: float = 900) -> Path:
    """Write a tiny random SD1.5-shaped checkpoint (about 300 MB, fp16) to ``out_path`` using
    ComfyUI's own model classes in a subprocess; do nothing when the file already exists."""
    out_path = Path(out_path)
    if out_path.exists():
        return out_path
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f".{out_path.stem}.{os.getpid()}.tmp.safetensors")
    try:
        proc = subprocess.run(
            [comfy_python(comfy_dir), "-c", _TINY_SD15_SCRIPT, str(tmp), str(seed)],
            cwd=str(comfy_dir), capture_output=True, text=True, timeout=timeout,
        )
        if proc.returncode != 0:
            raise RuntimeError(
                f"building the tiny SD1.5 checkpoint failed (rc={proc.returncode}):\n"
                f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
        os.chmod(tmp, 0o644)
        os.replace(tmp, out_path)  # atomic: a concurrent builder never sees a half file
    finally:
        if tmp.exists():
            tmp.unlink()
    return out_path


def write_safetensors(path: os.PathLike | str, tensors: Mapping[str, tuple[Iterable[int], Iterable[float]]],
                      metadata: Mapping[str, str] | None = None) -> Path:
    """Write float32 tensors ``{name: (shape, flat values)}`` as a .safetensors file with the
    standard library only (for small LoRA fixtures in the test process)."""
    import struct
    header: dict[str, Any] = {}
    blobs, offset = [], 0
    for name, (shape, values) in tensors.items():
        shape, values = [int(d) for d in shape], [float(v) for v in values]
        n = 1
        for d in shape:
            n *= d
        if n != len(values):
            raise ValueError(f"{name}: shape {shape} needs {n} values, got {len(values)}")
        blob = struct.pack(f"<{n}f", *values)
        header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(head)) + head + b"".join(blobs))
    return path


def lora_key_warnings(log_text: str) -> list[str]:
    """Lines where ComfyUI reported LoRA keys it could not map onto the model."""
    return [line for line in log_text.splitlines() if "lora key not loaded" in line]


def custom_node_import_failed(log_text: str, folder: str) -> bool:
    """Whether the startup log lists ``custom_nodes/<folder>`` as ``(IMPORT FAILED)``."""
    return any("IMPORT FAILED" in line and line.rstrip().endswith("/" + folder)
               for line in log_text.splitlines())


# --------------------------------------------------------------------------- prompts


def txt2img_prompt(ckpt_name: str = TINY_SD15_NAME, *, text: str = "a photo of a cat",
                   negative: str = "", width: int = 64, height: int = 64, steps: int = 1,
                   cfg: float = 1.0, seed: int = 0, sampler_name: str = "euler",
                   scheduler: str = "normal", filename_prefix: str = "distillery_it",
                   lora_name: str | None = None, lora_strength: float = 1.0) -> dict:
    """An API-format txt2img graph: CheckpointLoaderSimple -> [LoraLoader] -> CLIPTextEncode x2,
    EmptyLatentImage -> KSampler -> VAEDecode -> SaveImage. Node ids are stable strings."""
    model, clip = ["1", 0], ["1", 1]
    prompt: dict[str, Any] = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt_name}},
    }
    if lora_name is not None:
        prompt["10"] = {"class_type": "LoraLoader", "inputs": {
            "model": model, "clip": clip, "lora_name": lora_name,
            "strength_model": lora_strength, "strength_clip": lora_strength}}
        model, clip = ["10", 0], ["10", 1]
    prompt.update({
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": text, "clip": clip}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": negative, "clip": clip}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": width, "height": height, "batch_size": 1}},
        "5": {"class_type": "KSampler", "inputs": {
            "model": model, "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0],
            "seed": seed, "steps": steps, "cfg": cfg, "sampler_name": sampler_name,
            "scheduler": scheduler, "denoise": 1.0}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": filename_prefix}},
    })
    return prompt


# --------------------------------------------------------------------------- server


class ComfyError(RuntimeError):
    """An HTTP error from the server, a failed execution, or a server that died or hung."""


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class ComfyServer:
    """A ComfyUI server in a subprocess, on 127.0.0.1, with its own base directory.

    ``--base-directory`` makes ComfyUI take ``models/``, ``custom_nodes/``, ``input/``, ``output/``,
    ``temp/`` and ``user/`` from that directory, so nothing is written into the checkout (the
    database URL is pointed there as well). Custom node folders are symlinked into its
    ``custom_nodes/``; models are linked in with :meth:`link_model` (before or after start: ComfyUI
    lists model folders on each request).
    """

    def __init__(self, comfy_dir: os.PathLike | str, *, base_dir: os.PathLike | str | None = None,
                 custom_nodes: Iterable[os.PathLike | str | tuple[str, os.PathLike | str]] = (),
                 models: Mapping[str, Iterable[os.PathLike | str]] | None = None,
                 port: int | None = None, extra_args: Iterable[str] = (),
                 startup_timeout: float = 120.0, python: str | None = None,
                 env: Mapping[str, str] | None = None):
        self.comfy_dir = Path(comfy_dir).resolve()
        if not (self.comfy_dir / "main.py").is_file():
            raise ComfyError(f"{self.comfy_dir} is not a ComfyUI checkout (no main.py)")
        self._own_base = base_dir is None
        self.base_dir = Path(tempfile.mkdtemp(prefix="comfy_it_")) if base_dir is None else Path(base_dir)
        self.host = "127.0.0.1"
        self.port = port or free_port(self.host)
        self.url = f"http://{self.host}:{self.port}"
        self.python = python or comfy_python(self.comfy_dir)
        self.extra_args = list(extra_args)
        self.startup_timeout = startup_timeout
        self.env = dict(env) if env is not None else None
        self.client_id = uuid.uuid4().hex
        self.proc: subprocess.Popen | None = None
        self.returncode: int | None = None
        self.log_path = self.base_dir / "comfyui.log"
        self._log_file = None

        for sub in ("custom_nodes", "models/checkpoints", "models/loras", "input", "output", "temp", "user"):
            (self.base_dir / sub).mkdir(parents=True, exist_ok=True)
        for item in custom_nodes:
            name, path = item if isinstance(item, tuple) else (None, item)
            self.link_custom_node(path, name)
        for kind, paths in (models or {}).items():
            for p in paths:
                self.link_model(kind, p)

    # -- directories

    @property
    def output_dir(self) -> Path:
        return self.base_dir / "output"

    @property
    def input_dir(self) -> Path:
        return self.base_dir / "input"

    @property
    def models_dir(self) -> Path:
        return self.base_dir / "models"

    def link_custom_node(self, path: os.PathLike | str, name: str | None = None) -> Path:
        path = Path(path).resolve()
        dest = self.base_dir / "custom_nodes" / (name or path.name)
        if dest.is_symlink() or dest.exists():
            dest.unlink()
        dest.symlink_to(path, target_is_directory=path.is_dir())
        return dest

    def link_model(self, kind: str, path: os.PathLike | str, name: str | None = None) -> Path:
        """Symlink a model file into ``models/<kind>/`` (kind: checkpoints, loras, vae, ...)."""
        path = Path(path).resolve()
        folder = self.models_dir / kind
        folder.mkdir(parents=True, exist_ok=True)
        dest = folder / (name or path.name)
        if dest.is_symlink() or dest.exists():
            dest.unlink()
        dest.symlink_to(path)
        return dest

    # -- lifecycle

    def command(self) -> list[str]:
        db = self.base_dir / "user" / "comfyui.db"
        return [self.python, "main.py", "--cpu", "--listen", self.host, "--port", str(self.port),
                "--base-directory", str(self.base_dir), "--database-url", f"sqlite:///{db}",
                "--disable-auto-launch", *self.extra_args]

    def start(self) -> "ComfyServer":
        if self.proc is not None:
            return self
        env = dict(os.environ if self.env is None else self.env)
        env.setdefault("PYTHONUNBUFFERED", "1")
        self._log_file = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.command(), cwd=str(self.comfy_dir), env=env,
                                     stdin=subprocess.DEVNULL, stdout=self._log_file,
                                     stderr=subprocess.STDOUT)
        deadline = time.monotonic() + self.startup_timeout
        while True:
            if self.proc.poll() is not None:
                rc = self.proc.returncode
                tail = self.log_tail()
                self.stop()
                raise ComfyError(f"ComfyUI exited during startup (rc={rc}):\n{tail}")
            try:
                self.get("/system_stats", timeout=2)
                return self
            except (OSError, ComfyError):
                pass
            if time.monotonic() > deadline:
                tail = self.log_tail()
                self.stop()
                raise ComfyError(f"ComfyUI did not answer /system_stats within "
                                 f"{self.startup_timeout:.0f}s:\n{tail}")
            time.sleep(0.5)

    def stop(self, timeout: float = 20.0) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=timeout)
        if proc is not None:
            self.returncode = proc.returncode
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def cleanup(self) -> None:
        """Stop the server and, when the base directory was a temporary one, delete it."""
        self.stop()
        if self._own_base:
            shutil.rmtree(self.base_dir, ignore_errors=True)

    def __enter__(self) -> "ComfyServer":
        try:
            return self.start()
        except BaseException:
            self.cleanup()
            raise

    def __exit__(self, *exc) -> None:
        self.cleanup()

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    # -- logs

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, chars: int = 6000) -> str:
        return self.log_text()[-chars:]

    # -- HTTP

    def _request(self, method: str, path: str, body: Any = None, timeout: float = 60.0) -> bytes:
        data = None
        headers = {}
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        req = urllib.request.Request(self.url + path, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                return resp.read()
        except urllib.error.HTTPError as e:
            detail = e.read().decode(errors="replace")
            raise ComfyError(f"{method} {path} -> HTTP {e.code}: {detail[:4000]}") from None

    @staticmethod
    def _decode(raw: bytes) -> Any:
        if not raw:
            return None
        try:
            return json.loads(raw)
        except ValueError:
            return raw.decode(errors="replace")

    def get(self, path: str, timeout: float = 60.0) -> Any:
        """GET ``path`` and return the decoded JSON (text when the body is not JSON)."""
        return self._decode(self._request("GET", path, timeout=timeout))

    def get_bytes(self, path: str, timeout: float = 60.0) -> bytes:
        return self._request("GET", path, timeout=timeout)

    def post(self, path: str, json: Any = None, timeout: float = 60.0) -> Any:
        return self._decode(self._request("POST", path, body={} if json is None else json, timeout=timeout))

    def object_info(self, node_class: str | None = None) -> dict:
        if node_class:
            return self.get("/object_info/" + urllib.parse.quote(node_class))
        return self.get("/object_info")

    def view(self, filename: str, subfolder: str = "", type: str = "output") -> bytes:
        q = urllib.parse.urlencode({"filename": filename, "subfolder": subfolder, "type": type})
        return self.get_bytes("/view?" + q)

    # -- prompts

    def queue(self, prompt: Mapping[str, Any]) -> str:
        """POST an API-format prompt; return its prompt_id. A rejected prompt (HTTP 400 with
        ``node_errors``) raises ComfyError carrying the server's answer."""
        answer = self.post("/prompt", {"prompt": prompt, "client_id": self.client_id})
        if not isinstance(answer, dict) or "prompt_id" not in answer:
            raise ComfyError(f"unexpected /prompt answer: {answer!r}")
        if answer.get("node_errors"):
            raise ComfyError(f"prompt has node errors: {answer['node_errors']}")
        return answer["prompt_id"]

    def wait(self, prompt_id: str, timeout: float = 300.0, poll: float = 0.25) -> dict:
        """Poll ``/history/<prompt_id>`` until the prompt finished; return its history entry.
        An ``execution_error`` raises ComfyError with the error and the tail of the server log."""
        deadline = time.monotonic() + timeout
        while True:
            entry = (self.get(f"/history/{prompt_id}") or {}).get(prompt_id)
            if entry:
                status = entry.get("status") or {}
                if status.get("status_str") == "error" or any(
                        m[0] == "execution_error" for m in status.get("messages", [])):
                    errs = [m[1] for m in status.get("messages", []) if m[0] == "execution_error"]
                    raise ComfyError(f"prompt {prompt_id} failed: {json.dumps(errs, indent=1)[:6000]}"
                                     f"\n--- server log tail ---\n{self.log_tail()}")
                if status.get("completed") or status.get("status_str") == "success" or (
                        not status and entry.get("outputs")):
                    return entry
            if not self.running:
                raise ComfyError(f"ComfyUI died while running {prompt_id}:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise ComfyError(f"prompt {prompt_id} did not finish within {timeout:.0f}s:\n"
                                 f"{self.log_tail()}")
            time.sleep(poll)

    def run(self, prompt: Mapping[str, Any], timeout: float = 300.0) -> dict:
        return self.wait(self.queue(prompt), timeout=timeout)

    def output_files(self, entry: Mapping[str, Any], key: str = "images") -> list[Path]:
        """Paths of the files a finished prompt saved (``type == output``), in node order."""
        found = []
        for node_out in (entry.get("outputs") or {}).values():
            for item in node_out.get(key, []) or []:
                if isinstance(item, dict) and item.get("type", "output") == "output":
                    found.append(self.output_dir / item.get("subfolder", "") / item["filename"])
        return found
