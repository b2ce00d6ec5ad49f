"""Our patches beside the real IPAdapter_plus, InstantID and PuLID, in either order (``hosts/comfyui/stacking.py``).

The packs are the unmodified snapshots in ``../shared/packs/``, extracted into a throw-away ``custom_nodes``
folder and loaded with ComfyUI's own custom-node loader. Their model files are stand-ins in the published
layouts (random weights; the InstantID/PuLID projection weights come from the packs' own module definitions).

- IPAdapter_plus runs through its nodes (``IPAdapterModelLoader``, ``IPAdapterEmbeds``). Numbers: our E-Adapter
  ID branch plus its image adapter equals diffusers' multi-IP-Adapter path (code neither of us wrote) in
  both orders. IPAdapter_plus registers its middle-block patch under ``("middle", 1[, index])``, a key ComfyUI
  never looks up (it runs the middle block as ``("middle", 0)``), so in every ComfyUI its adapter skips the
  middle block; diffusers' reference gets scale 0 there for that adapter.
- InstantID runs through its ``InstantIDModelLoader`` and ``InstantIDAttentionPatch`` nodes, with insightface's
  ``FaceAnalysis`` on stand-in ONNX models (``onnx_face_models``) that find t1.jpg's faces.
- PuLID's node first runs EVA-CLIP and facexlib's detector and parser, whose weights facexlib downloads at
  run time; the test drives the pack's own patch installer instead (``set_model_patch_replace`` with
  ``pulid_attention`` and its ``PulidModel``), with the arguments ``ApplyPulid`` builds, on the keys it uses.
"""

from __future__ import annotations

import asyncio
import copy
import gc
import sys
from functools import cache
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from adapters.e_adapter import EAdapter
from adapters.layers import SD15, SDXL, cross_attention_layers
from encoders.identity import DETECTOR_FILE
from support.e_adapter_standins import faceid_state, image_state
from support.onnx_face_models import export_detector, export_recognizer
from support.pack_snapshots import PACKS, extract
from support.tiny_facecrafter import landmark_images, random_facecrafter
from support.tiny_unets import random_expression_adapter, random_reference_lora_state, tiny_width
from support.two_hosts import Hosts as TwoHosts

pytestmark = [pytest.mark.comfyui, pytest.mark.large_memory, pytest.mark.usefixtures("one_thread")]
COND, UNCOND = 0, 1
ROW_ORDERS = ([UNCOND, COND], [COND, UNCOND])
SDXL_TOKENS = 2048  # IPAdapter_plus tells SDXL from the adapter's token width; InstantID and PuLID use it too
LAYOUTS = {"SD1.5": SD15, "SDXL": SDXL}


@cache
def Hosts(family: str, batch: int = 2):  # noqa: N802 - shared: building the tiny UNets is the slow part
    return TwoHosts(family, batch, context_dim=SDXL_TOKENS if family == "SDXL" else 32)


def token_width(family: str) -> int:
    return SDXL_TOKENS if family == "SDXL" else 32


def standin_std(family: str) -> float:
    """Stand-in K/V weights whose keys have the size they have on 32-wide tokens: on 2048-wide tokens a std of 0.3
    makes the softmax nearly one-hot, where float32 summation order alone moves the output by 1e-3."""
    return 0.3 * (32 / token_width(family)) ** 0.5


@pytest.fixture(scope="module", autouse=True)
def _release_models():
    """The tiny UNets (2048-wide SDXL ones too), adapters and pack models this module builds are cached per module,
    not per session: the modules after it (test_workflows writes full-size files) need the memory."""
    yield
    for cached_builder in (Hosts, e_adapter, face_analysis, half_model):
        cached_builder.cache_clear()
    gc.collect()


@pytest.fixture(scope="module")
def packs(comfy, tmp_path_factory):
    """The three packs' modules, loaded by ComfyUI's custom-node loader from a throw-away custom_nodes folder."""
    custom_nodes = tmp_path_factory.mktemp("custom_nodes")
    tarballs = sorted(path.name for path in PACKS.glob("*.tar.gz"))
    assert len(tarballs) == 3, f"expected the three pack snapshots in {PACKS}"
    modules = {}
    for tarball in tarballs:
        folder = extract(tarball, custom_nodes)
        assert asyncio.run(comfy.nodes.load_custom_node(str(folder))), f"ComfyUI could not load {folder.name}"
        modules[folder.name] = str(folder)
    return SimpleNamespace(
        nodes=comfy.nodes.NODE_CLASS_MAPPINGS,
        ipadapter=sys.modules[f"{modules['ComfyUI_IPAdapter_plus']}.IPAdapterPlus"],
        pulid=sys.modules[f"{modules['PuLID_ComfyUI']}.pulid"],
        instantid=sys.modules[f"{modules['ComfyUI_InstantID']}.InstantID"],
        instantid_resampler=sys.modules[f"{modules['ComfyUI_InstantID']}.resampler"],
    )


@pytest.fixture(scope="module")
def model_folders(packs, tmp_path_factory, t1):
    """Stand-in files where the packs' loaders look: IP-Adapter (SD1.5 and SDXL image adapters), InstantID, and
    insightface's antelopev2 for InstantID's face analysis."""
    import folder_paths

    root = tmp_path_factory.mktemp("models")
    for family, name in (("SD1.5", "ip-adapter_sd15.bin"), ("SDXL", "ip-adapter_sdxl_vit-h.bin")):
        (root / "ipadapter").mkdir(exist_ok=True)
        torch.save(image_state(family, seed=7, token_dim=token_width(family), std=standin_std(family)), root / "ipadapter" / name)
    (root / "instantid").mkdir()
    torch.save(instantid_state(packs), root / "instantid" / "ip-adapter.bin")
    rgb, boxes, kps = t1
    antelopev2 = root / "insightface" / "models" / "antelopev2"
    antelopev2.mkdir(parents=True)
    export_recognizer(antelopev2 / "glintr100.onnx", seed=3)
    export_detector(antelopev2 / DETECTOR_FILE, boxes, kps, [0.95, 0.9, 0.8], rgb.shape[:2])
    saved = {name: folder_paths.folder_names_and_paths.get(name) for name in ("ipadapter", "instantid")}
    for name in saved:
        folder_paths.folder_names_and_paths[name] = ([str(root / name)], {".bin", ".safetensors"})
    yield root
    for name, value in saved.items():
        folder_paths.folder_names_and_paths.pop(name, None) if value is None else folder_paths.folder_names_and_paths.update({name: value})


def random_ip_layers(family: str, token_dim: int, seed: int) -> dict:
    """``{N.to_k_ip.weight, N.to_v_ip.weight}`` on every cross-attention layer, numbered as the published files."""
    generator = torch.Generator().manual_seed(seed)
    layout = LAYOUTS[family]
    weights = {}
    for layer in cross_attention_layers(layout):
        for part in ("to_k_ip", "to_v_ip"):
            weights[f"{layer.checkpoint_number}.{part}.weight"] = torch.randn(tiny_width(layout, layer), token_dim,
                                                                              generator=generator) * 0.05
    return weights


def instantid_state(packs) -> dict:
    """InstantID's ``ip-adapter.bin`` layout: its own Resampler's state dict and the attention K/V weights."""
    torch.manual_seed(11)
    resampler = packs.instantid_resampler.Resampler(dim=1280, depth=4, dim_head=64, heads=20, num_queries=16,
                                                    embedding_dim=512, output_dim=SDXL_TOKENS, ff_mult=4)
    return {"image_proj": resampler.state_dict(), "ip_adapter": random_ip_layers("SDXL", SDXL_TOKENS, seed=12)}


# --- their patches -------------------------------------------------------------------------------------------------

def ipadapter(packs, model, family: str, weight: float = 1.0, clip=None):
    """IPAdapter_plus's image adapter through its nodes, from CLIP image embeds (IPAdapterEmbeds)."""
    name = "ip-adapter_sd15.bin" if family == "SD1.5" else "ip-adapter_sdxl_vit-h.bin"
    [adapter] = packs.nodes["IPAdapterModelLoader"]().load_ipadapter_model(name)
    clip = image_embeds() if clip is None else clip
    patched = packs.nodes["IPAdapterEmbeds"]().apply_ipadapter(
        model, adapter, clip, weight, "linear", 0.0, 1.0, neg_embed=torch.zeros_like(clip), embeds_scaling="V only")[0]
    return patched


@cache
def face_analysis(models: Path):
    """insightface's FaceAnalysis as InstantID's own loader node builds it (antelopev2, CPU), on the stand-ins."""
    from insightface.app import FaceAnalysis

    analysis = FaceAnalysis(name="antelopev2", root=str(models / "insightface"), providers=["CPUExecutionProvider"])
    analysis.prepare(ctx_id=0, det_size=(640, 640))
    return analysis


def instantid(packs, model, models: Path, rgb: np.ndarray, weight: float = 1.0):
    """InstantID's attention patch through its nodes, the identity from t1.jpg's largest face."""
    if not hasattr(packs, "instantid_model"):  # its loader builds a 1280-wide Resampler: once, not per call
        [packs.instantid_model] = packs.nodes["InstantIDModelLoader"]().load_model("ip-adapter.bin")
    loaded = packs.instantid_model
    image = torch.from_numpy(rgb[None].astype(np.float32) / 255.0)
    patched, _ = packs.nodes["InstantIDAttentionPatch"]().patch_attention(loaded, face_analysis(models), image, model,
                                                                          weight, 0.0, 1.0)
    return patched


def pulid_model(packs):
    """PuLID's ``PulidModel`` on a stand-in file in its published layout (its own IDEncoder's state dict), built once."""
    if not hasattr(packs, "pulid_model"):
        torch.manual_seed(13)
        encoder = packs.pulid.IDEncoder()
        packs.pulid_model = packs.pulid.PulidModel({"image_proj": encoder.state_dict(),
                                                    "ip_adapter": random_ip_layers("SDXL", SDXL_TOKENS, 14)})
    return packs.pulid_model


def pulid(packs, model, weight: float = 1.0):
    """PuLID's patch installer with the arguments ApplyPulid builds (method "neutral": no orthogonal projection)."""
    generator = torch.Generator().manual_seed(15)
    pulid_model_ = pulid_model(packs)
    with torch.no_grad():
        id_cond = torch.randn(1, 1280, generator=generator)
        hidden = [torch.randn(1, 5, 1024, generator=generator) for _ in range(5)]
        pulid_model_.float()
        cond = pulid_model_.get_image_embeds(id_cond, hidden)
        uncond = pulid_model_.get_image_embeds(torch.zeros_like(id_cond), [torch.zeros_like(h) for h in hidden])
    import comfy.model_management

    dtype = comfy.model_management.unet_dtype()  # as ApplyPulid casts its model and embeddings
    pulid_model_.to(dtype=dtype)
    patched = model.clone()
    sampling = patched.get_model_object("model_sampling")
    kwargs = {"pulid": pulid_model_, "weight": weight, "cond": cond.to(dtype), "uncond": uncond.to(dtype), "ortho": False, "ortho_v2": False,
              "mask": None, "sigma_start": sampling.percent_to_sigma(0.0), "sigma_end": sampling.percent_to_sigma(1.0)}
    for layer in cross_attention_layers(SDXL):
        block, block_id, index = layer.comfy_key
        key = ("middle", 1, index) if block == "middle" else layer.comfy_key  # the middle key ApplyPulid uses
        packs.pulid.set_model_patch_replace(patched, kwargs | {"module_key": str(layer.checkpoint_number)}, key)
    return patched


# --- our patches ---------------------------------------------------------------------------------------------------

def image_embeds(seed: int = 21) -> torch.Tensor:
    return torch.randn(1, 1024, generator=torch.Generator().manual_seed(seed))


def identity(seed: int = 22) -> torch.Tensor:
    return F.normalize(torch.randn(1, 512, generator=torch.Generator().manual_seed(seed)), dim=-1)


@cache
def e_adapter(family: str, folder: Path) -> EAdapter:
    tokens = token_width(family)
    faceid, image = folder / f"faceid_{family}.bin", folder / f"image_{family}.bin"
    torch.save(faceid_state(family, token_dim=tokens, lora_rank=None, std=standin_std(family)), faceid)
    torch.save(image_state(family, token_dim=tokens, std=standin_std(family)), image)
    return EAdapter.from_published(faceid, image).eval()


def ours(comfy, kind: str, model, family: str, strength: float, folder: Path):
    """One of our patches on ``model`` at ``strength``."""
    host = comfy.pack.hosts.comfyui
    if kind == "expression":
        adapter = random_expression_adapter(family, token_dim=token_width(family))
        with torch.no_grad():
            tokens = adapter.expression_tokens(torch.randn(1, 55, generator=torch.Generator().manual_seed(23)))
        return host.cross_attention.apply_cross_attention_branch(model, adapter, tokens, adapter.unconditional_tokens(),
                                                                       strength)
    if kind == "e_adapter_id":
        return comfy.pack.nodes.e_adapter_nodes.apply_e_adapter(model, e_adapter(family, folder), identity(), None, id_strength=strength)
    if kind == "e_adapter_expression":
        return comfy.pack.nodes.e_adapter_nodes.apply_e_adapter(model, e_adapter(family, folder), None, image_embeds(24),
                                                                expression_strength=strength, expression_layers="all")
    assert kind == "facecrafter"
    crafter = random_facecrafter()
    with torch.no_grad():
        lmk = crafter.landmark_tokens(landmark_images().permute(0, 3, 1, 2))
        emo = crafter.emotion_tokens(torch.rand(1, 10, generator=torch.Generator().manual_seed(25)))
    return host.facecrafter.apply_facecrafter(model, crafter, lmk, emo, lmk_strength=strength, emo_strength=strength)


def theirs(packs, pack: str, model, family: str, weight: float, models: Path, rgb):
    if pack == "IPAdapter_plus":
        return ipadapter(packs, model, family, weight)
    if pack == "InstantID":
        return instantid(packs, model, models, rgb, weight)
    return pulid(packs, model, weight)


def outputs(hosts, model) -> list[torch.Tensor]:
    """The UNet's output for both CFG row orders (conditional chunk first and last)."""
    return [hosts.comfy(model, cond_or_uncond=order) for order in ROW_ORDERS]


def assert_same(first: list[torch.Tensor], second: list[torch.Tensor]) -> None:
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b), float((a - b).abs().max())


def assert_differ(first: list[torch.Tensor], second: list[torch.Tensor]) -> None:
    for a, b in zip(first, second, strict=True):
        assert float((a - b).abs().max()) > 1e-3


# --- numbers: IPAdapter_plus + our E-Adapter ID branch equals diffusers' multi-IP-Adapter path --------------------

def diffusers_multi_ip_adapter(hosts, family, faceid_state_, image_state_, id_scale, image_scale, order):
    """diffusers' own IP-Adapter processors, FaceID file as adapter 0 and image file as adapter 1; the image adapter
    off in the middle block, where IPAdapter_plus's ``("middle", 1)`` key is never called by ComfyUI."""
    unet = copy.deepcopy(hosts.unet)
    unet._load_ip_adapter_weights([faceid_state_, image_state_])
    for name, processor in unet.attn_processors.items():
        if hasattr(processor, "to_k_ip"):
            processor.scale = [id_scale, 0.0 if name.startswith("mid_block") else image_scale]
    id_rows = torch.cat([identity() if kind == COND else torch.zeros(1, 512) for kind in order])
    clip_rows = torch.cat([image_embeds() if kind == COND else torch.zeros(1, 1024) for kind in order])
    added = dict(hosts.added or {}) | {"image_embeds": [id_rows[:, None], clip_rows[:, None]]}
    with torch.no_grad():
        return unet(hosts.x, hosts.t, encoder_hidden_states=hosts.context, added_cond_kwargs=added).sample


@pytest.mark.parametrize("family", ["SD1.5", "SDXL"])
@pytest.mark.parametrize("ours_first", [True, False], ids=["ours_first", "theirs_first"])
def test_e_adapter_id_with_ipadapter_plus_equals_diffusers_multi_ip_adapter(comfy, packs, model_folders, tmp_path_factory,
                                                                             family, ours_first):
    hosts = Hosts(family)
    folder = tmp_path_factory.getbasetemp()
    adapter = e_adapter(family, folder)
    lambda_id, weight = 0.8, 0.7

    def add_ours(model):
        return comfy.pack.nodes.e_adapter_nodes.apply_e_adapter(model, adapter, identity(), None, id_strength=lambda_id)

    def add_theirs(model):
        return ipadapter(packs, model, family, weight)

    model = add_theirs(add_ours(hosts.model)) if ours_first else add_ours(add_theirs(hosts.model))
    faceid = torch.load(folder / f"faceid_{family}.bin", weights_only=True)
    image = torch.load(model_folders / "ipadapter" / ("ip-adapter_sd15.bin" if family == "SD1.5" else "ip-adapter_sdxl_vit-h.bin"),
                       weights_only=True)
    plain = hosts.comfy(cond_or_uncond=ROW_ORDERS[0])
    for order in ROW_ORDERS:
        stacked = hosts.comfy(model, cond_or_uncond=order)
        reference = diffusers_multi_ip_adapter(hosts, family, faceid, image, lambda_id, weight, order)
        only_ours = diffusers_multi_ip_adapter(hosts, family, faceid, image, lambda_id, 0.0, order)
        assert float((reference - only_ours).abs().max()) > 1e-2  # IPAdapter_plus's part is not lost
        assert float((stacked - plain).abs().max()) > 1e-2
        torch.testing.assert_close(stacked, reference, atol=1e-4, rtol=1e-4)


# --- every pack with every patch of ours, both orders -----------------------------------------------------------------

COMBINATIONS = [("IPAdapter_plus", "SD1.5", kind) for kind in ("expression", "e_adapter_id", "e_adapter_expression", "facecrafter")]
COMBINATIONS += [(pack, "SDXL", kind) for pack in ("IPAdapter_plus", "InstantID", "PuLID")
                 for kind in ("expression", "e_adapter_id", "e_adapter_expression")]


@pytest.mark.parametrize(("pack", "family", "kind"), COMBINATIONS, ids=["-".join(c) for c in COMBINATIONS])
def test_each_pack_stacks_with_each_patch_in_either_order(comfy, packs, model_folders, tmp_path_factory, t1,
                                                         pack, family, kind):
    hosts = Hosts(family)
    folder = tmp_path_factory.getbasetemp()

    def with_ours(model, strength=1.0):
        return ours(comfy, kind, model, family, strength, folder)

    def with_theirs(model, weight=1.0):
        return theirs(packs, pack, model, family, weight, model_folders, t1[0])

    only_ours, only_theirs = outputs(hosts, with_ours(hosts.model)), outputs(hosts, with_theirs(hosts.model))
    plain = outputs(hosts, hosts.model)
    assert_differ(only_ours, plain)
    assert_differ(only_theirs, plain)
    def stack(ours_first, our_strength=1.0, their_weight=1.0):
        if ours_first:
            return with_theirs(with_ours(hosts.model, our_strength), their_weight)
        return with_ours(with_theirs(hosts.model, their_weight), our_strength)

    for ours_first in (True, False):
        both = outputs(hosts, stack(ours_first))
        assert_differ(both, only_ours)
        assert_differ(both, only_theirs)
        # neither drops nor disturbs the other
        assert_same(outputs(hosts, stack(ours_first, our_strength=0.0)), only_theirs)
        assert_same(outputs(hosts, stack(ours_first, their_weight=0.0)), only_ours)



# --- their protocol on our replaces behaves as on their own class -------------------------------------------------

def test_a_callback_added_to_ours_runs_as_in_their_attn2replace(comfy, packs):
    """The same callback and arguments, once in IPAdapter_plus's own ``Attn2Replace`` and once ``.add``-ed to our
    replace (our branch at strength 0): bit-identical outputs inside and outside its sigma range."""
    hosts = Hosts("SD1.5")
    attn2replace = sys.modules[packs.ipadapter.__name__.rsplit(".", 1)[0] + ".CrossAttentionPatch"].Attn2Replace
    seen = []

    def callback(out, q, k, v, extra_options, weight, **kwargs):
        seen.append(kwargs["module_key"])
        return torch.tanh(out) * weight + q.mean() * weight

    theirs_model, ours_model = hosts.model.clone(), ours(comfy, "expression", hosts.model, "SD1.5", 0.0, None)
    registered = ours_model.model_options["transformer_options"]["patches_replace"]["attn2"]
    for number, layer in enumerate(cross_attention_layers(SD15)):
        kwargs = {"weight": 0.3, "sigma_start": 5.0, "sigma_end": 1.0, "module_key": str(number)}
        theirs_model.set_model_attn2_replace(attn2replace(callback, **kwargs), *layer.comfy_key)
        comfy.pack.hosts.comfyui.stacking.replace_below(registered, layer.comfy_key).add(callback, **kwargs)
    for sigma, runs in ((0.5, False), (3.0, True), (10.0, False)):
        seen.clear()
        expected = hosts.comfy(theirs_model, cond_or_uncond=ROW_ORDERS[0], sigma=sigma)
        assert len(seen) == 16 * runs
        assert torch.equal(hosts.comfy(ours_model, cond_or_uncond=ROW_ORDERS[0], sigma=sigma), expected)
        assert len(seen) == 32 * runs
        plain = hosts.comfy(hosts.model, cond_or_uncond=ROW_ORDERS[0], sigma=sigma)
        assert torch.equal(expected, plain) != runs


# --- clones: their in-place .add never reaches the model they were given ------------------------------------------

CLONE_CASES = [("IPAdapter_plus", "SD1.5", "expression"), ("IPAdapter_plus", "SD1.5", "facecrafter"),
               ("InstantID", "SDXL", "e_adapter_id"), ("PuLID", "SDXL", "e_adapter_expression")]


@pytest.mark.parametrize(("pack", "family", "kind"), CLONE_CASES, ids=["-".join(c) for c in CLONE_CASES])
def test_their_in_place_add_leaves_the_model_they_were_given_as_it_was(comfy, packs, model_folders, tmp_path_factory, t1,
                                                                       pack, family, kind):
    """The packs clone the model, find our replace at their key and ``.add`` to it in place. ``clone()`` deep-copies
    model_options, and our replace copies itself there, so the model they were given keeps its output bit for bit
    (with a replace shared between clones, their callbacks would run in it too)."""
    hosts = Hosts(family)
    patched = ours(comfy, kind, hosts.model, family, 1.0, tmp_path_factory.getbasetemp())
    before = outputs(hosts, patched)
    stacked = theirs(packs, pack, patched, family, 1.0, model_folders, t1[0])
    placed = [replace for replace in stacked.model_options["transformer_options"]["patches_replace"]["attn2"].values()
              if isinstance(replace, comfy.pack.hosts.comfyui.stacking.StackableReplace)]
    # they added to ours, in the clone; in the middle block only where they use ComfyUI's key ("middle", 0):
    # InstantIDAttentionPatch does, IPAdapter_plus and PuLID register ("middle", 1), which ComfyUI never calls
    middle_added = pack == "InstantID"
    assert placed and all(len(replace.added) == (replace.key[0] != "middle" or middle_added) for replace in placed)
    originals = patched.model_options["transformer_options"]["patches_replace"]["attn2"].values()
    assert all(not replace.added for replace in originals)
    assert_same(outputs(hosts, patched), before)
    assert_differ(outputs(hosts, stacked), before)


# --- the Reference Adapter (attn1) beside IPAdapter_plus (attn2), and core nodes chained on top --------------------

def reference_adapter(comfy, model, latent_size: int = 8):
    """The Reference Adapter (LoRA 0.8) on ``model``, reading a random reference latent."""
    generator = torch.Generator().manual_seed(31)
    lora = comfy.pack.adapters.lora.ReferenceLora.from_state_dict(random_reference_lora_state())
    latent = torch.randn(1, 4, latent_size, latent_size, generator=generator)
    id_context = torch.randn(1, 7, 32, generator=generator)
    patched, _ = comfy.pack.hosts.comfyui.reference.apply_reference_adapter(model, lora, latent, id_context, 0.8)
    return patched


def test_the_reference_adapter_and_ipadapter_plus_share_a_model_in_either_order(comfy, packs, model_folders):
    hosts = Hosts("SD1.5")
    only_reference = outputs(hosts, reference_adapter(comfy, hosts.model))
    only_theirs = outputs(hosts, ipadapter(packs, hosts.model, "SD1.5"))
    reference_first = outputs(hosts, ipadapter(packs, reference_adapter(comfy, hosts.model), "SD1.5"))
    theirs_first = outputs(hosts, reference_adapter(comfy, ipadapter(packs, hosts.model, "SD1.5")))
    assert_differ(reference_first, only_reference)
    assert_differ(reference_first, only_theirs)
    for a, b in zip(reference_first, theirs_first, strict=True):  # self- and cross-attention patches commute
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert_same(outputs(hosts, ipadapter(packs, reference_adapter(comfy, hosts.model), "SD1.5", weight=0.0)), only_reference)


def sample(model, latent_size: int = 16, steps: int = 3, cfg: float = 2.0) -> torch.Tensor:
    """A real ComfyUI sampling run (euler, CFG) on ``model``."""
    from comfy.sample import sample as comfy_sample

    generator = torch.Generator().manual_seed(41)
    noise = torch.randn(1, 4, latent_size, latent_size, generator=generator)
    context = torch.randn(1, 7, 32, generator=generator)
    return comfy_sample(model, noise, steps, cfg, "euler", "normal", [[context, {}]], [[context * 0, {}]],
                        torch.zeros_like(noise), disable_pbar=True, seed=0)


def core_node(comfy, name: str, **inputs):
    node = comfy.nodes.NODE_CLASS_MAPPINGS[name]
    return node.execute(**inputs).args[0]


def test_self_attention_guidance_keeps_the_reference_adapter(comfy):
    """SAG sets its recorder at the middle block's own key, over ours, without calling it; each sampling run puts
    ours back on top (the stacking wrapper), so at scale 0 the result is the Reference Adapter's."""
    hosts = Hosts("SD1.5", batch=1)
    patched = reference_adapter(comfy, hosts.model, latent_size=16)
    alone = sample(patched)
    at_zero = sample(core_node(comfy, "SelfAttentionGuidance", model=patched, scale=0.0, blur_sigma=2.0))
    # SAG computes the middle block's unconditional attention with its own kernel (to keep the scores)
    torch.testing.assert_close(at_zero, alone, atol=1e-5, rtol=1e-5)
    without_reference = sample(core_node(comfy, "SelfAttentionGuidance", model=hosts.model, scale=0.0, blur_sigma=2.0))
    assert float((at_zero - without_reference).abs().max()) > 1e-3
    guided = sample(core_node(comfy, "SelfAttentionGuidance", model=patched, scale=1.5, blur_sigma=2.0))
    assert torch.isfinite(guided).all() and float((guided - alone).abs().max()) > 1e-3


def test_perturbed_attention_guidance_over_the_reference_adapter(comfy):
    """PAG replaces the middle block's self-attention under the block's key for its perturbed pass only: that pass
    runs without our read (as PAG intends), every other pass with it; at scale 0 the result is ours exactly."""
    hosts = Hosts("SD1.5", batch=1)
    patched = reference_adapter(comfy, hosts.model, latent_size=16)
    alone = sample(patched)
    assert torch.equal(sample(core_node(comfy, "PerturbedAttentionGuidance", model=patched, scale=0.0)), alone)
    guided = sample(core_node(comfy, "PerturbedAttentionGuidance", model=patched, scale=2.0))
    assert torch.isfinite(guided).all() and float((guided - alone).abs().max()) > 1e-3  # PAG is not shadowed by ours


def test_torch_compile_gives_the_eager_latent(comfy, packs, model_folders, monkeypatch):
    """Core's TorchCompileModel over our patch and IPAdapter_plus's: TorchDynamo traces the UNet with both (graph
    breaks at the patches, guards on the sigma gate, which turns the branch off half-way), and the run gives the
    eager latent. The node's backend is dynamo's "eager": what touches our code is the tracing; inductor's code
    generation costs minutes on these CPUs and moves float32 results by about 2e-4, its own business.

    Nothing makes dynamo compile again per step or per run: a longer run of the compiled model (new sigmas, the
    gate deciding at more steps, the per-run caches emptied and filled again) compiles no new graph, and still
    gives the eager latent through the graphs compiled for the shorter one.

    Attention is PyTorch's, as ComfyUI and IPAdapter_plus pick it on every GPU (where torch.compile is used). The
    CPU default, sub-quadratic attention, asks psutil for the free memory at each call: a graph break in ComfyUI's
    own code that about doubles the tracing and adds nothing of ours."""
    from comfy.ldm.modules import attention
    from torch._dynamo.utils import counters

    their_attention = sys.modules[f"{packs.ipadapter.__name__.rpartition('.')[0]}.CrossAttentionPatch"]
    for module in (attention, their_attention):  # IPAdapter_plus imported the kernel by name
        monkeypatch.setattr(module, "optimized_attention", attention.attention_pytorch)
    hosts = Hosts("SD1.5", batch=1)
    adapter = random_expression_adapter("SD1.5")
    with torch.no_grad():
        tokens = adapter.expression_tokens(torch.randn(1, 55, generator=torch.Generator().manual_seed(23)))
    gated = comfy.pack.hosts.comfyui.cross_attention.apply_cross_attention_branch(
        hosts.model, adapter, tokens, adapter.unconditional_tokens(), 1.0, 0.0, 0.5)
    patched = ipadapter(packs, gated, "SD1.5")
    eager = sample(patched, latent_size=8, steps=2)
    assert float((eager - sample(ipadapter(packs, hosts.model, "SD1.5"), latent_size=8, steps=2)).abs().max()) > 1e-3
    compiled_model = core_node(comfy, "TorchCompileModel", model=patched, backend="eager")
    compiled = sample(compiled_model, latent_size=8, steps=2)
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-5)
    graphs, frames = counters["stats"]["unique_graphs"], counters["frames"]["ok"]
    longer = sample(compiled_model, latent_size=8, steps=6)
    assert counters["stats"]["unique_graphs"] == graphs, "a longer run compiled new graphs: something recompiles per step"
    # ComfyUI's sampler wrapper frame (no graph) recompiles once for the new number of sigmas, dynamic after that
    assert counters["frames"]["ok"] <= frames + 1, f"{counters['frames']['ok'] - frames} frames compiled again"
    torch.testing.assert_close(longer, sample(patched, latent_size=8, steps=6), atol=1e-5, rtol=1e-5)


# --- half precision: the stacks on UNets built and computing in fp16 / bf16 -----------------------------------------

HALF_CASES = [(pack, family, kind, dtype) for pack, family, kind in (
    ("IPAdapter_plus", "SD1.5", "expression"), ("IPAdapter_plus", "SD1.5", "facecrafter"),
    ("IPAdapter_plus", "SDXL", "e_adapter_expression"), ("InstantID", "SDXL", "e_adapter_id"), ("PuLID", "SDXL", "expression"))
    for dtype in (torch.float16, torch.bfloat16)
    # InstantID casts its model to fp16 or fp32 (should_use_fp16), never bf16, and its attention does not cast
    # back to the query's type: on a bf16 UNet it fails on its own, with or without us
    if not (pack == "InstantID" and dtype == torch.bfloat16)]


@cache
def half_model(family: str, dtype: torch.dtype):
    from support.tiny_unets import comfy_model

    return comfy_model(family, Hosts(family).unet.state_dict(), dtype)


@pytest.mark.parametrize(("pack", "family", "kind", "dtype"), HALF_CASES, ids=["-".join(map(str, c)) for c in HALF_CASES])
def test_stacks_compute_in_the_models_half_type(comfy, packs, model_folders, tmp_path_factory, t1, monkeypatch,
                                                pack, family, kind, dtype):
    """As on a GPU whose ComfyUI builds the UNet in ``dtype``: the packs read that type from ComfyUI's model
    management (unet_dtype; InstantID: should_use_fp16) and cast their weights and embeddings to it."""
    from comfy import model_management

    hosts = Hosts(family)
    folder = tmp_path_factory.getbasetemp()

    def stack(model, ours_first):
        if ours_first:
            return theirs(packs, pack, ours(comfy, kind, model, family, 1.0, folder), family, 1.0, model_folders, t1[0])
        return ours(comfy, kind, theirs(packs, pack, model, family, 1.0, model_folders, t1[0]), family, 1.0, folder)

    full = {ours_first: outputs(hosts, stack(hosts.model, ours_first)) for ours_first in (True, False)}
    full_plain = outputs(hosts, hosts.model)
    half = half_model(family, dtype)
    monkeypatch.setattr(model_management, "unet_dtype", lambda *args, **kwargs: dtype)
    monkeypatch.setattr(model_management, "should_use_fp16", lambda *args, **kwargs: dtype == torch.float16)
    half_plain = outputs(hosts, half)
    for ours_first in (True, False):
        half_stacked = outputs(hosts, stack(half, ours_first))
        for got, expected, plain_half, plain_full in zip(half_stacked, full[ours_first], half_plain, full_plain, strict=True):
            assert got.dtype == dtype and torch.isfinite(got).all()
            effect = (expected - plain_full).abs().max()
            rounding = (plain_half.float() - plain_full).abs().max()
            assert (got.float() - expected).abs().max() <= 2 * rounding + 0.05 * effect
