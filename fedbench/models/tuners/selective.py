"""Methods that add nothing and choose which existing parameters train.

- full: every parameter (full fine-tuning); with ``peft.depth`` every parameter of the top `depth` layers
  + the head (full fine-tuning of the top of the stack, the bottom frozen: its outputs can be cached).
- head: the classifier only (linear probe on frozen features).
- bitfit: every bias of the encoder + the head (Ben Zaken et al., 2022); with ``peft.depth`` the biases of
  the top `depth` layers + the head.
"""


def _top(model, cfg) -> list:
    from fedbench.models.tuners import top_layers
    return [model.layers[i] for i in top_layers(model.num_layers, cfg.depth)]


def apply_full(model, cfg) -> None:
    if getattr(cfg, "depth", None) is None:
        for p in model.parameters():
            p.requires_grad_(True)
        return
    for layer in _top(model, cfg):
        layer.requires_grad_(True)
    model.classifier.requires_grad_(True)


def apply_head(model, cfg) -> None:
    model.classifier.requires_grad_(True)


def apply_bitfit(model, cfg) -> None:
    modules = [model.encoder] if getattr(cfg, "depth", None) is None else _top(model, cfg)
    for module in modules:
        for name, p in module.named_parameters():
            if name.endswith("bias"):
                p.requires_grad_(True)
