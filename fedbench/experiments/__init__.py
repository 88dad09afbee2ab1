"""One module per paper experiment. Each exposes ``run(profile=..., **overrides)`` that computes (or
loads, by config hash) every run it needs and writes its tables and figures under
``results/<experiment>/`` (see :func:`fedbench.experiments.common.output_dir`)."""
