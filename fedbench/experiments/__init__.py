"""One module per paper experiment. Each exposes ``run(profile=..., **overrides)`` that computes (or
loads, by config hash) every run it needs and writes its tables and figures under
``results/<experiment>/`` (see :func:`fedbench.experiments.common.output_dir`). Its profiles are
``configs/<experiment>/{smoke,quick,full}.yaml``.

The experiments are registered by name (:data:`fedbench.registry.EXPERIMENTS`) with the module that runs
them and its notebook. Every one sits on a base :class:`fedbench.config.ExperimentConfig` and runs on the
shared loop, so every core condition (e.g. ``fl.dropout`` or ``train.dp.enabled``) reaches it by config.
"""
from fedbench.registry import EXPERIMENTS

# exports: `fedbench export` can write one of its runs as a config that runs alone (its runs are their configs)
EXPORTS = ("quickstart", "fl_tac", "autofednlp", "lorm", "task_arithmetic")
for _name, _notebook, _doc in [
        ("quickstart", "00_quickstart", "LoRA FedAvg on one offline task vs a linear probe"),
        ("fedpeft", "01_fedpeft", "FedPEFT: which parameters to train and send (arXiv 2210.01708)"),
        ("fl_tac", "02_fl_tac", "FL-TAC: per-task adapters clustered on the server (arXiv 2404.15384)"),
        ("autofednlp", "03_autofednlp", "AutoFedNLP / FedAdapter: progressive adapter configuration (the autofednlp strategy)"),
        ("lorm", "04_lorm", "LoRM: closed-form LoRA merges in federated class-incremental learning"),
        ("task_arithmetic", "05_task_arithmetic", "task arithmetic is one-shot FedAvg (task-clients on the loop)"),
        ("robustness", "06_robustness", "robust rules under Byzantine clients and NaN faults")]:
    EXPERIMENTS.register(_name, f"fedbench.experiments.{_name}", notebook=_notebook, doc=_doc,
                         exports=_name in EXPORTS)
