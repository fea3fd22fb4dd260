"""The pack imports outside ComfyUI, registers its nodes, and its workflow files match their spec."""
import json
import runpy
import sys
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_imports_without_comfyui(pack):
    assert "comfy" not in sys.modules and "folder_paths" not in sys.modules
    assert set(pack.NODE_CLASS_MAPPINGS) == {"QVDCalibrate", "QVDQuantizeModel", "QVDSaveQuantized",
                                             "QVDLoadQuantized", "QVDQuantizeControlNet",
                                             "QVDSaveQuantizedControlNet", "QVDLoadQuantizedControlNet"}
    assert set(pack.NODE_DISPLAY_NAME_MAPPINGS) == set(pack.NODE_CLASS_MAPPINGS)


def test_node_classes_follow_the_v1_node_api(pack):
    for name, cls in pack.NODE_CLASS_MAPPINGS.items():
        assert cls.CATEGORY == "QVD", name
        assert callable(getattr(cls, cls.FUNCTION)), name
        assert isinstance(cls.RETURN_TYPES, tuple), name
    assert pack.NODE_CLASS_MAPPINGS["QVDCalibrate"].RETURN_TYPES == ("QVD_CALIBRATION",)
    assert pack.NODE_CLASS_MAPPINGS["QVDCalibrate"].OUTPUT_NODE
    assert pack.NODE_CLASS_MAPPINGS["QVDSaveQuantized"].OUTPUT_NODE
    assert pack.NODE_CLASS_MAPPINGS["QVDQuantizeModel"].RETURN_TYPES[0] == "MODEL"


def test_workflow_files_are_generated_from_their_spec():
    gen = runpy.run_path(str(ROOT / "scripts" / "make_workflows.py"))
    assert len(gen["WORKFLOWS"]) == 9
    for name, spec in gen["WORKFLOWS"].items():
        ui = json.loads((ROOT / "workflows" / f"{name}.json").read_text())
        api = json.loads((ROOT / "workflows" / "api" / f"{name}.json").read_text())
        assert ui == gen["to_ui"](spec), f"{name}.json is stale: run scripts/make_workflows.py"
        assert api == gen["to_api"](spec), f"api/{name}.json is stale: run scripts/make_workflows.py"
        linked = {(l[3], l[4]) for l in ui["links"]}
        for node in ui["nodes"]:
            for slot, inp in enumerate(node["inputs"]):
                assert (inp["link"] is not None) == ((node["id"], slot) in linked)


def test_save_names_are_checked_before_anything_is_written(pack, tmp_path, monkeypatch):
    """QVD Save Quantized / QVD Calibrate names: plain, not too long for the file system, and '.calibration'
    only where the pack puts it; a bad name raises before the node samples or writes anything."""
    import types

    folder = tmp_path / "models" / "qvd"
    fake = types.SimpleNamespace(get_folder_paths=lambda _: [str(folder)])
    monkeypatch.setitem(sys.modules, "folder_paths", fake)
    nodes = pack.nodes.qvd_nodes
    assert nodes._new_file("mine.safetensors", ".safetensors", "file") == str(folder / "mine.safetensors")
    assert nodes._new_file("mine", ".calibration.safetensors", "calibration") == str(
        folder / "mine.calibration.safetensors")
    for name, suffix, match in (("x" * 10_000, ".safetensors", "at most 255 bytes"),
                                ("mine.calibration", ".safetensors", "ends in '.calibration'"),
                                ("mine.calibration.safetensors", ".safetensors", "ends in '.calibration'"),
                                ("../escape", ".safetensors", "not a plain file name"),
                                ("", ".calibration.safetensors", "not a plain file name")):
        with pytest.raises(nodes.QVDError, match=match):  # the pack's own copy of qvd
            nodes._new_file(name, suffix, "file")
    assert list(tmp_path.iterdir()) == [tmp_path / "models"] and list(folder.iterdir()) == []


def test_a_sampling_run_logs_what_auto_chose_once(pack, monkeypatch, caplog):
    """The OUTER_SAMPLE wrapper QVD puts on a quantized MODEL: after a run in which ``auto`` decided new layer
    shapes, one log line with the routes and the float weights kept; nothing when no shape was new."""
    import logging

    import torch

    patching = sys.modules["comfyui_qvd_pack.nodes.patching"]
    kernels = sys.modules["comfyui_qvd_pack.qvd.kernels"]
    modules = sys.modules["comfyui_qvd_pack.qvd.modules"]
    layer = modules.QLinear(8, 4, weight_q=torch.ones(4, 8, dtype=torch.int8), weight_scale=torch.ones(4), bias=None,
                            act_scale=0.1, zero_point=0, w_bits=8, a_bits=8)
    monkeypatch.setattr(kernels, "_DECIDED", {})
    wrapper = patching._sampling(types.SimpleNamespace(modules={"diffusion_model.x": layer}))

    def sample():
        kernels._DECIDED[("QLinear", len(kernels._DECIDED))] = kernels.Decision("weight-only", 2.0, 1.0)
        return "latent"

    with caplog.at_level(logging.INFO):
        assert wrapper(sample) == "latent"
        assert wrapper(lambda: "again") == "again"
    lines = [r.message for r in caplog.records if "QVD compute auto" in r.message]
    assert len(lines) == 1 and "weight-only on 1" in lines[0] and "(1.00x)" in lines[0], lines


def test_attention_patches_see_a_folded_norms_output_in_its_own_domain(pack):
    """ComfyUI hands ``attn1_patch`` / ``attn2_patch`` (a hypernetwork, ...) its norm's output. Where QVD folded SCRI
    into that norm the output is ``(x - z) / s``: the wrapper QVD puts around the patches for a sampling run hands
    them ``x`` and returns what they give back to the folded layers' domain; the text context passes unchanged."""
    import torch

    patching = sys.modules["comfyui_qvd_pack.nodes.patching"]
    scri_mod = sys.modules["comfyui_qvd_pack.qvd.scri"]
    g = torch.Generator().manual_seed(0)
    norm = torch.nn.LayerNorm(8)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(8, generator=g) + 0.5)
        norm.bias.copy_(torch.randn(8, generator=g))
    scri = scri_mod.ScriTransform(torch.randn(8, generator=g), torch.rand(8, generator=g) + 0.2)
    folded = scri.fold_norm(norm)
    x, text = torch.randn(2, 5, 8, generator=g), torch.randn(2, 7, 8, generator=g)
    seen = []

    def patch(n, context, value, extra_options):
        seen.append((n, context, value))
        return n + 1.0, context * 2.0, value

    model_options = {"transformer_options": {"patches": {"attn1_patch": [patch], "attn2_patch": [patch]}}}
    patching._unfold_for_patches(model_options, [folded])
    patches = model_options["transformer_options"]["patches"]
    true = norm(x)
    with torch.no_grad():
        n = folded(x)
        torch.testing.assert_close(n, scri.apply(true), rtol=1e-5, atol=1e-5)
        q, k, v = patches["attn1_patch"][0](n, n, n, {})  # self-attention: all three are the norm's output
        torch.testing.assert_close(seen[-1][0], true, rtol=1e-5, atol=1e-5)
        assert seen[-1][1] is seen[-1][0] and seen[-1][2] is seen[-1][0]
        torch.testing.assert_close(q, scri.apply(true + 1.0), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(k, scri.apply(true * 2.0), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(v, n, rtol=1e-5, atol=1e-5)
        q, k, v = patches["attn2_patch"][0](n, text, text, {})  # cross-attention: the context is not the norm's
        assert seen[-1][1] is text and seen[-1][2] is text
        torch.testing.assert_close(k, text * 2.0)
        other = torch.randn(2, 5, 8, generator=g)  # not a folded norm's output: handed over as is
        q, _, _ = patches["attn1_patch"][0](other, other, other, {})
        assert seen[-1][0] is other and torch.equal(q, other + 1.0)
    patching._unfold_for_patches(model_options, [folded])  # a second wrap of the same options is a no-op
    assert len(model_options["transformer_options"]["patches"]["attn1_patch"]) == 1
    assert model_options["transformer_options"]["patches"]["attn1_patch"][0].patches == (patch,)


def test_a_controlnets_quantized_copy_leaves_the_original_module_tree_alone(pack):
    """``_structure_copy`` (a quantized ControlNet's model): a new tree over the same tensors; replacing a layer, adding
    a hook or a parameter in it changes nothing in the original."""
    import torch
    from torch import nn

    patching = sys.modules["comfyui_qvd_pack.nodes.patching"]
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Sequential(nn.Linear(4, 4), nn.ReLU()))
    shared = net[1]
    net.add_module("again", shared)  # one module under two names stays one module in the copy
    copy = patching._structure_copy(net, torch.device("cpu"))
    assert copy is not net and copy[1] is not net[1] and copy.again is copy[1]
    assert copy[0].weight.data_ptr() == net[0].weight.data_ptr()  # no tensor copied (own parameter objects: a host
    assert copy[0].weight is not net[0].weight  # moving the copy, param.data = ..., leaves the original where it is)
    copy[1][0] = nn.Identity()
    copy[0].register_forward_hook(lambda *_: None)
    copy[0].extra = nn.Parameter(torch.zeros(1))
    assert isinstance(net[1][0], nn.Linear) and not net[0]._forward_hooks and not hasattr(net[0], "extra")


def test_a_calibrations_subset_is_one_models_statistics_renamed():
    """A calibration of a graph (UNet + ControlNets) gives each model its own statistics under its tree's names; a
    model it never saw is refused by name."""
    import torch
    from torch import nn

    from qvd import Calibrator, CalibrationError
    from qvd.identity import content_key

    g = torch.Generator().manual_seed(0)
    unet, cn_a, cn_b = (nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8), nn.Linear(8, 4)) for _ in range(3))
    with torch.no_grad():
        cn_b[0].weight.add_(1.0)  # same architecture, other weights
    assert content_key(cn_a) != content_key(cn_b) and content_key(cn_a) == content_key(cn_a)
    tree = nn.ModuleDict({"diffusion_model": unet, f"controlnet_{content_key(cn_a)}": cn_a})
    with Calibrator(tree) as cal:
        cal.set_timestep(500)
        for m in (unet, cn_a):
            m(torch.randn(5, 8, generator=g))
    calibration = cal.result()
    sub = calibration.subset({f"controlnet_{content_key(cn_a)}": "controlnet"})
    assert set(sub.layers) == {"controlnet.0", "controlnet.2"} and all(s.name == n for n, s in sub.layers.items())
    assert calibration.layers[f"controlnet_{content_key(cn_a)}.0"].name.startswith("controlnet_")  # not renamed
    assert all(n.startswith("controlnet.") for names in sub.norm_groups.values() for n in names)
    assert set(calibration.subset({"diffusion_model": "diffusion_model"}).layers) == {"diffusion_model.0",
                                                                                     "diffusion_model.2"}
    with pytest.raises(CalibrationError, match=f"controlnet_{content_key(cn_b)}"):
        calibration.subset({f"controlnet_{content_key(cn_b)}": "controlnet"})


def test_attention_patches_the_calibration_never_saw_are_said_once_per_graph(pack, caplog):
    import logging
    from types import SimpleNamespace

    patching = sys.modules["comfyui_qvd_pack.nodes.patching"]
    ipadapter = {"transformer_options": {"patches_replace": {"attn2": {("input", 1): None, ("middle", 1): None}},
                                         "patches": {"attn1_patch": [print], "attn2_patch": []}}}
    assert patching.attention_patches(ipadapter) == ["attn1_patch", "attn2 replace input 1", "attn2 replace middle 1"]
    assert patching.attention_patches({}) == []
    said = set()
    with caplog.at_level(logging.WARNING):
        for calibrated, options in (({}, ipadapter), ({"patches": patching.attention_patches(ipadapter)}, ipadapter),
                                    ({"patches": []}, {}), ({"patches": []}, ipadapter), ({"patches": []}, ipadapter)):
            patching._warn_new_patches(SimpleNamespace(calibrated=calibrated), options, said)
    lines = [r.message for r in caplog.records if "never saw" in r.message]
    assert len(lines) == 1 and "3 attention patch(es)" in lines[0] and "attn2 replace input 1" in lines[0]
