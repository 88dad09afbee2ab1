"""Image tasks on a ViT backbone: a tiny random ViT saved to disk stands in for a hub id (offline here)."""
import json

import numpy as np
import pytest
import torch

from fedbench.config import ConfigError, DataConfig, ExperimentConfig, FLConfig, ModelConfig, PeftConfig, TrainConfig
from fedbench.models import BackboneUnavailableError, build_model, count_parameters, lora_modules
from fedbench.models.inputs import ImageSplit
from fedbench.models.vision import VisionEncoderClassifier

MEAN, STD = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)


@pytest.fixture(scope="module")
def vit_dir(tmp_path_factory):
    from transformers import ViTConfig, ViTModel
    path = tmp_path_factory.mktemp("tiny-vit")
    config = ViTConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64,
                       image_size=16, patch_size=4, num_channels=3)
    torch.manual_seed(0)
    ViTModel(config, add_pooling_layer=False).save_pretrained(path)
    (path / "preprocessor_config.json").write_text(json.dumps({"image_mean": MEAN, "image_std": STD}))
    return str(path)


def pixels(n=4, seed=0):
    return torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


def test_image_split_resizes_repeats_grey_and_normalises():
    grey = np.full((2, 8, 8), 255, dtype=np.uint8)
    split = ImageSplit(grey, torch.tensor([0, 1]), image_size=16, num_channels=3, mean=MEAN, std=STD)
    x, mask = split.inputs([1, 0])
    assert mask is None and x.shape == (2, 3, 16, 16)
    for c in range(3):   # white -> (1 - mean_c) / std_c in every channel, after resizing
        torch.testing.assert_close(x[:, c], torch.full((2, 16, 16), (1 - MEAN[c]) / STD[c]))
    rgb = np.zeros((1, 16, 16, 3), dtype=np.uint8)
    rgb[..., 2] = 255
    x, _ = ImageSplit(rgb, torch.tensor([0]), 16, 3, MEAN, STD).inputs([0])
    assert torch.allclose(x[0, 2], torch.tensor((1 - MEAN[2]) / STD[2])) and torch.allclose(x[0, 0], torch.tensor(-2.0))


@pytest.mark.parametrize("method", ["full", "head", "bitfit", "lora", "adapter", "prompt"])
def test_every_peft_method_on_a_vit(vit_dir, method):
    model = build_model(ModelConfig(backbone=vit_dir), PeftConfig(method=method, depth=2, prompt_tokens=3), 5, seed=1)
    assert isinstance(model, VisionEncoderClassifier) and model.num_layers == 3
    logits = model(pixels(), None)
    assert logits.shape == (4, 5) and torch.isfinite(logits).all()
    trainable, total = count_parameters(model)
    assert 0 < trainable <= total
    if method == "lora":   # fedbench's names ('query', 'value') mapped onto ViT's q_proj / v_proj, top 2 layers
        names = [m.name for m in lora_modules(model)]
        assert len(names) == 4 and all(n.endswith(("q_proj", "v_proj")) for n in names)
        assert not any(".layers.0." in n for n in names)
    if method in ("lora", "adapter"):   # a new LoRA / adapter starts as the identity: same logits as the head alone
        head = build_model(ModelConfig(backbone=vit_dir), PeftConfig(method="head"), 5, seed=1)
        torch.testing.assert_close(logits, head(pixels(), None))
    if method in ("lora", "adapter", "head"):
        assert model.frozen_prefix == (3 if method == "head" else 1)
    logits.sum().backward()      # gradients reach what trains
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_staged_forward_equals_whole_forward(vit_dir):
    model = build_model(ModelConfig(backbone=vit_dir), PeftConfig(method="lora", depth=1), 3, seed=0)
    x = pixels()
    hidden = model.prefix_hidden(x, None, 2)
    mask = torch.ones(hidden.shape[:2], dtype=torch.long)
    torch.testing.assert_close(model(hidden=hidden, attention_mask=mask, start_layer=2), model(x, None))


def _cfg(backbone, task="digits", method="lora", seed=0):
    return ExperimentConfig(
        name="vision", seed=seed,
        data=DataConfig(task=task, num_clients=3, partition="dirichlet", alpha=1.0, max_train_samples=60,
                        max_test_samples=40),
        model=ModelConfig(backbone=backbone), peft=PeftConfig(method=method, depth=1, rank=2),
        train=TrainConfig(local_steps=2, batch_size=8, lr=1e-2), fl=FLConfig(rounds=2))


def test_federated_run_on_an_image_task_is_seeded_and_cached(vit_dir):
    from fedbench.fl import prepare_data, run_federated
    cfg = _cfg(vit_dir)
    data = prepare_data(cfg)
    assert isinstance(data.train, ImageSplit) and data.train.images.shape[1:] == (8, 8) and data.num_labels == 10
    a = run_federated(cfg, data)
    b = run_federated(cfg, prepare_data(cfg))
    assert a.summary["final_accuracy"] == b.summary["final_accuracy"]
    pd_a, pd_b = a.rounds.drop(columns="wall_s"), b.rounds.drop(columns="wall_s")
    assert pd_a.equals(pd_b)
    # the frozen bottom layers' cache (LoRA on the top layer only) changes nothing but speed
    from fedbench.fl.server import FederatedRun
    plain = FederatedRun(cfg, data, use_activation_cache=False)
    for r in (1, 2):
        plain.run_round(r)
    assert plain.result().summary["final_accuracy"] == a.summary["final_accuracy"]


def test_backbone_and_task_must_match(vit_dir):
    from fedbench.fl import prepare_data
    with pytest.raises(ConfigError, match="model.backbone.*later issue"):
        prepare_data(_cfg("minilm"))          # image task on the bundled text encoder
    with pytest.raises(ConfigError, match="model.backbone.*image backbone"):
        prepare_data(_cfg(vit_dir, task="sms_spam"))


def test_hub_vision_id_offline_is_a_clear_error(monkeypatch):
    from fedbench.fl import prepare_data
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(BackboneUnavailableError, match="offline"):
        prepare_data(_cfg("google/vit-base-patch16-224-in21k"))
