"""Profile files: a variant extends a profile (shared base, so a shared run store) and writes its own folder."""
from pathlib import Path

import pytest

from fedbench.config import ConfigError
from fedbench.experiments import fedpeft
from fedbench.bench import output_dir, profile_path, read_profile_file

QUICK = profile_path("fedpeft", "quick")


def write(tmp_path: Path, text: str) -> Path:
    (tmp_path / "configs" / "fedpeft").mkdir(parents=True, exist_ok=True)
    p = tmp_path / "configs" / "fedpeft" / "variant.yaml"
    p.write_text(text)
    return p


def test_a_variant_lays_its_keys_over_the_profile_it_extends(tmp_path):
    (tmp_path / "configs" / "fedpeft").mkdir(parents=True)
    (tmp_path / "configs" / "fedpeft" / "quick.yaml").write_text(QUICK.read_text())   # found beside it
    p = write(tmp_path, "experiment: fedpeft\nextends: quick\nresults: more-seeds\n"
                        "base: {fl: {rounds: 12}}\nsettings: {seeds: [0, 1, 2, 3]}\n")
    d, up = read_profile_file(p), read_profile_file(QUICK)
    assert d["profile"] == "quick" and d["results"] == "more-seeds"
    assert d["settings"]["seeds"] == [0, 1, 2, 3]
    assert {k: v for k, v in d["settings"].items() if k != "seeds"} == \
        {k: v for k, v in up["settings"].items() if k != "seeds"}
    assert d["base"]["fl"] == {**up["base"]["fl"], "rounds": 12}        # merged field by field
    assert d["base"]["data"] == up["base"]["data"]
    s = fedpeft.settings_for("quick", path=p)
    assert tuple(s["seeds"]) == (0, 1, 2, 3) and s["rounds"] == 12


def test_a_variant_writes_its_own_folder_not_the_profile_s(tmp_results, tmp_path):
    p = write(tmp_path, "experiment: fedpeft\nextends: quick\nresults: more-seeds\n")
    assert output_dir("fedpeft", "quick", p) == tmp_results / "fedpeft" / "more-seeds"
    assert output_dir("fedpeft", "quick") == tmp_results / "fedpeft"
    assert output_dir("fedpeft", "full", profile_path("fedpeft", "full")) == tmp_results / "fedpeft" / "full"


def test_the_committed_quick_complete_variant_shares_quick_s_runs_and_adds_to_them():
    path = profile_path("fedpeft", "quick").parent / "quick-complete.yaml"
    s, q = fedpeft.settings_for("quick", path=path), fedpeft.settings_for("quick")
    assert s["base"].hash() == q["base"].hash()
    cells, quick_cells = fedpeft.build_cells(s), fedpeft.build_cells(q)
    assert set(quick_cells) < set(cells)

    def run_keys(settings, cs):
        return {fedpeft.make_config(c, settings, lr=1e-3).hash() for c in cs}
    assert run_keys(q, quick_cells) < run_keys(s, cells)   # each quick run is one of its runs: loaded, not retrained
    assert set(fedpeft.METHODS) <= {c.method for c in cells if c.dp_epsilon is not None}


@pytest.mark.parametrize("text, field", [
    ("experiment: fedpeft\nextends: quick\n", "results"),                       # would overwrite quick's outputs
    ("experiment: fedpeft\nextends: medium\nresults: x\n", "extends"),
    ("extends: quick\nresults: x\n", "experiment"),
    ("experiment: fedpeft\nextends: quick\nresults: quick\n", "results"),
    ("experiment: fedpeft\nextends: quick\nresults: runs\n", "results"),
    ("experiment: fedpeft\nextends: quick\nresults: ../elsewhere\n", "results"),
    ("experiment: fedpeft\nextends: quick\nresults: x\nbasis: {}\n", "basis"),
])
def test_a_bad_profile_file_names_its_key(tmp_path, text, field):
    with pytest.raises(ConfigError) as e:
        read_profile_file(write(tmp_path, text))
    assert e.value.field_name == field


def test_a_variant_s_protocol_preamble_names_what_it_changes(tmp_path):
    from fedbench.bench import variant_note
    p = write(tmp_path, "experiment: fedpeft\nextends: quick\nresults: more-seeds\n"
                        "base: {fl: {rounds: 3}}\nsettings: {seeds: [0, 1, 2, 3]}\n")
    note = variant_note(p)
    assert "`more-seeds`" in note and "`quick` profile" in note and "`seeds`" in note and "`base.fl`" in note
    assert variant_note(QUICK) == "" and variant_note(None) == ""
