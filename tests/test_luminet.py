"""The ``luminet`` relighter against the golden fixture made by the original LumiNet code.

``../shared/fixtures/luminet/`` (read in place; see its FACTS.md) holds a tiny LumiNet
checkpoint with the original key names, its YAML, inputs and what the original code computed
from them: the denoiser at three steps, intermediate tensors, 5-step DDIM latents, decodes
with both decoders, and the final 8-bit images after the original post-processing. Tolerances
are FACTS.md's: 1e-4 (denoiser), 5e-4 (latents), 1e-3 (decoded), 1 (8 bits).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import cli, require_fixture, shared_fixture
from PIL import Image

from relit_k8s import images
from relit_k8s.errors import RelighterError
from relit_k8s.relighters import create
from relit_k8s.relighters.luminet.checkpoint import load, read_state_dict, split_state_dict
from relit_k8s.relighters.luminet.config import LumiNetConfig, VAEConfig, ddim_timesteps
from relit_k8s.relighters.luminet.model import LumiNet
from relit_k8s.relighters.luminet.relighter import LuminetOptions
from relit_k8s.relighters.luminet.sampler import ddim_sample
from relit_k8s.relighters.luminet.text import empty_prompt_context, empty_prompt_tokens
from relit_k8s.relighters.luminet.vae import BypassAutoencoderKL

#: ``../shared/fixtures/luminet`` next to the repository, read in place (never copied in).
FIXTURE = shared_fixture("luminet", "RELIT_LUMINET_FIXTURE")
SEEDS = (20250915, 42)


@pytest.fixture(scope="module", autouse=True)
def _fixture_present():
    """Module-scoped, so that it runs before the module-scoped fixtures that read the folder
    (autouse fixtures come first within their scope): without the fixture every test of the
    module skips (fails under ``CI``), and none errors."""
    require_fixture(FIXTURE)


def tensors(name: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(FIXTURE / name))


@pytest.fixture(scope="module")
def golden():
    return tensors("inputs.safetensors"), tensors("expected.safetensors")


@pytest.fixture(scope="module")
def model():
    cfg = LumiNetConfig.from_yaml(yaml.safe_load((FIXTURE / "tiny.yaml").read_text()))
    m = LumiNet(cfg).eval()
    load(m, FIXTURE / "luminet_tiny.ckpt")
    return m


def assert_same_8_bit_images(a: torch.Tensor, b: torch.Tensor) -> None:
    """Equal outputs of a relighter that truncates to 8 bits as the original does: computed a
    hair differently (another batch), a value on a level's boundary may fall one level off
    (measured: 0.004% of the values of a batch against one by one); nothing more."""
    diff = (a - b).abs()
    assert diff.max().item() <= 1 / 255 + 1e-6, diff.max()
    assert (diff > 0).float().mean().item() < 1e-3, (diff > 0).float().mean()


def close(got: torch.Tensor, want: torch.Tensor, tol: float) -> None:
    assert got.shape == want.shape, (got.shape, want.shape)
    err = (got.float() - want.float()).abs().max().item()
    assert err <= tol, f"max difference {err:.3g} > {tol}"


@torch.no_grad()
def test_the_denoiser_equals_the_original_at_every_step_and_inside(model, golden):
    inp, exp = golden
    hint, ctx = inp["control"], inp["context_cond"]
    for seed in SEEDS:
        for t in (999, 500, 1):
            out = model.apply_model(inp[f"noise_seed{seed}"], torch.tensor([t]), hint, ctx)
            close(out, exp[f"apply_model/seed{seed}/t{t}"], 1e-4)
    d = "debug/seed20250915_t500/"
    feature_map, full = model.lighting(hint, ctx)
    close(feature_map[:, :8], exp[d + "prior_hint_intrinsic"], 1e-5)
    close(feature_map[:, 8:, 0, 0], exp[d + "prior_hint_light_code"], 1e-5)
    close(full[:, 77:], exp[d + "light_tokens"], 1e-5)
    close(full, exp[d + "unet_context"], 1e-5)
    close(model.control_model.input_hint_block(feature_map), exp[d + "guided_hint"], 1e-5)
    x = inp["noise_seed20250915"]
    control = model.control_model(x, feature_map, torch.tensor([500]), full)
    assert len(control) == 13
    for i, c in enumerate(control):
        close(c, exp[d + f"control_out{i:02d}"], 1e-4)
    close(model.model.diffusion_model(x, torch.tensor([500]), ctx),
          exp[d + "unet_only_no_control"], 1e-4)


@torch.no_grad()
def test_ddim_equals_the_original_sampler_step_by_step(model, golden):
    inp, exp = golden
    hint, ctx = inp["control"], inp["context_cond"]
    assert ddim_timesteps(5) == [1, 201, 401, 601, 801] and ddim_timesteps(50)[-1] == 981
    prepared = model.lighting(hint, ctx)
    for seed in SEEDS:
        steps: list = []
        final = ddim_sample(lambda x, t: model.apply_model(x, t, None, None, prepared),
                            inp[f"noise_seed{seed}"], model.alphas_cumprod, 5,
                            on_step=lambda t, x, x0, steps=steps: steps.append((t, x, x0)))
        assert [t for t, _, _ in steps] == [801, 601, 401, 201, 1]
        close(final, exp[f"ddim/seed{seed}/final_latent"], 5e-4)
        close(torch.stack([x for _, x, _ in steps]), exp[f"ddim/seed{seed}/x_prev_per_step"], 5e-4)
        close(torch.stack([x0 for _, _, x0 in steps]), exp[f"ddim/seed{seed}/pred_x0_per_step"],
              5e-4)
        close(model.decode(exp[f"ddim/seed{seed}/final_latent"]),
              exp[f"decode_first_stage/seed{seed}"], 1e-3)
    # guidance with an unconditional context of its own (both branches in one batch)
    fm_c, full_c = prepared
    fm_u, full_u = model.lighting(hint, inp["context_uncond_alt"])
    both = (torch.cat([fm_u, fm_c]), torch.cat([full_u, full_c]))

    def guided(x, t):
        u, c = model.apply_model(torch.cat([x, x]), torch.cat([t, t]), None, None, both).chunk(2)
        return u + 9.0 * (c - u)

    close(ddim_sample(guided, inp["noise_seed20250915"], model.alphas_cumprod, 5),
          exp["ddim_cfg_alt_uncond/seed20250915/final_latent"], 5e-4)


@torch.no_grad()
def test_the_bypass_decoder_equals_the_original(model, golden):
    inp, exp = golden
    bypass = BypassAutoencoderKL(model.cfg.bypass_vae).eval()
    bypass.load_state_dict(read_state_dict(FIXTURE / "new_decoder_tiny.ckpt"), strict=True)
    features = bypass.photo_features(inp["control"][:, :3] * 2 - 1)
    shapes = exp["debug/new_decoder/ae_hs_shapes"].tolist()
    assert [list(f.shape) for f in features] == shapes
    close(features[-1], exp["debug/new_decoder/ae_hs_last"], 1e-4)
    for seed in SEEDS:
        z = exp[f"ddim/seed{seed}/final_latent"] / model.cfg.scale_factor
        close(bypass.decode_with(z, features), exp[f"decode_new_first_stage/seed{seed}"], 1e-3)


def tiny_options(tmp_path, **kw) -> dict:
    from safetensors.torch import save_file

    context = tmp_path / "context.safetensors"
    if not context.exists():
        save_file({"context": tensors("inputs.safetensors")["context_cond"]}, str(context))
    return {"checkpoint": str(FIXTURE / "luminet_tiny.ckpt"),
            "config": str(FIXTURE / "tiny.yaml"), "context": str(context),
            "resolution": 128, "ddim_steps": 5, **kw}


def raw_pair(relighter) -> tuple[torch.Tensor, torch.Tensor]:
    """The fixture's raw photo and reference, as the worker hands them to ``relighter``."""
    photo = images.decode((FIXTURE / "raw_input.png").read_bytes(), "raw_input.png")
    ref = images.decode((FIXTURE / "raw_reference.hdr").read_bytes(), "raw_reference.hdr")
    as_tensor = lambda a: torch.from_numpy(np.ascontiguousarray(a)).permute(2, 0, 1)  # noqa: E731
    return (as_tensor(images.as_display(photo)).float(),
            as_tensor(relighter.reference_pixels(ref)).float())


def test_the_relighter_makes_the_originals_final_images(tmp_path, golden):
    """From the raw files, through the original's loading, sampling, decoding and
    post-processing, to 8 bits: within one level of the original's, with both decoders."""
    inp, exp = golden
    for decoder, options in (("decode_first_stage", tiny_options(tmp_path)),
                             ("decode_new_first_stage", tiny_options(
                                 tmp_path, new_decoder=str(FIXTURE / "new_decoder_tiny.ckpt")))):
        r = create("luminet", options, "cpu")
        photo, ref = raw_pair(r)
        ldr = images.decode((FIXTURE / "raw_input.png").read_bytes(), "ref.png")
        assert np.array_equal(r.reference_pixels(ldr), ldr.pixels)  # LDR: sRGB / 255, as is
        close(r.hint(photo, ref), inp["control"], 1e-5)  # the original's loader, resized
        out = r.relight(photo, ref, list(SEEDS))
        assert out.shape == (2, 3, 120, 160)
        for i, seed in enumerate(SEEDS):
            # as the worker writes it: rounded to 8 bits
            got = (out[i].permute(1, 2, 0) * 255 + 0.5).floor().to(torch.int16)
            want = exp[f"final_uint8/{decoder}/seed{seed}"].to(torch.int16)
            diff = (got - want).abs()
            assert diff.max().item() <= 1, (decoder, seed)
            # truncated, then resized, as the original: all but a few values equal (a decoded
            # value within 1e-3 of the original's falls on the other side of a level)
            assert (diff == 0).float().mean().item() >= 0.999, (decoder, seed)
    one_by_one = create("luminet", tiny_options(tmp_path, batch_size=1), "cpu")
    together = create("luminet", tiny_options(tmp_path), "cpu")
    a, b = one_by_one.relight(photo, ref, list(SEEDS)), together.relight(photo, ref, list(SEEDS))
    assert_same_8_bit_images(a, b)  # a batch is its seeds one by one


@torch.no_grad()
def test_guidance_with_an_unconditional_context_equals_the_original(tmp_path, golden):
    """``-O uncond_context=FILE`` with ``guidance_scale``: both branches in one batch, the
    original's DDIM with classifier-free guidance (the fixture's other unconditional
    context, scale 9, 5 steps); a guidance scale without it is refused, as it would do
    nothing."""
    from safetensors.torch import save_file

    inp, exp = golden
    uncond = tmp_path / "uncond.safetensors"
    save_file({"context": inp["context_uncond_alt"]}, str(uncond))
    r = create("luminet", tiny_options(tmp_path, uncond_context=str(uncond),
                                       guidance_scale=9.0), "cpu")
    hint, ctx = inp["control"], inp["context_cond"]
    prepared = r.model.lighting(hint, r.context)
    unconditional = r.model.lighting(hint, r.uncond_context)
    close(r.context, ctx, 1e-6)
    got = r.sample([20250915], prepared, unconditional)
    # the relighter draws its noise from each seed's own generator, as the fixture's noise
    close(torch.randn(r.cfg.unet.in_channels, r.cfg.prior.hint_spatial,
                      r.cfg.prior.hint_spatial,
                      generator=torch.Generator().manual_seed(20250915))[None],
          inp["noise_seed20250915"], 1e-6)
    close(got, exp["ddim_cfg_alt_uncond/seed20250915/final_latent"], 5e-4)
    assert not torch.allclose(got, r.sample([20250915], prepared), atol=1e-3)
    with pytest.raises(RelighterError, match="guidance_scale has no effect without "
                                             "uncond_context"):
        create("luminet", tiny_options(tmp_path, guidance_scale=3.0), "cpu")


def test_a_flat_output_stays_flat_and_every_value_is_an_8_bit_level():
    """The original truncates to 8 bits before it resizes: white stays 255 (resizing first and
    rounding half a level lower turned 44.6% of a white image's pixels into 254), grey stays
    its level, and the worker's rounding keeps each value."""
    from relit_k8s.relighters.luminet.engine import LoadedLuminet

    for x, level in ((1.0, 255), (0.0, 127), (-1.0, 0)):
        out = LoadedLuminet.finish(torch.full((3, 64, 64), x), 120, 160)
        assert out.shape == (3, 120, 160)
        assert ((out * 255 + 0.5).floor() == level).all(), (x, level)
    ramp = torch.linspace(-1, 1, 64).expand(3, 64, 64)
    out = LoadedLuminet.finish(ramp, 30, 40) * 255
    assert (out - out.round()).abs().max() < 1e-3  # each value is a level: rounding keeps it


def test_bf16_weights_as_on_a_gpu_stay_close_to_fp32(tmp_path):
    """A GPU runs the model in bf16 (dtype auto): the same graph with bf16 weights, here on
    the CPU, makes images close to fp32's (group norms are computed in float32, weights too)."""
    fp32 = create("luminet", tiny_options(tmp_path), "cpu")
    bf16 = create("luminet", tiny_options(tmp_path, dtype="bf16"), "cpu")
    assert bf16.dtype == torch.bfloat16
    photo, ref = raw_pair(fp32)
    diff = (fp32.relight(photo, ref, [SEEDS[0]]) - bf16.relight(photo, ref, [SEEDS[0]])).abs()
    assert diff.mean().item() < 0.01 and diff.max().item() < 0.15, (diff.mean(), diff.max())


def _luminet_with_a_text_tower(folder: Path) -> dict:
    """A random tiny LumiNet whose checkpoint has a text tower (context width 64, one layer),
    so that the relighter computes the empty-prompt context from it as from the official
    file; the options that run it."""
    from dataclasses import replace

    from relit_k8s.relighters.luminet.config import TINY
    from relit_k8s.relighters.luminet.make import random_text_tower

    cfg = replace(TINY, unet=replace(TINY.unet, context_dim=64),
                  control=replace(TINY.control, context_dim=64),
                  prior=replace(TINY.prior, token_dim=64))
    folder.mkdir(parents=True)
    torch.manual_seed(0)
    state = {k: v for k, v in LumiNet(cfg).state_dict().items() if k != "alphas_cumprod"}
    state |= random_text_tower(49408, 77, 64, 1, torch.Generator().manual_seed(0))
    torch.save({"state_dict": state}, folder / "LumiNet.ckpt")
    (folder / "config.yaml").write_text(yaml.safe_dump(cfg.to_yaml(), sort_keys=False))
    return {"checkpoint": str(folder / "LumiNet.ckpt"), "config": str(folder / "config.yaml"),
            "resolution": 128, "ddim_steps": 2}


def test_the_weights_cache_is_loaded_in_place_of_the_checkpoint(tmp_path, monkeypatch):
    """In bf16 (a GPU's default) the first worker of a node keeps the weights as served and
    the empty-prompt context in the cache folder; later workers load those instead of reading
    the checkpoint and running its text encoder, and make the same images. A damaged cache
    file is read past and written anew; fp32 keeps no copy (it would be the checkpoint's
    size); cache_weights=false keeps none."""
    from relit_k8s.relighters.luminet import engine as module

    options = _luminet_with_a_text_tower(tmp_path / "model") | {
        "dtype": "bf16", "cache_dir": str(tmp_path / "cache")}
    first = create("luminet", options, "cpu")
    files = list((tmp_path / "cache" / "luminet").glob("*.safetensors"))
    assert first.weights_from == "checkpoint" and [f.name.split("-")[:2] for f in files] == \
        [["LumiNet", "bfloat16"]] and "write_cache" in first.load_timings
    with monkeypatch.context() as m:
        m.setattr(module, "load", lambda *a, **k: pytest.fail("read the checkpoint"))
        m.setattr(module, "empty_prompt_context", lambda *a: pytest.fail("ran the text tower"))
        m.setattr(module, "_CONTEXTS", {})
        second = create("luminet", options, "cpu")
    assert second.weights_from == "cache" and "write_cache" not in second.load_timings
    assert torch.equal(second.context, first.context)
    photo, ref = raw_pair(first)
    assert torch.equal(first.relight(photo, ref, [SEEDS[0]]),
                       second.relight(photo, ref, [SEEDS[0]]))
    files[0].write_bytes(b"\x00" * 64)  # damaged (a disk full while another node wrote it)
    third = create("luminet", options, "cpu")
    assert third.weights_from == "checkpoint" and files[0].stat().st_size > 64
    assert create("luminet", options, "cpu").weights_from == "cache"
    for other in ({"dtype": "fp32"}, {"cache_weights": False}):
        cache = tmp_path / f"cache-{len(other)}-{next(iter(other))}"
        r = create("luminet", options | other | {"cache_dir": str(cache)}, "cpu")
        assert r.weights_from == "checkpoint" and not (cache / "luminet").exists()


def test_compiled_batches_are_padded_to_eight_seeds_and_the_padding_dropped(tmp_path):
    """compile=true keeps shapes static: a batch of 3 seeds runs as 8 (the last repeated),
    and the 3 results equal those of an unpadded batch."""
    r = create("luminet", tiny_options(tmp_path, ddim_steps=2), "cpu")
    photo, ref = raw_pair(r)
    plain = r.relight(photo, ref, [1, 2, 3])
    sampled = []
    sample = r.sample
    r.sample = lambda seeds, *rest: sampled.append(list(seeds)) or sample(seeds, *rest)
    r.static_shapes = True  # what compile=true sets, without compiling here
    padded = r.relight(photo, ref, [1, 2, 3])
    assert sampled == [[1, 2, 3, 3, 3, 3, 3, 3]]
    assert padded.shape == plain.shape
    assert_same_8_bit_images(padded, plain)


@pytest.mark.parametrize("steps", [3, 9, 27, 37, 101, 111, 251, 333, 501, 999])
def test_step_counts_past_the_originals_schedule_are_refused(tmp_path, steps):
    """The original's spacing reaches step 1000 (an IndexError there): a clear error instead."""
    with pytest.raises(RelighterError, match="past its 1000-step schedule") as e:
        create("luminet", tiny_options(tmp_path, ddim_steps=steps), "cpu")
    assert e.value.exit_code == 78
    for fine in (1000 // (1000 // steps) - 1, 50, 100, 334):  # one fewer step, common counts
        if fine >= 1 and ddim_timesteps(fine)[-1] < 1000:
            LuminetOptions(checkpoint="LumiNet.ckpt", ddim_steps=fine)
    LuminetOptions(checkpoint="LumiNet.ckpt", ddim_steps=50)


def test_the_full_size_model_accepts_exactly_the_official_checkpoints_keys():
    """Built on the meta device (no memory), the full-size model takes every key of the
    official LumiNet.ckpt (full_size_keys.json, made from the original code) and the new
    decoder every key of new_decoder.ckpt, shapes included."""
    spec = json.loads((FIXTURE / "full_size_keys.json").read_text())
    with torch.device("meta"):
        model = LumiNet(LumiNetConfig())
        state = {e["key"]: torch.empty(e["shape"]) for e in spec["entries"]}
        loaded, text = split_state_dict(state, model)
        assert len(state) == 2310 and len(text) == 294
        bypass = BypassAutoencoderKL(VAEConfig())
    assert model.cfg.image_size == 512 and model.cfg.hint_channels == 144
    nd = {e["key"]: tuple(e["shape"]) for e in spec["new_decoder_ckpt_state_dict"]["entries"]}
    assert {k: tuple(v.shape) for k, v in bypass.state_dict().items()} == nd
    counted = sum(v.numel() for k, v in loaded.items()
                  if k.startswith("model.diffusion_model."))
    assert counted == spec["unique_parameter_count_by_submodule"]["model"]


def test_a_checkpoint_that_does_not_fit_is_a_configuration_error(tmp_path, model):
    state = read_state_dict(FIXTURE / "luminet_tiny.ckpt")
    broken = dict(state)
    del broken["model.diffusion_model.out.2.weight"]
    broken["model.diffusion_model.extra.weight"] = torch.zeros(1)
    broken["control_model.zero_convs.0.0.bias"] = torch.zeros(7)
    with pytest.raises(RelighterError) as e:
        split_state_dict(broken, model)
    text = str(e.value)
    assert "1 missing: model.diffusion_model.out.2.weight" in text
    assert "1 unexpected: model.diffusion_model.extra.weight" in text
    assert "control_model.zero_convs.0.0.bias (7,) (expected (32,))" in text
    truncated = tmp_path / "LumiNet.ckpt"
    truncated.write_bytes((FIXTURE / "luminet_tiny.ckpt").read_bytes()[:100_000])
    with pytest.raises(RelighterError, match="cannot be read"):
        read_state_dict(truncated)
    result = cli("run", "--input", str(FIXTURE), "--refs", str(FIXTURE), "--output",
                 str(tmp_path / "out"), "--img-pattern", "raw_input.png", "--ref-pattern",
                 "raw_reference.hdr", "--relighter", "luminet", "-O",
                 f"checkpoint={truncated}", "--iterations", "1", "--device", "cpu",
                 "--no-progress")
    assert result.returncode == 78, result.stderr
    missing = cli("run", "--input", str(FIXTURE), "--refs", str(FIXTURE), "--output",
                  str(tmp_path / "out2"), "--relighter", "luminet", "--dry-run")
    assert missing.returncode == 78 and "-O checkpoint=" in missing.stderr


def test_the_empty_prompt_context_follows_openclip_text_tower():
    """The text transformer (pre-norm blocks, causal mask, the last block skipped, then the
    final norm) checked against PyTorch's own encoder layer holding the same weights."""
    torch.manual_seed(0)
    width, layers, n = 128, 3, 77
    blocks = [torch.nn.TransformerEncoderLayer(width, width // 64, 4 * width, dropout=0.0,
                                               activation="gelu", batch_first=True,
                                               norm_first=True).eval() for _ in range(layers)]
    for block in blocks:
        for p in block.parameters():
            p.data.normal_(0, 0.1)
    embedding, positions = torch.randn(49408, width) * 0.1, torch.randn(n, width) * 0.1
    ln = torch.nn.LayerNorm(width)
    text = {"cond_stage_model.model.token_embedding.weight": embedding,
            "cond_stage_model.model.positional_embedding": positions,
            "cond_stage_model.model.ln_final.weight": ln.weight.data,
            "cond_stage_model.model.ln_final.bias": ln.bias.data}
    for i, b in enumerate(blocks):
        p = f"cond_stage_model.model.transformer.resblocks.{i}."
        text |= {p + "ln_1.weight": b.norm1.weight, p + "ln_1.bias": b.norm1.bias,
                 p + "attn.in_proj_weight": b.self_attn.in_proj_weight,
                 p + "attn.in_proj_bias": b.self_attn.in_proj_bias,
                 p + "attn.out_proj.weight": b.self_attn.out_proj.weight,
                 p + "attn.out_proj.bias": b.self_attn.out_proj.bias,
                 p + "ln_2.weight": b.norm2.weight, p + "ln_2.bias": b.norm2.bias,
                 p + "mlp.c_fc.weight": b.linear1.weight, p + "mlp.c_fc.bias": b.linear1.bias,
                 p + "mlp.c_proj.weight": b.linear2.weight, p + "mlp.c_proj.bias": b.linear2.bias}
    got = empty_prompt_context({k: v.detach() for k, v in text.items()})
    with torch.no_grad():
        x = embedding[empty_prompt_tokens()] + positions
        mask = torch.nn.Transformer.generate_square_subsequent_mask(n)
        for b in blocks[:-1]:  # the penultimate layer's output
            x = b(x, src_mask=mask, is_causal=True)
        want = ln(x)
    assert empty_prompt_tokens()[0, :3].tolist() == [49406, 49407, 0]
    close(got, want, 1e-5)
    with pytest.raises(RelighterError, match="-O context="):
        empty_prompt_context({})


def test_luminet_runs_from_the_command_line(tmp_path):
    opts = tiny_options(tmp_path)
    args = ["run", "--input", str(FIXTURE), "--refs", str(FIXTURE), "--output",
            str(tmp_path / "out"), "--img-pattern", "raw_input.png", "--ref-pattern",
            "raw_reference.hdr", "--relighter", "luminet", "--iterations", "2",
            "--device", "cpu", "--no-progress"]
    for key, value in opts.items():
        args += ["-O", f"{key}={value}"]
    result = cli(*args, check=True)
    assert "written 2, skipped 0" in result.stdout
    outputs = list((tmp_path / "out").glob("raw_input.png_raw_reference.hdr/*_raw_input.png"))
    assert len(outputs) == 2
    assert all(Image.open(p).size == (160, 120) for p in outputs)


def test_the_seeds_new_decoder_flag_takes_the_new_decoder_beside_the_checkpoint(tmp_path):
    """``--new-decoder``, the seed's flag, with the official files in one folder: the bypass
    decoder beside the checkpoint, the same outputs as naming it with ``-O``; without the file,
    exit 78 naming where it looked and the ``-O`` form."""
    import shutil

    folder = tmp_path / "official"
    folder.mkdir()
    shutil.copy(FIXTURE / "luminet_tiny.ckpt", folder / "LumiNet.ckpt")
    opts = {**tiny_options(tmp_path, ddim_steps=2), "checkpoint": str(folder / "LumiNet.ckpt")}
    base = ["run", "--input", str(FIXTURE), "--refs", str(FIXTURE), "--img-pattern",
            "raw_input.png", "--ref-pattern", "raw_reference.hdr", "--relighter", "luminet",
            "--iterations", "1", "--device", "cpu", "--no-progress"]
    for key, value in opts.items():
        base += ["-O", f"{key}={value}"]
    missing = cli(*base, "--output", str(tmp_path / "none"), "--new-decoder")
    assert missing.returncode == 78
    said = " ".join(missing.stderr.split())
    assert f"no new decoder file at {folder / 'new_decoder.ckpt'}" in said
    assert "-O new_decoder=PATH" in said and not (tmp_path / "none").exists()
    shutil.copy(FIXTURE / "new_decoder_tiny.ckpt", folder / "new_decoder.ckpt")
    cli(*base, "--output", str(tmp_path / "flag"), "--new-decoder", check=True)
    cli(*base, "--output", str(tmp_path / "named"), "-O",
        f"new_decoder={folder / 'new_decoder.ckpt'}", check=True)
    cli(*base, "--output", str(tmp_path / "plain"), check=True)
    out = {name: next((tmp_path / name).glob("raw_input.png_raw_reference.hdr/*.png"))
           for name in ("flag", "named", "plain")}
    assert out["flag"].read_bytes() == out["named"].read_bytes()
    assert out["flag"].read_bytes() != out["plain"].read_bytes()  # the bypass decoder was used


def test_a_run_without_the_luminet_extra_says_what_to_install_and_writes_nothing(tmp_path):
    """Without safetensors (the ``luminet`` extra), ``run`` stops before it plans: exit 78,
    the install command, no output folder."""
    import subprocess
    import sys

    opts = tiny_options(tmp_path)
    args = ["run", "--input", str(FIXTURE), "--refs", str(FIXTURE), "--output",
            str(tmp_path / "out"), "--relighter", "luminet", "--no-progress"]
    for key, value in opts.items():
        args += ["-O", f"{key}={value}"]
    code = ("import sys; sys.modules['safetensors'] = None; "
            "sys.argv = ['relit-k8s', *sys.argv[1:]]; from relit_k8s.cli import main; main()")
    done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 78, done.stderr
    assert "pip install 'relit-k8s[luminet]'" in " ".join(done.stderr.split())
    assert not (tmp_path / "out").exists()


# --- random models in the official format (make-model --kind luminet) ----------------------------
def test_the_configuration_round_trips_through_the_original_yaml_form():
    from relit_k8s.relighters.luminet.config import TINY

    for cfg in (LumiNetConfig(), TINY):
        assert LumiNetConfig.from_yaml(yaml.safe_load(yaml.safe_dump(cfg.to_yaml()))) == cfg
    # the tiny size of make-model is the golden fixture's configuration
    assert LumiNetConfig.from_yaml(yaml.safe_load((FIXTURE / "tiny.yaml").read_text())) == TINY


def test_the_random_text_tower_has_the_official_keys_and_gives_a_context():
    """make-model --size full writes a random OpenCLIP text tower: every tensor the empty-prompt
    context reads, under the official checkpoint's names and shapes (full_size_keys.json)."""
    from relit_k8s.relighters.luminet.make import TEXT_TOWER, random_text_tower

    spec = json.loads((FIXTURE / "full_size_keys.json").read_text())
    official = {e["key"]: tuple(e["shape"]) for e in spec["entries"]}
    with torch.device("meta"):
        tower = random_text_tower(*TEXT_TOWER, generator=None)  # type: ignore[arg-type]
    for key, value in tower.items():
        assert official.get(key) == tuple(value.shape), key
    small = random_text_tower(49408, 77, 128, 3, torch.Generator().manual_seed(0))
    context = empty_prompt_context(small)
    assert context.shape == (1, 77, 128) and torch.isfinite(context).all()


def test_make_model_writes_a_random_luminet_that_runs(tmp_path):
    from relit_k8s.relighters.luminet.config import TINY

    made = cli("make-model", str(tmp_path / "model"), "--kind", "luminet", check=True)
    assert "relit-k8s run" in made.stdout and "--relighter luminet" in made.stdout
    folder = tmp_path / "model"
    assert LumiNetConfig.from_yaml(yaml.safe_load((folder / "config.yaml").read_text())) == TINY
    state = read_state_dict(folder / "LumiNet.ckpt")
    split_state_dict(state, LumiNet(TINY))  # strict: every key and shape of the model
    args = ["run", "--input", str(FIXTURE), "--refs", str(FIXTURE), "--img-pattern",
            "raw_input.png", "--ref-pattern", "raw_reference.hdr", "--output",
            str(tmp_path / "out"), "--relighter", "luminet", "--iterations", "1", "--device",
            "cpu", "--no-progress", "-O", "ddim_steps=2"]
    from relit_k8s.relighters.luminet.make import run_options

    for key, value in run_options(folder).items():  # what make-model prints to run it
        args += ["-O", f"{key}={value}"]
        assert f"-O {key}={value}" in made.stdout
    assert "written 1, skipped 0" in cli(*args, check=True).stdout
    wrong = cli("make-model", str(tmp_path / "m2"), "--kind", "luminet", "--size", "sd21")
    assert wrong.returncode == 78 and "tiny, full" in wrong.stderr


def test_the_tiny_luminet_throughput_benchmark(tmp_path):
    import subprocess
    import sys

    from conftest import ROOT

    bench = subprocess.run([sys.executable, str(ROOT / "benchmarks/relighter_throughput.py"),
                            "--relighter", "luminet", "--tiny", "--out", str(tmp_path / "r.json")],
                           capture_output=True, text=True, timeout=600)
    assert bench.returncode == 0, bench.stderr[-3000:]
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["relighter"] == "luminet" and data["steps"] == 2
    assert data["seed_loop_samples_per_s"] > 0 and data["relit_samples_per_s"] > 0
    assert data["tflop_per_sample"] > 0  # counted on the model, not estimated
    assert data["seed_loop_model_loads"] == 1  # once per process, as the seed's launcher does
    assert data["seed_loop_pairs"] * data["seed_loop_iterations"] == 4
    assert data["relit_whole_run_speedup"] > 0
