
import pytest

from conftest import REPO, model_configs

from megatron_mesh.config.yaml_file import load_config_tree, load_model_config, parse_value
from megatron_mesh.errors import ConfigError


def write(tmp_path, name, text):
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_scientific_floats_are_numbers_not_strings():
    assert parse_value("6e-4") == 6e-4
    assert parse_value("1.0e-5") == 1e-5
    assert parse_value("3") == 3 and parse_value("4+8R2+4") == "4+8R2+4"


def test_extends_merges_and_child_wins(tmp_path):
    write(tmp_path, "base.yml", "model:\n  hidden_size: 64\n  num_attention_heads: 4\n  layout: '12'\n"
          "  state_scheme: vanilla\n")
    child = write(tmp_path, "sub/child.yml", "extends: ../base.yml\nmodel:\n  layout: 1+2R2+1\n"
                  "  state_scheme: mesh\n  init_method_std: 1e-2\n")
    tree, origins = load_config_tree(child)
    assert tree["model"]["hidden_size"] == 64 and tree["model"]["layout"] == "1+2R2+1"
    assert origins["model.hidden_size"].endswith("base.yml")
    assert origins["model.layout"].endswith("child.yml")
    cfg = load_model_config(child, ["model.buffer_slots=7"])
    assert cfg.buffer_slots == 7 and cfg.init_method_std == 1e-2 and cfg.num_layers == 6


def test_unknown_key_names_key_file_and_closest_match(tmp_path):
    path = write(tmp_path, "bad.yml", "model:\n  hiden_size: 64\n")
    with pytest.raises(ConfigError) as err:
        load_config_tree(path)
    message = str(err.value)
    assert "bad.yml" in message and "'model.hiden_size'" in message
    assert "did you mean 'model.hidden_size'" in message


def test_unknown_section_and_override_key(tmp_path):
    path = write(tmp_path, "ok.yml", "modle:\n  layout: '2'\n")
    with pytest.raises(ConfigError, match="unknown key 'modle'; did you mean 'model'"):
        load_config_tree(path)
    good = REPO / "configs" / "tiny-cpu.yml"
    with pytest.raises(ConfigError, match=r"--set model.slots=3: unknown key 'model.slots'"):
        load_config_tree(good, ["model.slots=3"])
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        load_config_tree(good, ["model.layout"])


def test_invalid_value_names_the_file_that_set_it(tmp_path):
    base = write(tmp_path, "base.yml", "model:\n  hidden_size: 64\n  num_attention_heads: 4\n")
    child = write(tmp_path, "child.yml", "extends: base.yml\nmodel:\n  layout: 4+8R0+4\n")
    with pytest.raises(ConfigError) as err:
        load_model_config(child)
    assert "child.yml" in str(err.value) and "K must be >= 1" in str(err.value)
    wrong_type = write(tmp_path, "t.yml", "extends: base.yml\nmodel:\n  layout: '2'\n"
                       "  state_scheme: vanilla\n  hidden_size: wide\n")
    with pytest.raises(ConfigError, match=r"t.yml: model.hidden_size='wide' has type str, expected int"):
        load_model_config(wrong_type)
    assert str(base)


def test_missing_file_cycle_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config_tree(tmp_path / "nope.yml")
    a = write(tmp_path, "a.yml", "extends: b.yml\n")
    write(tmp_path, "b.yml", "extends: a.yml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config_tree(a)
    broken = write(tmp_path, "broken.yml", "model: [1, 2\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config_tree(broken)


def test_every_shipped_config_parses():
    files = model_configs()
    assert len(files) > 30
    for path in files:
        load_model_config(path)


def test_a_config_copied_out_of_the_repository_still_finds_what_it_extends(tmp_path):
    copied = tmp_path / "mine.yml"
    copied.write_text((REPO / "configs" / "tiny-cpu.yml").read_text())  # extends: train/cpu-smoke.yml
    tree, _ = load_config_tree(copied, [])
    assert tree["training"]["seq_length"] == 64 and tree["model"]["layout"] == "1+2R2+1"
    missing = write(tmp_path, "lost.yml", "extends: nowhere/base.yml\n")
    with pytest.raises(ConfigError, match=r"lost.yml: extends 'nowhere/base.yml': neither .*nowhere/base.yml nor"):
        load_config_tree(missing, [])
