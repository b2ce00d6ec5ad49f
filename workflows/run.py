"""Run a shipped workflow headless through ComfyUI's own executor.

    python workflows/run.py workflows/api/arc2face_expression.json --comfyui ~/ComfyUI \
        --seed 42 --strength 0.8 --set 4.json_values="[0.5, ...]" --image 12=face.png

The workflow must be in ComfyUI's API format (the shipped ones are ``workflows/api/*.json``). Overrides:
  --set NODE.INPUT=VALUE   any input of any node (VALUE parsed as JSON when it can be)
  --seed N                 every ``seed`` / ``noise_seed`` input
  --strength X             every ``strength`` input of an Expression Adapters node
  --image NODE=PATH        copy PATH into ComfyUI's input folder and point that LoadImage node at it
  --models DIR             also search DIR/<folder> for models (DIR/diffusion_models, DIR/expression_adapters, ...);
                           may be given more than once (the last one given is searched first)
  --variant "N.IN=V ..."   run again with these further overrides, reusing what earlier runs loaded and computed
                           (ComfyUI's cache, as in the app); repeatable: a strength sweep costs one model load
  --comfyui-flags="..."    ComfyUI's own command-line flags, e.g. --comfyui-flags="--bf16-unet --bf16-text-enc"
                           (half the memory: weights kept in bf16, computed layer by layer in fp32 on the CPU)
  --custom-nodes DIR       also load the custom-node pack in DIR (a folder as it sits in ComfyUI/custom_nodes, e.g.
                           ComfyUI_InstantID) with ComfyUI's own loader, for workflows with other packs' nodes; repeatable
Images the workflow saves go to ComfyUI's output folder (or --output-dir); their paths are printed, one per line,
each --variant's after a line "# run N: its overrides".
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import inspect
import json
import os
import shlex
import shutil
import sys
import tempfile
import uuid
from pathlib import Path

PACK_ROOT = Path(__file__).resolve().parents[1]
PACK_MODULE = "comfyui_expression_adapters"
_loaded_pack = None
_extra_nodes_loaded = False


def find_comfyui(explicit: str | None = None) -> Path | None:
    """The ComfyUI checkout named explicitly, by COMFYUI_PATH, or at ~/ComfyUI; None if none is there."""
    for candidate in (explicit, os.environ.get("COMFYUI_PATH"), str(Path.home() / "ComfyUI")):
        if candidate and (Path(candidate).expanduser() / "comfy" / "model_patcher.py").is_file():
            return Path(candidate).expanduser().resolve()
    return None


def start_comfyui(comfyui: Path, force_cpu: bool | None = None, pytorch_attention: bool = False, flags=()):
    """Import ComfyUI in this process (as its main.py would) and return its ``nodes`` module.

    ``pytorch_attention``: use torch's SDPA for attention, as ComfyUI does on GPUs, also on the CPU
    (where ComfyUI otherwise picks its slower sub-quadratic attention). ``flags``: ComfyUI's own
    command-line flags (``["--bf16-unet"]``), read by ComfyUI's parser; they must come before ComfyUI's
    model management is first imported, so they only count in a fresh process.
    """
    path = str(comfyui)
    if path in sys.path:
        sys.path.remove(path)
    sys.path.insert(0, path)  # ComfyUI's nodes.py must win over this pack's nodes/ folder
    import comfy.cli_args
    import torch

    parser = comfy.cli_args.parser
    for name, value in vars(parser.parse_args(list(flags))).items():
        if value != parser.get_default(name):
            setattr(comfy.cli_args.args, name, value)
    if force_cpu or (force_cpu is None and not torch.cuda.is_available()):
        comfy.cli_args.args.cpu = True  # must precede the first import of comfy.model_management
    if pytorch_attention:
        comfy.cli_args.args.use_pytorch_cross_attention = True
    # ComfyUI's utils package first, as main.py does: nodes.py puts comfy/ (which has a utils.py) at
    # the front of sys.path, after which "utils" would resolve to that file
    import utils.install_util  # noqa: F401

    import nodes

    if not hasattr(nodes, "load_custom_node"):
        raise ImportError(f"'nodes' resolved to {nodes.__file__}, not ComfyUI's nodes.py")
    global _extra_nodes_loaded
    if not _extra_nodes_loaded:  # ComfyUI's own comfy_extras nodes (SamplerCustom, LatentBatchSeedBehavior, ...)
        asyncio.run(nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))
        _extra_nodes_loaded = True
    return nodes


def load_pack(comfy_nodes, custom_nodes_dir: Path) -> object:
    """Load this pack with ComfyUI's own custom-node loader, under a stable module name."""
    global _loaded_pack
    if _loaded_pack is not None:
        return _loaded_pack
    custom_nodes_dir.mkdir(parents=True, exist_ok=True)
    link = custom_nodes_dir / PACK_MODULE
    if not link.exists():
        link.symlink_to(PACK_ROOT, target_is_directory=True)
    if not asyncio.run(comfy_nodes.load_custom_node(str(link))):
        raise RuntimeError(f"ComfyUI could not load the pack from {link}; see the log above")
    _loaded_pack = sys.modules[str(link).replace(".", "_x_")]  # the module name ComfyUI's loader gives a folder
    return _loaded_pack


def load_custom_nodes(comfy_nodes, folders) -> None:
    """Other packs (folders as they sit in ComfyUI/custom_nodes), loaded as ComfyUI loads them at start-up."""
    for folder in folders:
        folder = Path(folder).resolve()
        if not folder.is_dir():
            raise SystemExit(f"--custom-nodes {folder}: no such folder")
        if not asyncio.run(comfy_nodes.load_custom_node(str(folder))):
            raise RuntimeError(f"ComfyUI could not load the custom nodes in {folder}; see the log above")


def add_model_dirs(models_dir: Path) -> None:
    import folder_paths

    for folder in sorted(p for p in Path(models_dir).iterdir() if p.is_dir()):
        folder_paths.add_model_folder_path(folder.name, str(folder), is_default=True)


def apply_overrides(prompt: dict, sets=(), seed=None, strength=None, images=()) -> dict:
    prompt = json.loads(json.dumps(prompt))
    for node in prompt.values():
        inputs = node.setdefault("inputs", {})
        if seed is not None:
            for name in ("seed", "noise_seed"):
                if name in inputs:
                    inputs[name] = int(seed)
        if strength is not None and "strength" in inputs and node["class_type"] in _pack_node_ids():
            inputs["strength"] = float(strength)
    for assignment in sets:
        target, _, raw = assignment.partition("=")
        node_id, _, input_name = target.partition(".")
        if node_id not in prompt or not input_name:
            raise SystemExit(f"--set {assignment!r}: expected NODE.INPUT=VALUE with a node id of this workflow")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        prompt[node_id]["inputs"][input_name] = value
    for assignment in images:
        node_id, _, image_path = assignment.partition("=")
        if node_id not in prompt:
            raise SystemExit(f"--image {assignment!r}: no node {node_id} in this workflow")
        prompt[node_id]["inputs"]["image"] = _copy_to_input(Path(image_path))
    return prompt


def _pack_node_ids() -> set[str]:
    import nodes

    return {name for name, cls in nodes.NODE_CLASS_MAPPINGS.items() if PACK_MODULE in getattr(cls, "RELATIVE_PYTHON_MODULE", "")}


def _copy_to_input(image: Path) -> str:
    import folder_paths

    if not image.is_file():
        raise SystemExit(f"image not found: {image}")
    destination = Path(folder_paths.get_input_directory()) / image.name
    if destination.resolve() != image.resolve():
        shutil.copyfile(image, destination)
    return image.name


class _HeadlessServer:
    """What PromptExecutor needs of ComfyUI's server, recording the messages instead of sending them."""

    def __init__(self):
        self.client_id = None
        self.last_node_id = None
        self.last_prompt_id = None
        self.messages = []

    def send_sync(self, event, data, sid=None):
        self.messages.append((event, data))


def execute(prompt: dict, executor=None) -> dict:
    """Validate and execute an API-format prompt; returns ``{node_id: ui outputs}``; raises on failure.

    ``executor``: a ``PromptExecutor`` from an earlier call, whose cache keeps the outputs of nodes whose
    inputs did not change (loaded models included), as ComfyUI's server does between queued prompts.
    """
    import execution

    prompt_id = str(uuid.uuid4())
    valid = asyncio.run(execution.validate_prompt(prompt_id, prompt, None))
    if not valid[0]:
        raise RuntimeError(f"invalid workflow: {json.dumps(valid[1])} {json.dumps(valid[3])}")
    executor = executor or new_executor()
    executor.execute(prompt, prompt_id, {}, valid[2])
    if not executor.success:
        errors = [data for event, data in executor.status_messages if event == "execution_error"]
        detail = errors[0] if errors else executor.status_messages[-1:]
        raise RuntimeError(f"workflow failed: {detail}")
    return executor.history_result["outputs"]


def new_executor(execution_module=None):
    """ComfyUI's ``PromptExecutor`` with its classic cache, for either constructor, told apart by its parameters
    (no version numbers): 0.3.x takes ``cache_size``; newer versions take ``cache_args``, a dict they read without
    a None check (``cache_args["ram"]``), and an optional ``asset_manager``."""
    if execution_module is None:
        import execution as execution_module

    executor_class = execution_module.PromptExecutor
    options = {}
    if "cache_args" in inspect.signature(executor_class).parameters:
        options = {"cache_type": execution_module.CacheType.CLASSIC,
                   "cache_args": {"lru": 0, "ram": 0, "ram_inactive": 0}}
    return executor_class(_HeadlessServer(), **options)


def saved_images(outputs: dict) -> list[Path]:
    import folder_paths

    paths = []
    for ui in outputs.values():
        for image in ui.get("images", []):
            if image.get("type") == "output":
                paths.append(Path(folder_paths.get_output_directory()) / image.get("subfolder", "") / image["filename"])
    return paths


def argument_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("workflow", type=Path, help="an API-format workflow JSON (workflows/api/*.json)")
    parser.add_argument("--comfyui", help="ComfyUI checkout (default: $COMFYUI_PATH or ~/ComfyUI)")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="NODE.INPUT=VALUE")
    parser.add_argument("--image", dest="images", action="append", default=[], metavar="NODE=PATH")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--strength", type=float)
    parser.add_argument("--models", type=Path, action="append", default=[],
                        help="extra models folder with ComfyUI's layout (repeatable)")
    parser.add_argument("--variant", dest="variants", action="append", default=[], metavar='"NODE.INPUT=VALUE ..."',
                        help="run again with these further overrides (space-separated), reusing loaded models; repeatable")
    parser.add_argument("--output-dir", type=Path)
    parser.add_argument("--input-dir", type=Path, help="ComfyUI's input folder (where --image files are copied)")
    parser.add_argument("--temp-dir", type=Path, help="ComfyUI's temp folder (where previews are written)")
    parser.add_argument("--cpu", action="store_true", help="run on the CPU even where CUDA is available")
    parser.add_argument("--comfyui-flags", default="", metavar='"--flag ..."',
                        help='ComfyUI\'s own command-line flags, e.g. --comfyui-flags="--bf16-unet --bf16-text-enc"')
    parser.add_argument("--custom-nodes", type=Path, action="append", default=[], metavar="DIR",
                        help="also load the custom-node pack in DIR (e.g. ComfyUI/custom_nodes/ComfyUI_InstantID) with "
                             "ComfyUI's own loader; repeatable")
    return parser


def start_with_pack(comfyui: Path, cpu: bool = False, flags: str = "", custom_nodes=()) -> None:
    """ComfyUI started in this process with this pack, and the packs in the ``custom_nodes`` folders, loaded
    (once per process)."""
    comfy_nodes = start_comfyui(comfyui, force_cpu=True if cpu else None, flags=shlex.split(flags))
    link_folder = Path(tempfile.mkdtemp(prefix="expression_adapters_"))
    atexit.register(shutil.rmtree, link_folder, True)  # removes the link only, never the pack it points to
    load_pack(comfy_nodes, link_folder)
    load_custom_nodes(comfy_nodes, custom_nodes)


def run_workflow(args: argparse.Namespace, report=lambda line: print(line, flush=True)) -> list[list[Path]]:
    """The parsed command's workflow and its variants; ``report`` gets each saved path (and a line per variant)."""
    import folder_paths

    for models_dir in args.models:
        add_model_dirs(models_dir)
    for folder, set_directory in ((args.output_dir, folder_paths.set_output_directory),
                                  (args.input_dir, folder_paths.set_input_directory),
                                  (args.temp_dir, folder_paths.set_temp_directory)):
        if folder:
            folder.mkdir(parents=True, exist_ok=True)
            set_directory(str(folder.resolve()))
    prompt = json.loads(args.workflow.read_text())
    prompt = apply_overrides(prompt, args.sets, args.seed, args.strength, args.images)
    executor = new_executor()
    runs = []
    for number, variant in enumerate([""] + args.variants, 1):
        if variant:
            report(f"# run {number}: {variant}")
        runs.append(saved_images(execute(apply_overrides(prompt, shlex.split(variant)), executor)))
        for path in runs[-1]:
            report(str(path))
    return runs


def main(argv=None) -> int:
    parser = argument_parser()
    args = parser.parse_args(argv)
    comfyui = find_comfyui(args.comfyui)
    if comfyui is None:
        parser.error("no ComfyUI found: pass --comfyui PATH or set COMFYUI_PATH")
    start_with_pack(comfyui, args.cpu, args.comfyui_flags, args.custom_nodes)
    run_workflow(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
