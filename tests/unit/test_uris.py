"""Model Registry URIs: built and parsed by one helper (heygen_ray/uris.py)."""

import pytest

from heygen_ray.uris import ModelURI, is_model_uri, model_uri, parse_model_uri


def test_build_and_parse_round_trip():
    assert model_uri("video-cls", version=3) == "models:/video-cls/3"
    assert model_uri("video-cls", alias="champion") == "models:/video-cls@champion"
    assert model_uri("video-cls") == "models:/video-cls"
    for uri in ("models:/video-cls/3", "models:/video-cls@champion", "models:/video-cls"):
        assert str(parse_model_uri(uri)) == uri
    assert parse_model_uri("models:/a@b") == ModelURI("a", alias="b")
    assert parse_model_uri("models:/a/7/") == ModelURI("a", version="7")
    assert parse_model_uri("models:/m-0123abcd") == ModelURI("m-0123abcd")  # MLflow 3 logged model


def test_bad_uris_and_names_are_named():
    with pytest.raises(ValueError, match="runs:/x/model.*models:/<name>@<alias>"):
        parse_model_uri("runs:/x/model")
    with pytest.raises(ValueError, match="not both"):
        model_uri("a", version=1, alias="b")
    with pytest.raises(ValueError, match="'a/b'"):
        model_uri("a/b", version=1)
    assert is_model_uri("models:/a@b") and not is_model_uri("/runs/cls/model")
