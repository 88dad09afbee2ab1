"""Zero-shot heads (the text analogue of CLIP's frozen heads in task arithmetic): cosine logits at a fixed
temperature from theta_0's class-prompt embeddings, frozen through training and merging."""
import pytest
import torch
import torch.nn.functional as F

from fedbench.config import ConfigError
from fedbench.models import zero_shot as zs


def test_every_prompted_task_names_every_class_in_label_order():
    from fedbench.data import load_task
    for task in zs.zero_shot_tasks():
        names = load_task(task)["train"].features["label"].names
        prompts = zs.class_prompts(task, names)
        assert len(prompts) == len(names) and all(len(p) == len(zs.TEMPLATES[task]) for p in prompts)
        assert len({tuple(p) for p in prompts}) == len(names)           # no two classes share their prompts
    with pytest.raises(KeyError):
        zs.class_prompts("rt_sentiment", ["rotten", "no_such_class"])


def test_cosine_head_logits_are_temperature_times_cosine():
    g = torch.Generator().manual_seed(0)
    head = zs.CosineHead(8, 3)
    rows = F.normalize(torch.randn(3, 8, generator=g), dim=-1)
    with torch.no_grad():
        head.weight.copy_(rows * zs.ZERO_SHOT_TEMPERATURE)
        head.bias.zero_()
    x = torch.randn(5, 8, generator=g) * 7.0                      # the input's norm must not matter
    want = zs.ZERO_SHOT_TEMPERATURE * F.cosine_similarity(x[:, None, :], rows[None, :, :], dim=-1)
    torch.testing.assert_close(head(x), want, rtol=1e-5, atol=1e-5)


def _run(options, tasks=("rt_sentiment", "sms_spam"), method="lora"):
    from fedbench.config import DataConfig, ExperimentConfig, FLConfig, PeftConfig, TrainConfig
    from fedbench.fl.server import FederatedRun
    cfg = ExperimentConfig(
        data=DataConfig(task=tasks[0], num_clients=len(tasks), partition="iid", max_train_samples=24,
                        max_test_samples=8, max_length=16, federation="task_clients",
                        federation_options={"tasks": list(tasks), "val_samples": 4, "probe_samples": 4}),
        peft=PeftConfig(method=method, rank=2, train_head=False), train=TrainConfig(local_steps=2, batch_size=4),
        fl=FLConfig(strategy="task_clients", rounds=1, options=options))
    return FederatedRun(cfg)


def test_task_clients_install_frozen_zero_shot_heads_from_theta_0():
    from fedbench.models import load_tokenizer
    run = _run({"zero_shot_heads": True})
    model, td = run.model, run.data
    assert isinstance(model.classifier, zs.CosineHead) and not model.classifier.weight.requires_grad
    assert not any(k.startswith("classifier.") for k in run.global_model.state)      # LoRA: not in the state
    W = model.classifier.weight.detach().clone()
    assert torch.equal(model.classifier.bias, torch.zeros(W.shape[0]))
    torch.testing.assert_close(W.norm(dim=1), torch.full((W.shape[0],), zs.ZERO_SHOT_TEMPERATURE))
    # the rows are the class prompts' embeddings by theta_0, task by task in the joint head's order
    tok = load_tokenizer(run.cfg.model.backbone)
    spam = zs.class_embeddings(model, tok, zs.class_prompts("sms_spam", ["ham", "spam"]))
    torch.testing.assert_close(W[td.offsets[1]:td.offsets[1] + 2], spam * zs.ZERO_SHOT_TEMPERATURE)
    # a prompt itself as the input: its own class wins (zero-shot works on the model's own embedding space)
    enc = tok(zs.class_prompts("sms_spam", ["ham", "spam"])[1][:1], return_tensors="pt")
    logits = model(enc["input_ids"], enc["attention_mask"])[0, td.offsets[1]:td.offsets[1] + 2]
    assert int(logits.argmax()) == 1
    # a round trains the encoder only: the head neither trains nor travels
    ins = run.configure(run.select_clients(1))
    ups = [run.client_update(c, 1, ins[c]) for c in range(2)]
    assert not any(k.startswith("classifier.") for u in ups for k in u.state)
    assert torch.equal(model.classifier.weight, W)


def test_full_fine_tuning_keeps_the_zero_shot_head_frozen():
    run = _run({"zero_shot_heads": True}, method="full")
    W = run.global_model.state["classifier.weight"].clone()          # full FT: the head is in the state
    assert isinstance(run.model.classifier, zs.CosineHead)
    ins = run.configure(run.select_clients(1))
    ups = [run.client_update(c, 1, ins[c]) for c in range(2)]
    assert ups[0].num_steps == 2 and not any(k.startswith("classifier.") for u in ups for k in u.state)
    g = run.strategy.aggregate(run.global_model, ups, 1)
    assert torch.equal(g.state["classifier.weight"], W)


@pytest.mark.parametrize("options, tasks, field", [
    ({"zero_shot_heads": True, "probe_heads": True}, ("rt_sentiment", "sms_spam"), "fl.options.zero_shot_heads"),
    ({"zero_shot_heads": 1}, ("rt_sentiment", "sms_spam"), "fl.options.zero_shot_heads"),
])
def test_bad_zero_shot_options_name_the_field(options, tasks, field):
    with pytest.raises(ConfigError) as e:
        _run(options, tasks)
    assert e.value.field_name == field
