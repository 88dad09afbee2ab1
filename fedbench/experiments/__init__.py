"""One module per paper experiment. Each exposes ``run(profile=..., **overrides)`` that computes (or
loads, by config hash) every run it needs and writes its tables and figures under
``results/<experiment>/`` (see :func:`fedbench.bench.output_dir`). Its profiles are
``configs/<experiment>/{smoke,quick,full}.yaml`` (``paper.yaml`` too for fedpeft, fl_tac, autofednlp, lorm).

The experiments are registered by name (:data:`fedbench.registry.EXPERIMENTS`) with the module that runs
them and its notebook. Every one sits on a base :class:`fedbench.config.ExperimentConfig` and runs on the
shared loop, so every core condition (e.g. ``fl.dropout`` or ``train.dp.enabled``) reaches it by config.
"""
from fedbench.bench.report import Headline
from fedbench.registry import EXPERIMENTS

# name, notebook, what it tests, the table that heads its report, whether `fedbench export` writes its runs as
# configs that run alone
EXPERIMENT_TABLE = [
    ("quickstart", "00_quickstart", "LoRA FedAvg on one offline task vs a linear probe",
     Headline("summary.csv", ("task", "method"), ("final_accuracy", "linear_probe_accuracy", "total_mb")), True),
    ("fedpeft", "01_fedpeft", "FedPEFT: which parameters to train and send (arXiv 2210.01708)",
     Headline("headline.csv", ("task", "variant"), ("seeds", "final_accuracy", "score", "MB_per_client_per_round",
                                                    "bytes_pct_of_full")), False),
    ("fl_tac", "02_fl_tac", "FL-TAC: per-task adapters clustered on the server (arXiv 2404.15384)",
     Headline("summary.csv", ("method", "arm", "task"), ("accuracy", "lr")), True),
    ("autofednlp", "03_autofednlp",
     "AutoFedNLP / FedAdapter: progressive adapter configuration (the autofednlp strategy)",
     Headline("summary.csv", ("method",), ("final_accuracy", "time_to_target_sim_s", "bytes_total")), True),
    ("lorm", "04_lorm", "LoRM: closed-form LoRA merges in federated class-incremental learning",
     Headline("summary.csv", ("method",), ("final_avg_accuracy", "avg_incremental_accuracy", "forgetting",
                                           "mb_up")), True),
    ("task_arithmetic", "05_task_arithmetic", "task arithmetic is one-shot FedAvg (task-clients on the loop)",
     Headline("table.csv", ("tuning", "setting", "method", "variant"), ("accuracy", "accuracy_std", "normalized",
                                                                         "seeds")), True),
    ("robustness", "06_robustness", "robust rules under Byzantine clients and NaN faults",
     Headline("robustness_wide.csv", ("aggregator",), ("clean", "sign_flip 10%", "sign_flip 30%", "scale 10%",
                                                       "scale 30%", "gaussian 10%", "gaussian 30%", "label_flip 10%",
                                                       "label_flip 30%", "nan_update 10%", "nan_update 30%")), False),
    ("lora_family", "07_lora_family", "the federated-LoRA family under one set of conditions, heterogeneous ranks",
     Headline("table.csv", ("condition", "method"), ("seeds", "accuracy", "ci_low", "ci_high", "mb_total")), False),
]
for _name, _notebook, _doc, _headline, _exports in EXPERIMENT_TABLE:
    EXPERIMENTS.register(_name, f"fedbench.experiments.{_name}", notebook=_notebook, doc=_doc, headline=_headline,
                         exports=_exports)
