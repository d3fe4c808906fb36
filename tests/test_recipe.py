"""QuantSpec and QuantRecipe validation: bad input fails at construction, naming the key."""

from __future__ import annotations

import pytest
import yaml

from qat import ConfigError, LayerRule, QATError, QuantRecipe, QuantSpec
from qat.app.cli import main as cli_main
from qat.preparation.recipe import DEFAULT_ACTIVATION, DEFAULT_WEIGHT

BAD_SPECS = [
    ({"bits": 1}, "bits", "2, 3, 4, 5, 6, 7, 8, 16"),
    ({"bits": 12}, "bits", "one of"),
    ({"bits": "four"}, "bits", "one of"),
    ({"bits": True}, "bits", "one of"),
    ({"signed": "yes"}, "signed", "true or false"),
    ({"granularity": "per_row"}, "granularity", "`per_tensor`, `per_channel`, `per_group`, `per_token`"),
    ({"observer": "histogram"}, "observer", "`minmax`, `moving_average_minmax`, `percentile`, `mse`"),
    ({"granularity": "per_group"}, "group_size", "required"),
    ({"granularity": "per_group", "group_size": 0}, "group_size", "integer from 1 to 1048576"),
    ({"group_size": 32}, "group_size", "only used with granularity `per_group`"),
    ({"axis": 1}, "axis", "only used with granularity"),
    ({"granularity": "per_channel", "axis": 1.5}, "axis", "integer"),
    ({"granularity": "per_token", "learnable": True}, "learnable", "cannot be learned"),
    ({"averaging_constant": 0}, "averaging_constant", "(0, 1]"),
    ({"percentile": 40}, "percentile", "(50, 100]"),
]


@pytest.mark.parametrize("fields,key,allowed", BAD_SPECS)
def test_invalid_specs_name_the_field_and_the_allowed_values(fields, key, allowed):
    with pytest.raises(ConfigError) as err:
        QuantSpec(**fields)
    assert err.value.key == key
    assert f"`{key}`" in str(err.value) and allowed in str(err.value)


@pytest.mark.parametrize("spec,role,key", [
    (QuantSpec(bits=16), "weight", "bits"),
    (QuantSpec(granularity="per_token"), "weight", "granularity"),
    (QuantSpec(observer="percentile"), "weight", "observer"),
    (QuantSpec(granularity="per_channel"), "activation", "granularity"),
    (QuantSpec(observer="mse"), "activation", "observer"),
])
def test_role_checks(spec, role, key):
    with pytest.raises(ConfigError) as err:
        spec.check_role(role)
    assert err.value.key == key


def test_spec_derived_numbers():
    assert (QuantSpec(bits=4).qmin, QuantSpec(bits=4).qmax) == (-8, 7)
    assert (QuantSpec(bits=4, signed=False).qmin, QuantSpec(bits=4, signed=False).qmax) == (0, 15)
    assert QuantSpec(bits=8, narrow_range=True).qmin == -127
    assert QuantSpec(bits=16, signed=False).dtype_name == "uint16"
    assert QuantSpec(bits=4, granularity="per_group", group_size=32).qparam_shape((16, 70), axis=1) == (16, 3)
    assert QuantSpec(granularity="per_token").qparam_shape((2, 5, 8), axis=2) == (2, 5, 1)
    assert QuantSpec(granularity="per_group", group_size=8, observer="mse").describe() == "int8 per_group(8) sym mse"


def test_defaults_and_partial_specs_apply_on_the_role_defaults():
    recipe = QuantRecipe.from_dict({"weight": {"bits": 4}, "activation": {"bits": 16, "signed": True}})
    assert recipe.weight == DEFAULT_WEIGHT.replace(bits=4)
    assert recipe.activation == DEFAULT_ACTIVATION.replace(bits=16, signed=True)
    assert QuantRecipe.from_dict({"activation": None}).activation is None


def test_round_trip_through_dict_and_yaml(tmp_path):
    recipe = QuantRecipe(
        weight=QuantSpec(bits=4, granularity="per_group", group_size=32),
        activation=QuantSpec(granularity="per_token"),
        rules=(LayerRule(names="lm_head", weight={"bits": 8}, activation=None), LayerRule(types=("Embedding",), weight=None)),
        skip=("model\\.norm",),
        fold_bn=False,
    )
    assert QuantRecipe.from_dict(recipe.to_dict()) == recipe
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe.to_dict()))
    assert QuantRecipe.from_yaml(path) == recipe
    assert QuantRecipe.coerce(str(path)) == recipe and QuantRecipe.coerce(None) == QuantRecipe()


BAD_RECIPES = [
    ({"wieght": {"bits": 4}}, "`wieght`", "did you mean `weight`"),
    ({"weight": {"bitz": 4}}, "`weight.bitz`", "did you mean `bits`"),
    ({"weight": {"bits": 16}}, "`weight.bits`", "weights take 2–8 bits"),
    ({"weight": {"granularity": "per_token"}}, "`weight.granularity`", "for activations"),
    ({"weight": 4}, "`weight`", "must be a mapping"),
    ({"activation": {"granularity": "per_channel"}}, "`activation.granularity`", "activations take"),
    ({"activation": {"observer": "mse"}}, "`activation.observer`", "searches weight clipping"),
    ({"activation": {"bits": 9}}, "`activation.bits`", "one of"),
    ({"rules": {"names": "fc"}}, "`rules`", "must be a list"),
    ({"rules": ["fc"]}, "`rules[0]`", "must be a mapping"),
    ({"rules": [{"weight": {"bits": 8}}]}, "`rules[0].names`", "needs `names`"),
    ({"rules": [{"names": "fc", "wieght": {}}]}, "`rules[0].wieght`", "did you mean `weight`"),
    ({"rules": [{"names": "fc("}]}, "`rules[0].names`", "not a valid regular expression"),
    ({"rules": [{"names": 3}]}, "`rules[0].names`", "regular expression string"),
    ({"rules": [{"types": [1]}]}, "`rules[0].types`", "list of strings"),
    ({"rules": [{"names": "fc", "weight": {"bits": 1}}]}, "`rules[0].weight.bits`", "one of"),
    ({"rules": [{"names": "fc", "weight": {"granuarity": "per_tensor"}}]}, "`rules[0].weight.granuarity`", "did you mean `granularity`"),
    ({"rules": [{"names": "fc", "activation": {"granularity": "per_group", "group_size": 4}}]}, "`rules[0].activation.granularity`",
     "activations take"),
    ({"rules": [{"names": "a"}, {"names": "b", "weight": {"observer": "percentile"}}]}, "`rules[1].weight.observer`", "for activations"),
    ({"skip": [3]}, "`skip`", "list of strings"),
    ({"skip": ["fc["]}, "`skip[0]`", "not a valid regular expression"),
    ({"fold_bn": "yes"}, "`fold_bn`", "true or false"),
    ([1, 2], "`recipe`", "must be a mapping"),
]


@pytest.mark.parametrize("data,key,message", BAD_RECIPES)
def test_malformed_recipes_name_the_key(data, key, message):
    with pytest.raises(ConfigError) as err:
        QuantRecipe.from_dict(data, source="r.yaml")
    text = str(err.value)
    assert text.startswith("r.yaml: ") and key in text and message in text, text


def test_yaml_file_errors_name_the_file_and_line(tmp_path):
    with pytest.raises(QATError, match=r"cannot read recipe file `.*missing\.yaml`"):
        QuantRecipe.from_yaml(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("weight:\n  bits: 4\n rules: [\n")
    with pytest.raises(QATError, match=r"bad.yaml` line 3"):
        QuantRecipe.from_yaml(bad)
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text("weight:\n  bits: 3.5\n")
    with pytest.raises(ConfigError, match=r"wrong.yaml: `weight.bits`"):
        QuantRecipe.from_yaml(wrong)


def test_cli_check_recipe(tmp_path, capsys):
    good = tmp_path / "good.yaml"
    good.write_text("weight: {bits: 4}\nrules:\n  - names: fc\n    weight: {bits: 8}\n")
    assert cli_main(["check-recipe", str(good)]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["weight"]["bits"] == 4 and printed["weight"]["granularity"] == "per_channel"
    bad = tmp_path / "bad.yaml"
    bad.write_text("weight: {bits: 99}\n")
    assert cli_main(["check-recipe", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "`weight.bits`" in err and len(err.strip().splitlines()) == 1
