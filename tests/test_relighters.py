"""The shared relighter contract, run over every relighter found by name, and the registry."""

from __future__ import annotations

import pytest
import torch

from relit_k8s.errors import RelighterError
from relit_k8s.relighters import BUILTINS, Relighter, available, create, parse_options, resolve
from relit_k8s.testing import check_relighter

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    from relit_k8s.modelkit import make_model

    return str(make_model(tmp_path_factory.mktemp("model") / "tiny", "tiny"))


def contract_options(name: str, request) -> dict:
    """Options a relighter needs to be constructed at all (the diffusion one: a model)."""
    if name == "diffusion":
        # fp32: the contract's tolerances are for fp32 (bf16 is checked by the benchmark)
        return {"model": request.getfixturevalue("tiny_model"), "ddim_steps": 3,
                "resolution": 32, "dtype": "fp32"}
    if name == "luminet":  # a random LumiNet of the golden fixture's tiny sizes, made here
        return {**request.getfixturevalue("tiny_luminet"), "ddim_steps": "2", "dtype": "fp32"}
    return {}


@pytest.fixture(scope="session")
def tiny_luminet(tmp_path_factory) -> dict:
    """``make-model --kind luminet --size tiny``'s options: what a user's clone can run (the
    golden fixture, beside the workspace only, is tests/test_luminet.py's)."""
    from relit_k8s.relighters.luminet.make import make_luminet, run_options

    return run_options(make_luminet(tmp_path_factory.mktemp("luminet") / "tiny", "tiny"))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", sorted(available()))
def test_every_relighter_passes_the_contract(name, device, request):
    check_relighter(resolve(name), device=device, options=contract_options(name, request))


def test_the_example_plugin_is_found_through_its_entry_point():
    # CI installs examples/relit-tiny; its only link to relit-k8s is the entry point.
    assert available().get("tiny") == "relit_tiny:TinyRelighter"
    assert resolve("tiny").name == "tiny"


def test_builtins_cannot_be_shadowed_by_plugins():
    assert set(BUILTINS) <= set(available())
    assert resolve("sh").__module__ == "relit_k8s.relighters.sh"


def test_module_attribute_paths_load():
    cls = resolve("relit_k8s.relighters.sh:SHRelighter")
    assert cls is resolve("sh")


@pytest.mark.parametrize("name,match", [
    ("nope", "unknown relighter 'nope'; available: .*sh"),
    ("no_such_module_xyz:Thing", "cannot load relighter"),
    ("relit_k8s.relighters.sh:SHOptions", "not a relit_k8s.Relighter subclass"),
])
def test_resolution_errors_say_what_to_do(name, match):
    with pytest.raises(RelighterError, match=match):
        resolve(name)


def test_options_come_from_strings_and_errors_name_the_options():
    cls = resolve("sh")
    opts = parse_options(cls, {"dome": "0.25", "rotation": "none"})
    assert opts.dome == 0.25 and opts.rotation == "none"
    with pytest.raises(RelighterError, match=r"no option 'new_decoder'; its options: rotation"):
        parse_options(cls, {"new_decoder": True})
    with pytest.raises(RelighterError, match="dome"):
        parse_options(cls, {"dome": "-1"})


def test_create_places_the_relighter_on_the_device():
    r = create("sh", {}, "cpu")
    assert isinstance(r, Relighter) and r.device == torch.device("cpu")
