"""The bench layer between the loop and the experiments: what every experiment shares.

Profiles and typed settings (:mod:`~fedbench.bench.profiles`), the one runner through the run store
(:mod:`~fedbench.bench.runner`) with its frozen-prefix caches (:mod:`~fedbench.bench.caches`), the one
validation learning-rate search (:mod:`~fedbench.bench.lr_search`), output tables, figures and the table run
store (:mod:`~fedbench.bench.store`), and the generated report (:mod:`~fedbench.bench.report`).
"""
from fedbench.bench.caches import PrefixCaches
from fedbench.bench.lr_search import select_lr
from fedbench.bench.profiles import (Profile, Settings, check_list, check_method, check_profile, check_seeds,
                                     check_subset, chosen_lr, configs_root, is_int, is_number, load_profiles, no_lr,
                                     output_dir, profile_path, read_profile_file, resolve_profile, results_root,
                                     runs_root, variant_note)
from fedbench.bench.report import Headline, write_outputs, write_report
from fedbench.bench.runner import Runner
from fedbench.bench.store import TableRunStore, save_figure, save_table

__all__ = ["Headline", "PrefixCaches", "Profile", "Runner", "Settings", "TableRunStore", "check_list", "check_method",
           "check_profile", "check_seeds", "check_subset", "chosen_lr", "configs_root", "is_int", "is_number",
           "load_profiles", "no_lr", "output_dir", "profile_path", "read_profile_file", "resolve_profile",
           "results_root", "runs_root", "save_figure", "save_table", "select_lr", "variant_note", "write_outputs", "write_report"]
