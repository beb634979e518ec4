"""The diffusion relighter on a tiny random-weight model (CPU), and its loading code."""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import EXAMPLES, ROOT, cli, upload_folder

from relit_k8s.errors import EXIT_TEMPORARY, RelighterError, TransientError
from relit_k8s.modelkit import make_model
from relit_k8s.relighters import create
from relit_k8s.relighters.diffusion import AUTO_BATCH_CAP, batch_for_memory, fetch_model

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


def calls_of(module: torch.nn.Module) -> list[int]:
    """The batch sizes ``module`` is called with, from now on."""
    sizes: list[int] = []
    module.register_forward_pre_hook(lambda _m, args, kw: sizes.append(
        len(args[0] if args else kw["sample"])), with_kwargs=True)
    return sizes


def test_seeds_beyond_batch_size_run_in_several_batches_with_the_same_result(model):
    r = create("diffusion", {"model": str(model), **OPTS, "batch_size": 2}, "cpu")
    assert r.batch_size == 2
    sizes = calls_of(r.unet)
    image, ref = pair()
    out = r.relight(image, ref, [5, 6, 7, 8, 9])
    assert sizes == [2] * 4 + [2] * 4 + [1] * 4  # 4 DDIM steps per batch
    single = torch.cat([r.relight(image, ref, [s]) for s in (5, 6, 7, 8, 9)])
    assert torch.allclose(out, single, atol=1e-5)
    assert create("diffusion", {"model": str(model), **OPTS}, "cpu").batch_size == 8  # CPU


def test_eta_noise_stays_per_seed_across_batches_and_padding(tmp_path):
    model = make_model(tmp_path / "m", "tiny", distinct_uncond=True)  # two-branch guidance too
    r = create("diffusion", {"model": str(model), **OPTS, "eta": 0.5, "batch_size": 3}, "cpu")
    image, ref = pair()
    together = r.relight(image, ref, [11, 12, 13, 14, 15])
    single = torch.cat([r.relight(image, ref, [s]) for s in (11, 12, 13, 14, 15)])
    assert torch.allclose(together, single, atol=1e-5)
    r.static_shapes = True  # 3 + 2 seeds, padded to 3 + 3
    assert torch.allclose(r.relight(image, ref, [11, 12, 13, 14, 15]), together, atol=1e-5)
    plain = create("diffusion", {"model": str(model), **OPTS, "batch_size": 3}, "cpu")
    assert not torch.allclose(plain.relight(image, ref, [11]), together[:1], atol=1e-3)


def test_no_seeds_give_an_empty_batch(model):
    r = create("diffusion", {"model": str(model), **OPTS}, "cpu")
    assert r.relight(*pair(), []).shape == (0, 3, 30, 44)


def test_the_automatic_batch_size_from_measured_memory():
    gib = 2**30
    # 1 GiB fixed + 0.5 GiB per seed; 40 GiB free -> 85% = 34 GiB -> 66 fit -> the cap
    step4, step8 = 3 * gib, 5 * gib
    assert batch_for_memory(step4, step8, gib, 40 * gib) == AUTO_BATCH_CAP
    assert batch_for_memory(step4, step8, gib, 12 * gib) == 16  # 18 fit: a multiple of 8
    assert batch_for_memory(step4, step8, gib, 40 * gib, share=4) == 8  # 8.5 GiB: 15 fit
    assert batch_for_memory(step4, step8, gib, 4 * gib) == 4  # fewer than 8 fit: as many
    with pytest.raises(TransientError, match="not enough free GPU memory") as e:
        batch_for_memory(step4, step8, gib, 1.5 * gib)
    assert e.value.exit_code == EXIT_TEMPORARY  # the memory may be free on a retry
    with pytest.raises(TransientError):  # the decode does not fit, though a step would
        batch_for_memory(step4, step8, 20 * gib, 20 * gib)


def test_compile_without_a_compiler_is_a_clear_error_before_loading(model, monkeypatch,
                                                                    tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # no g++, c++ or clang++ to be found
    monkeypatch.delenv("CXX", raising=False)
    with pytest.raises(RelighterError, match="compile=true needs a C\\+\\+ compiler.*"
                       "apt-get install g\\+\\+ python3-dev"):
        create("diffusion", {"model": str(model), **OPTS, "compile": "true"}, "cpu")
    monkeypatch.setenv("CXX", shutil.which("g++", path="/usr/bin:/usr/local/bin") or "g++")
    assert create("diffusion", {"model": str(model), **OPTS, "compile": "true"},
                  "cpu").static_shapes  # a compiler named by $CXX is found


def test_static_shapes_pad_batches_to_multiples_of_8_without_changing_outputs(model):
    # compile=true sets static_shapes (torch.compile compiles at the first call, which takes
    # minutes on a CPU; the GPU benchmark runs it), so the padding is checked on eager modules.
    assert create("diffusion", {"model": str(model), **OPTS, "compile": "true"},
                  "cpu").static_shapes
    r = create("diffusion", {"model": str(model), **OPTS, "batch_size": 12}, "cpu")
    image, ref = pair()
    plain = r.relight(image, ref, list(range(1, 15)))
    r.static_shapes = True
    unet, decoder = calls_of(r.unet), calls_of(r.vae.decoder)
    padded = r.relight(image, ref, list(range(1, 15)))
    assert set(unet) == {8, 12} and len(unet) == 2 * OPTS["ddim_steps"]  # 14 = 12 + 2 -> 8
    assert set(decoder) == {8}  # decode chunks are padded to one shape
    assert padded.shape == plain.shape and torch.allclose(padded, plain, atol=1e-5)


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


def test_make_model_prints_a_command_that_runs_at_the_models_own_resolution(tmp_path):
    for what in ("images", "refs"):  # an examples folder of one image and one reference
        (tmp_path / "examples" / what).mkdir(parents=True)
    (tmp_path / "examples/images/rocket.jpg").symlink_to(EXAMPLES / "images/rocket.jpg")
    (tmp_path / "examples/refs/sunset.hdr").symlink_to(EXAMPLES / "refs/sunset.hdr")
    made = cli("make-model", "m", "--size", "tiny", cwd=tmp_path, check=True)
    assert "native resolution, 32 x 32 pixels" in " ".join(made.stdout.split())
    command = made.stdout.splitlines()[-1].strip()  # printed whole, on its own line
    assert command == ("relit-k8s run --input examples/images --refs examples/refs --output "
                       "out-m --relighter diffusion -O model=m --iterations 1")
    ran = cli(*shlex.split(command)[1:], "--no-progress", cwd=tmp_path, check=True)
    assert "written 1, skipped 0" in ran.stdout
    assert len(list((tmp_path / "out-m").glob("rocket.jpg_sunset.hdr/*_rocket.jpg"))) == 1
    assert create("diffusion", {"model": str(tmp_path / "m")}, "cpu").resolution == 32
    assert create("diffusion", {"model": str(tmp_path / "m"), "resolution": 48},
                  "cpu").resolution == 48


def test_the_batch_probes_measurements_are_kept_for_later_workers(tmp_path):
    """A GPU worker keeps its probe's memory peaks in the cache folder; later workers of the
    node read them (keyed by torch, the GPU and the model) and skip the probe."""
    from relit_k8s.relighters.loading import cached_json, probe_cache_path

    calls = []

    def measure() -> dict:
        calls.append(1)
        return {"step4": 3, "step8": 5, "decode": 1}

    path = probe_cache_path(str(tmp_path), "diffusion", torch.device("cpu"), {"res": 512})
    assert path.parent == tmp_path / "probe"
    assert cached_json(path, measure) == {"step4": 3, "step8": 5, "decode": 1}
    assert cached_json(path, measure) == {"step4": 3, "step8": 5, "decode": 1}
    assert len(calls) == 1 and [p.name for p in path.parent.iterdir()] == [path.name]
    path.write_text("{half")  # a torn or corrupt file is measured again
    assert cached_json(path, measure) == {"step4": 3, "step8": 5, "decode": 1}
    assert len(calls) == 2
    assert probe_cache_path(str(tmp_path), "diffusion", torch.device("cpu"), {"res": 256}) != path
    assert cached_json(None, measure) and len(calls) == 3  # None: nothing kept


def test_the_weights_cache_is_loaded_in_place_of_the_model_folder(model, tmp_path,
                                                                   monkeypatch):
    """In bf16 (a GPU's default) the first worker of a node keeps the UNet, ControlNet and VAE
    as served in the cache folder; later workers build the modules on the meta device and load
    that file instead of the folder's weights, and make the same images. A damaged file is
    read past and written anew; the new decoder is its own entry; fp32 and cache_weights=false
    keep none."""
    import diffusers

    options = {"model": str(model), **OPTS, "dtype": "bf16", "cache_dir": str(tmp_path / "c")}
    first = create("diffusion", options, "cpu")
    files = list((tmp_path / "c" / "diffusion").glob("*.safetensors"))
    assert first.weights_from == "model" and [f.name.split("-")[:2] for f in files] == \
        [["tiny", "bfloat16"]] and "write_cache" in first.load_timings
    with monkeypatch.context() as m:
        for cls in ("UNet2DConditionModel", "ControlNetModel", "AutoencoderKL"):
            m.setattr(getattr(diffusers, cls), "from_pretrained",
                      classmethod(lambda *a, **k: pytest.fail("read the model folder")))
        second = create("diffusion", options, "cpu")
    assert second.weights_from == "cache" and "write_cache" not in second.load_timings
    assert second.unet.dtype == torch.bfloat16 and not second.vae.training
    image, ref = pair()
    assert torch.equal(first.relight(image, ref, [3, 4]), second.relight(image, ref, [3, 4]))
    files[0].write_bytes(b"\x00" * 64)  # damaged (a disk full while another worker wrote it)
    third = create("diffusion", options, "cpu")
    assert third.weights_from == "model" and files[0].stat().st_size > 64
    assert create("diffusion", options, "cpu").weights_from == "cache"
    decoder = create("diffusion", options | {"new_decoder": True}, "cpu")
    assert decoder.weights_from == "model"  # another VAE: another file
    assert len(list((tmp_path / "c" / "diffusion").glob("*.safetensors"))) == 2
    for other in ({"dtype": "fp32"}, {"cache_weights": False}):
        cache = tmp_path / f"cache-{next(iter(other))}"
        r = create("diffusion", options | other | {"cache_dir": str(cache)}, "cpu")
        assert r.weights_from == "model" and not (cache / "diffusion").exists()


def test_make_model_with_a_target_it_cannot_write_says_so_in_one_line(tmp_path):
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    for target, said in ((a_file, "is a file"), ("/proc/relit-nope", "cannot make the folder"),
                         (a_file / "below", "cannot make the folder")):
        for kind in ("diffusion", "luminet"):
            result = cli("make-model", str(target), "--kind", kind)
            assert result.returncode == 78, result.stderr
            assert said in result.stderr and "Traceback" not in result.stderr
            assert len(result.stderr.strip().splitlines()) <= 2, result.stderr


def test_make_model_command_and_the_tiny_benchmark(tmp_path):
    result = cli("make-model", str(tmp_path / "m"), "--size", "tiny", check=True)
    assert "random weights" in result.stdout and (tmp_path / "m" / "unet").is_dir()
    bench = subprocess.run([sys.executable, str(ROOT / "benchmarks/relighter_throughput.py"),
                            "--tiny", "--out", str(tmp_path / "r.json")],
                           capture_output=True, text=True, timeout=600)
    assert bench.returncode == 0, bench.stderr[-3000:]
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["seed_loop_samples_per_s"] > 0 and data["relit_samples_per_s"] > 0
    assert data["relit_one_pass"] is True and data["relit_speedup"] > 0
    # the seed's loop as the seed runs it: one model load for all its samples (2 pairs x 2)
    assert data["seed_loop_model_loads"] == 1, data["seed_loop_model_loads"]
    assert data["seed_loop_pairs"] * data["seed_loop_iterations"] == 4
    assert data["seed_loop_load_seconds"] > 0 and data["relit_whole_run_speedup"] > 0


def test_the_tiny_worker_pipeline_benchmark(tmp_path):
    bench = subprocess.run([sys.executable, str(ROOT / "benchmarks/worker_pipeline.py"),
                            "--tiny", "--cold-start", "--out", str(tmp_path / "p.json")],
                           capture_output=True, text=True, timeout=600)
    assert bench.returncode == 0, bench.stderr[-3000:]
    data = json.loads((tmp_path / "p.json").read_text())
    assert data["relighter_only_samples_per_s"] > 0
    for where in ("local", "s3"):  # the S3 run goes through the suite's SeaweedFS server
        assert data[f"{where}_samples_per_s"] > 0 and data[f"{where}_ratio"] > 0
        assert data[f"{where}_timings"]["write"] > 0
    cold = data["cold_start"]
    assert cold["samples"] == data["iterations"]
    assert 0 < cold["first_output_seconds"] < cold["worker_seconds"]  # seen before it ended
    assert {"imports", "read_weights", "to_device", "batch_probe"} <= set(
        cold["model_load_phases"])


def test_the_output_cpu_and_sh_pipeline_benchmarks(tmp_path):
    """The CPU-side benchmarks' smoke tests: numbers are not checked, their presence is."""
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks/output_cpu.py"), "--quick",
                          "--out", str(tmp_path / "o.json")], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    data = json.loads((tmp_path / "o.json").read_text())
    per = data["cpu_seconds_per_output"]
    assert {"decode_jpeg", "encode_jpeg", "encode_png1", "encode_png6", "write_jpeg"} <= set(per)
    assert data["output_bytes"]["png0"] > data["output_bytes"]["png6"]  # level 0 stores
    assert data["gpu_jpeg"] is None  # no GPU here
    bench = subprocess.run([sys.executable, str(ROOT / "benchmarks/worker_pipeline.py"),
                            "--tiny", "--relighter", "sh", "--format", "png", "--no-s3",
                            "--out", str(tmp_path / "p.json")],
                           capture_output=True, text=True, timeout=600)
    assert bench.returncode == 0, bench.stderr[-3000:]
    data = json.loads((tmp_path / "p.json").read_text())
    assert data["relighter"] == "sh" and data["input"].startswith("PNG")
    assert data["local_samples_per_s"] > 0 and data["local_timings"]["cpu_cores"] > 0


def test_attention_kernel_choice_and_auto_restores_pytorchs_own():
    from relit_k8s.relighters.diffusion import use_backend

    cuda = torch.backends.cuda
    before = (cuda.flash_sdp_enabled(), cuda.cudnn_sdp_enabled(),
              cuda.mem_efficient_sdp_enabled(), cuda.math_sdp_enabled())
    try:
        use_backend("cudnn")
        assert (cuda.flash_sdp_enabled(), cuda.cudnn_sdp_enabled(),
                cuda.mem_efficient_sdp_enabled(), cuda.math_sdp_enabled()) == (
                    False, True, False, True)
    finally:
        use_backend("auto")
    assert (cuda.flash_sdp_enabled(), cuda.cudnn_sdp_enabled(),
            cuda.mem_efficient_sdp_enabled(), cuda.math_sdp_enabled()) == before


def test_a_stop_ends_relighting_between_two_denoising_steps(model):
    """The worker's stop event is checked at every step: a stop does not wait for the batch."""
    import threading

    from relit_k8s.errors import Stopped

    r = create("diffusion", {"model": str(model), "ddim_steps": 900, "resolution": 32}, "cpu")
    r.stop_event = threading.Event()
    steps = []
    real_eps = r._eps

    def counting_eps(*args):
        steps.append(1)
        if len(steps) == 3:
            r.stop_event.set()  # as SIGTERM's handler does, from the middle of the batch
        return real_eps(*args)

    r._eps = counting_eps
    with pytest.raises(Stopped):
        r.relight(*pair(), [1, 2])
    assert len(steps) == 3  # the step under way finished; no further step began
    with pytest.raises(RelighterError, match="ddim_steps=1000, but the model's scheduler has "
                       "1000 timesteps"):
        create("diffusion", {"model": str(model), "ddim_steps": 1000}, "cpu")
    r2 = create("diffusion", {"model": str(model), **OPTS}, "cpu")
    r2.stop_event = threading.Event()
    assert r2.relight(*pair(), [1]).shape == (1, 3, 30, 44)  # an unset event changes nothing
