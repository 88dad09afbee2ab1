"""Methods that add nothing and choose which existing parameters train.

- full: every parameter (full fine-tuning).
- head: the classifier only (linear probe on frozen features).
- bitfit: every bias of the encoder + the head (Ben Zaken et al., 2022).
"""


def apply_full(model, cfg) -> None:
    for p in model.parameters():
        p.requires_grad_(True)


def apply_head(model, cfg) -> None:
    model.classifier.requires_grad_(True)


def apply_bitfit(model, cfg) -> None:
    for name, p in model.encoder.named_parameters():
        if name.endswith(".bias"):
            p.requires_grad_(True)
