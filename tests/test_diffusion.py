"""The diffusion relighter on a tiny random-weight model (CPU), and its loading code."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from conftest import EXAMPLES, ROOT, cli, upload_folder

from relit_k8s.errors import RelighterError
from relit_k8s.modelkit import make_model
from relit_k8s.relighters import create
from relit_k8s.relighters.diffusion import fetch_model

OPTS = {"ddim_steps": 4, "resolution": 32}


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return make_model(tmp_path_factory.mktemp("m") / "tiny", "tiny", new_decoder=True)


def pair():
    g = torch.Generator().manual_seed(1)
    return torch.rand(3, 30, 44, generator=g), torch.rand(3, 16, 32, generator=g) * 5


def test_outputs_keep_the_input_size_and_depend_only_on_the_seed(model):
    r = create("diffusion", {"model": str(model), **OPTS}, "cpu")
    image, ref = pair()
    out = r.relight(image, ref, [5, 6, 7])
    assert out.shape == (3, 3, 30, 44) and 0 <= out.min() and out.max() <= 1
    again = create("diffusion", {"model": str(model), **OPTS}, "cpu").relight(image, ref, [6])
    assert torch.allclose(out[1], again[0], atol=1e-5)
    single = torch.cat([r.relight(image, ref, [s]) for s in (5, 6, 7)])
    assert torch.allclose(out, single, atol=1e-5)


def test_one_pass_equals_two_pass_guidance_when_the_branches_are_equal(model):
    r = create("diffusion", {"model": str(model), **OPTS, "guidance_scale": 9.0}, "cpu")
    assert r.one_pass  # the model's unconditional text equals its conditional one
    image, ref = pair()
    fast = r.relight(image, ref, [3, 4])
    with torch.inference_mode():  # the seed's way: two passes per step, guidance 9
        hint = r._hint(image, ref)[None].expand(2, -1, -1, -1)
        latents = r._noise([3, 4])
        r.scheduler.set_timesteps(OPTS["ddim_steps"])
        text = r.cond.expand(2, -1, -1)
        for t in r.scheduler.timesteps:
            x = r.scheduler.scale_model_input(latents, t)
            uncond, cond = r._eps(x, t, hint, text), r._eps(x, t, hint, text)
            latents = r.scheduler.step(uncond + 9.0 * (cond - uncond), t, latents).prev_sample
        slow = r.vae.decode(latents / r.vae.config.scaling_factor, return_dict=False)[0]
        slow = torch.nn.functional.interpolate(((slow + 1) / 2).clamp(0, 1), (30, 44),
                                               mode="bicubic", antialias=True).clamp(0, 1)
    assert torch.allclose(fast, slow, atol=1e-4)


def test_distinct_branches_run_batched_guidance(tmp_path):
    model = make_model(tmp_path / "m", "tiny", distinct_uncond=True)
    r = create("diffusion", {"model": str(model), **OPTS}, "cpu")
    assert not r.one_pass
    image, ref = pair()
    guided = r.relight(image, ref, [1])
    plain = create("diffusion", {"model": str(model), **OPTS, "guidance_scale": 1.0},
                   "cpu").relight(image, ref, [1])
    assert not torch.allclose(guided, plain, atol=1e-3)  # guidance changes the result
    both = r.relight(image, ref, [1, 2])
    assert torch.allclose(both[:1], guided, atol=1e-5)


def test_options_and_model_errors_are_clear(model, tmp_path):
    with pytest.raises(RelighterError, match="needs a model"):
        create("diffusion", {}, "cpu")
    with pytest.raises(RelighterError, match="no model directory"):
        create("diffusion", {"model": str(tmp_path / "none")}, "cpu")
    bare = make_model(tmp_path / "bare", "tiny")
    with pytest.raises(RelighterError, match="no vae_new_decoder"):
        create("diffusion", {"model": str(bare), "new_decoder": "true"}, "cpu")
    r = create("diffusion", {"model": str(model), **OPTS, "new_decoder": "true"}, "cpu")
    assert r.relight(*pair(), [1]).shape == (1, 3, 30, 44)
    with pytest.raises(RelighterError, match="rotation"):
        create("diffusion", {"model": str(model), "rotation": "none"}, "cpu")


def test_models_on_s3_are_downloaded_once_per_node(model, bucket, s3_client, tmp_path):
    upload_folder(s3_client, model, bucket, "models/tiny")
    cache = tmp_path / "cache"
    uri = f"s3://{bucket}/models/tiny"
    local = fetch_model(uri, str(cache))
    assert (local / ".complete").exists() and (local / "unet").is_dir()
    s3_client.delete_object(Bucket=bucket, Key="models/tiny/unet/config.json")
    assert fetch_model(uri, str(cache)) == local  # reused: S3 is not read again
    r = create("diffusion", {"model": uri, "cache_dir": str(cache), **OPTS}, "cpu")
    assert r.relight(*pair(), [1]).shape == (1, 3, 30, 44)


def test_run_with_the_diffusion_relighter_and_seed_parity_flags(model, tmp_path):
    result = cli("run", "--input", str(EXAMPLES / "images"), "--refs", str(EXAMPLES / "refs"),
                 "--output", str(tmp_path / "out"), "--img-pattern", "rocket*",
                 "--relighter", "diffusion", "-O", f"model={model}", "-O", "resolution=32",
                 "--ddim-steps", "2", "--new-decoder", "--iterations", "2", "--device", "cpu",
                 "--no-progress", check=True)
    assert "written 6, skipped 0" in result.stdout
    manifest = next((tmp_path / "out" / "_relit").glob("*/manifest.json"))
    options = json.loads(manifest.read_text())["relighter"]["options"]
    assert options["ddim_steps"] == 2 and options["new_decoder"] is True


def test_make_model_command_and_the_tiny_benchmark(tmp_path):
    result = cli("make-model", str(tmp_path / "m"), "--size", "tiny", check=True)
    assert "random weights" in result.stdout and (tmp_path / "m" / "unet").is_dir()
    bench = subprocess.run([sys.executable, str(ROOT / "benchmarks/relighter_throughput.py"),
                            "--tiny", "--out", str(tmp_path / "r.json")],
                           capture_output=True, text=True, timeout=600)
    assert bench.returncode == 0, bench.stderr[-3000:]
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["seed_loop_samples_per_s"] > 0 and data["relit_samples_per_s"] > 0
    assert data["relit_one_pass"] is True and data["speedup"] > 0
