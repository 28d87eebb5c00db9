"""The zoo benchmark (benchmarks/zoo.py): its child-process runner on a few small models, the pieces
that make random weights realistic, and docs/models.md and the README's block in sync with the
committed results."""

from __future__ import annotations

import math
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import zoo  # noqa: E402
import zoo_common  # noqa: E402

from relprop.errors import UnsupportedLayerError  # noqa: E402

OUTCOMES = {"explained", "refused", "crash", "timeout", "killed", "cannot run"}


@pytest.fixture(scope="module")
def records():
    """Three small models through the runner the benchmark uses, one process each (at once)."""
    models = [("torchvision", "resnet18"), ("torchvision", "squeezenet1_1"), ("timm", "convnext_atto")]
    with ThreadPoolExecutor(len(models)) as pool:
        done = pool.map(lambda entry: zoo.run_child(*entry, "", timeout=120), models)
    return {record["model"]: record for record in done}


def test_records_have_the_documented_fields(records):
    for name, record in records.items():
        assert record["outcome"] in OUTCOMES, (name, record)
        assert record["model"] == name and record["size"] == 64  # the smallest size each runs at
        if record["outcome"] == "explained":
            assert len(record["total_over_p"]) == zoo.IMAGES and record["cuts"] > 1
            assert record["capture_path"] and record["worst_layer"]
        else:  # a refusal or a crash is one line
            assert record["detail"] and "\n" not in record["detail"]


def test_resnet18_conserves_and_lrp0_equals_gradient_times_input(records):
    record = records["resnet18"]
    assert record["outcome"] == "explained" and record["piecewise_linear"]
    assert all(abs(t - 1) < 1e-4 for t in record["total_over_p"]) and record["worst_layer_deviation"] < 1e-4
    assert record["batchnorms"] == 20  # calibrated: every BatchNorm2d of a ResNet-18
    # an independent reference (Ancona et al. 2018): a wrong rule or route gives r far below 1
    assert record["lrp0_fold"]["r"] > 0.999


def test_a_model_without_batchnorm_has_one_lrp0_result(records):
    record = records["squeezenet1_1"]
    assert record["piecewise_linear"] and record["batchnorms"] == 0
    assert record["lrp0_pass"] == record["lrp0_fold"] and record["lrp0_fold"]["r"] > 0.999


def test_layer_scales_are_redrawn_and_gelu_models_skip_lrp0(records):
    record = records["convnext_atto"]
    assert record["redrawn"] >= 8  # timm's ConvNeXt layer scales start at 1e-6
    assert not record["piecewise_linear"] and "lrp0_fold" not in record


def test_a_hang_is_a_timeout_not_a_lost_run():
    record = zoo.run_child("torchvision", "resnet18", "", timeout=0.5)
    assert record["outcome"] == "timeout" and "after" in record["timed_out"]


def test_verdict_separates_refusals_from_crashes():
    def refuse():
        raise UnsupportedLayerError("no rule for Foo\nmore detail")

    def crash():
        raise TypeError("'NoneType' object is not callable")

    assert zoo_common.verdict(refuse) == ("refused", "no rule for Foo")
    assert zoo_common.verdict(crash) == ("crash", "TypeError: 'NoneType' object is not callable")
    assert zoo_common.verdict(lambda: None) == ("explained", "")


def test_piecewise_linear_means_relu_pooling_linear_batchnorm_only():
    with torch.device("meta"):
        import torchvision
        assert zoo.piecewise_linear(torchvision.models.resnet18())
        assert zoo.piecewise_linear(torchvision.models.vgg11())
        assert not zoo.piecewise_linear(torchvision.models.mobilenet_v2())  # ReLU6 is not homogeneous
        assert not zoo.piecewise_linear(torchvision.models.efficientnet_b0())  # SiLU


def test_redraw_touches_only_constant_tiny_parameters():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Linear(4, 2))
    nn.init.zeros_(model[1].weight)  # zero_init_last
    model.register_parameter("gamma", nn.Parameter(torch.full((4,), 1e-6)))  # a layer scale
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    redrawn = zoo_common.redraw_scales(model, torch.Generator().manual_seed(0))
    assert sorted(redrawn) == ["1.weight", "gamma"]
    assert float(model.gamma.detach().min()) >= 0.1 and float(model.gamma.detach().max()) <= 1.0
    for name, p in model.named_parameters():
        if name not in redrawn:
            assert torch.equal(p, before[name]), name


def test_calibrated_batchnorm_standardizes_fresh_data():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8))
    with torch.no_grad():
        model[0].weight.mul_(30).add_(2)  # activations far from N(0, 1)
    zoo_common.calibrate_batchnorm(model, (3, 16, 16), torch.Generator().manual_seed(0), passes=8, batch=8)
    assert not model.training
    with torch.no_grad():
        y = model(torch.randn(16, 3, 16, 16))
    assert y.mean((0, 2, 3)).abs().max() < 0.1 and (y.std((0, 2, 3)) - 1).abs().max() < 0.1


def test_refusals_group_by_cause():
    a = "relprop has no relevance rule for function 'f' (node 'g_1' in module 'features.7.1.attn'); pass rules"
    b = "relprop has no relevance rule for function 'f' (node 'g_11' in module 'layers.0.attn'); pass rules"
    assert zoo.message_group(a) == zoo.message_group(b)
    assert zoo.message_group(a) != zoo.message_group("torch.fx cannot trace 'x'")


def test_smallest_model_of_a_family_has_the_fewest_parameters():
    import timm
    families = zoo.timm_families()
    counts = {name: zoo_common.parameter_count("timm", name) for name in timm.list_models(module="vgg")}
    assert families["vgg"]["model"] == min(counts, key=counts.get)
    assert families["vgg"]["parameters"] == min(counts.values())


def test_a_family_is_represented_by_a_classifier_where_it_has_one():
    """gemma4_vit's smallest model is a headless encoder that drops num_classes and returns tokens;
    the family's classifier (masked mean pool, RMSNorm, linear head) represents it."""
    assert zoo.timm_families()["gemma4_vit"]["model"] == "gemma4_vit_167m"
    assert zoo_common.is_classifier(zoo_common.meta_model("timm", "gemma4_vit_167m"))
    assert not zoo_common.is_classifier(zoo_common.meta_model("timm", "gemma4_vit_167m_enc"))


def test_docs_and_readme_are_generated_from_the_committed_results():
    records = zoo.read_results()
    assert records, "benchmarks/zoo_results.jsonl is committed"
    assert zoo.DOCS.read_text() == zoo.docs_text(records), "run: python benchmarks/zoo.py --write-docs"
    readme = zoo.README.read_text()
    start, end = readme.index(zoo.BEGIN), readme.index(zoo.END) + len(zoo.END)
    assert readme[start:end] == zoo.readme_block(records), "run: python benchmarks/zoo.py --write-docs"
    assert all(math.isfinite(t) for r in records.values() for t in r.get("total_over_p", []))
