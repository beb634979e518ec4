"""An output folder remembers what made its outputs; a run made differently is refused."""

from __future__ import annotations

import json

import pytest

from relit_k8s.errors import ConfigError
from relit_k8s.maker import MAKER_KEY
from relit_k8s.planner import PlanSettings, plan, write_run


def a_plan(tmp_path, **kw):
    base = dict(input=str(tmp_path / "in"), refs=str(tmp_path / "refs"),
                output=str(tmp_path / "out"), iterations=2)
    return plan(PlanSettings(**{**base, **kw}), ["a.jpg", "b.jpg"], ["r.hdr"])


def runs(tmp_path) -> set[str]:
    root = tmp_path / "out" / "_relit"
    return {p.name for p in root.iterdir() if p.is_dir()} if root.exists() else set()


def maker_record(tmp_path) -> dict:
    return json.loads((tmp_path / "out" / MAKER_KEY).read_text())


def test_the_first_run_records_its_maker_and_a_run_made_differently_is_refused(tmp_path):
    first = write_run(a_plan(tmp_path))
    record = maker_record(tmp_path)
    assert record["relighter"] == "sh" and record["run_id"] == first.run_id
    assert record["options"]["rotation"] == "seed" and record["model"] is None

    # The same maker with other selection settings (more iterations) is welcome.
    more = write_run(a_plan(tmp_path, iterations=5))
    assert runs(tmp_path) == {first.run_id, more.run_id}

    other = a_plan(tmp_path, options={"rotation": "none"})
    with pytest.raises(ConfigError) as e:
        write_run(other)
    message = str(e.value)
    assert 'rotation "seed" -> "none"' in message and first.run_id in message
    assert "new --output" in message and "--allow-mixed-output" in message
    assert runs(tmp_path) == {first.run_id, more.run_id}  # nothing of the refused run

    mixed = write_run(other, allow_mixed=True)
    assert mixed.run_id in runs(tmp_path)
    assert maker_record(tmp_path) == record  # the record keeps the first maker
    with pytest.raises(ConfigError, match="relighter sh -> plugins_for_tests:PickyRelighter"):
        write_run(a_plan(tmp_path, relighter="plugins_for_tests:PickyRelighter"))


def test_a_rerun_of_an_accepted_run_is_never_refused(tmp_path):
    other = a_plan(tmp_path, options={"rotation": "none"})
    write_run(a_plan(tmp_path))
    mixed = write_run(other, allow_mixed=True)
    assert write_run(other).run_id == mixed.run_id  # its manifest exists: the same run


def test_folders_written_before_records_were_kept_use_their_oldest_run(tmp_path):
    first = write_run(a_plan(tmp_path))
    (tmp_path / "out" / MAKER_KEY).unlink()
    with pytest.raises(ConfigError, match="rotation"):
        write_run(a_plan(tmp_path, options={"rotation": "none"}))
    assert not (tmp_path / "out" / MAKER_KEY).exists()
    write_run(a_plan(tmp_path, iterations=3))
    assert maker_record(tmp_path)["run_id"] == first.run_id


def model_folder(path, config: dict, weights: bytes):
    (path / "unet").mkdir(parents=True)
    (path / "unet" / "config.json").write_text(json.dumps(config))
    (path / "unet" / "model.safetensors").write_bytes(weights)
    return str(path)


def test_another_model_is_refused_but_options_that_only_change_speed_are_not(tmp_path):
    model = model_folder(tmp_path / "model", {"layers": 2}, b"w" * 100)
    diffusion = dict(relighter="diffusion")
    write_run(a_plan(tmp_path, **diffusion, options={"model": model}))
    assert len(maker_record(tmp_path)["model"]) == 64  # a sha256 of the model's files
    assert "compile" not in maker_record(tmp_path)["options"]
    write_run(a_plan(tmp_path, **diffusion, options={"model": model, "compile": True,
                                                      "batch_size": 4}))
    with pytest.raises(ConfigError, match="ddim_steps 50 -> 20"):
        write_run(a_plan(tmp_path, **diffusion, options={"model": model, "ddim_steps": 20}))

    (tmp_path / "model" / "unet" / "config.json").write_text(json.dumps({"layers": 3}))
    with pytest.raises(ConfigError, match="model files"):  # same path, other model
        write_run(a_plan(tmp_path, **diffusion, options={"model": model, "eta": 0.5}))
    copy = model_folder(tmp_path / "copy", {"layers": 2}, b"w" * 100)
    write_run(a_plan(tmp_path, **diffusion, options={"model": copy}))  # same files elsewhere
    with pytest.raises(ConfigError, match="model files"):  # other weights
        write_run(a_plan(tmp_path, **diffusion, options={
            "model": model_folder(tmp_path / "other", {"layers": 2}, b"w" * 101)}))
    with pytest.raises(ConfigError, match=r'model "\S+/model" -> "\S+/gone"'):
        # a model that cannot be read from here is compared by its path
        write_run(a_plan(tmp_path, **diffusion, options={"model": str(tmp_path / "gone")}))


@pytest.mark.parametrize("kind", ["diffusion", "luminet"])
def test_a_resolution_the_model_cannot_run_is_refused_before_anything_is_written(
        tmp_path, kind):
    """A run that would fail while loading its model writes no plan and no maker record, so
    the corrected command is not refused as "made differently"; one line, exit 78."""
    from conftest import EXAMPLES, cli

    from relit_k8s.modelkit import make_model
    from relit_k8s.relighters.luminet.make import make_luminet, run_options

    if kind == "diffusion":
        options = {"model": str(make_model(tmp_path / "m", "tiny"))}  # native 32, step 4
        bad, good = "33", "32"
    else:
        options = run_options(make_luminet(tmp_path / "m", "tiny"))  # 128 x 128 only
        bad, good = "100", options.pop("resolution")
    flags = [f for k, v in options.items() for f in ("-O", f"{k}={v}")]
    args = ["run", "--input", str(EXAMPLES / "images"), "--refs", str(EXAMPLES / "refs"),
            "--img-pattern", "a*", "--ref-pattern", "sky*", "--output", str(tmp_path / "out"),
            "--relighter", kind, *flags, "--iterations", "1", "--ddim-steps", "2",
            "--no-progress"]
    refused = cli(*args, "-O", f"resolution={bad}")
    assert refused.returncode == 78, refused.stderr
    assert f"resolution={bad}" in refused.stderr and "Traceback" not in refused.stderr
    assert not (tmp_path / "out").exists()
    fixed = cli(*args, "-O", f"resolution={good}")
    assert fixed.returncode == 0, fixed.stderr
